"""CUDA-graph decode equals eager decode (GPU only: run with -m gpu on the device)."""

from __future__ import annotations

import gc

import pytest
import torch
from checkpoints import save_tiny_checkpoint

from qwen1m import LLM, SamplingParams

pytestmark = pytest.mark.gpu

DCA = {"chunk_size": 64, "local_size": 16, "original_max_position_embeddings": 64}


def _model_and_prompts(tmp_path, dca, seed: int, lengths: tuple[int, ...]):
    """A tiny checkpoint (GQA 4/2, DCA or not) and random prompts of the given lengths."""
    extra = {"dual_chunk_attention_config": dca} if dca else None
    folder = save_tiny_checkpoint(tmp_path / "m", seed=seed, extra_config=extra, hidden_size=256,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=512)
    gen = torch.Generator().manual_seed(seed)
    return folder, [torch.randint(0, 97, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dca", [None, DCA])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_graph_decode_equals_eager(tmp_path, dca, kv_cache_dtype):
    folder, prompts = _model_and_prompts(tmp_path, dca, 81, (5, 70, 150))
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    runs = {}
    for eager in (True, False):
        llm = LLM(folder, dtype="float32", device="cuda", kv_cache_dtype=kv_cache_dtype, enforce_eager=eager,
                  max_num_seqs=8, max_model_len=512, kv_cache_memory=256 << 20)
        assert (llm.engine.runner.graph_runner is None) == eager
        runs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        if not eager:
            # three sequences replayed in the bucket of 4 (keys: bucket, key ranges)
            assert {b for b, _ in llm.engine.runner.graph_runner.graphs} >= {4}
        del llm
        gc.collect()  # the engine holds reference cycles: free its KV cache before the next LLM plans
        torch.cuda.empty_cache()
    assert runs[False] == runs[True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_decode_across_dca_chunks(tmp_path):
    """A decode that grows from inside the first DCA chunk (s = 48) past the second: the batch's key
    ranges go 1 -> 2 -> 3, each count gets its own graph, and the tokens equal eager decode."""
    folder, prompts = _model_and_prompts(tmp_path, DCA, 83, (40,))
    params = SamplingParams(max_tokens=80, temperature=0, ignore_eos=True)
    runs = {}
    for eager in (True, False):
        llm = LLM(folder, dtype="float32", device="cuda", enforce_eager=eager, max_num_seqs=4,
                  max_model_len=256, kv_cache_memory=64 << 20)
        runs[eager] = llm.generate(prompts, params)[0].outputs[0].token_ids
        if not eager:
            assert set(llm.engine.runner.graph_runner.graphs) == {(1, 1), (1, 2), (1, 3)}
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    assert len(runs[True]) == 80 and runs[False] == runs[True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dca", [None, DCA])
def test_fused_graph_decode_logits_equal_reference(tmp_path, dca):
    """The logits every step samples from: the replayed graph (fused decode layer) and eager fused decode
    equal the PyTorch reference path (per-sequence attention, PyTorch RoPE and norms), float32."""
    from qwen1m.model.layers import RMSNorm

    folder, prompts = _model_and_prompts(tmp_path, dca, 82, (7, 90, 200))
    runs = {}
    for name in ("reference", "eager", "graph"):
        RMSNorm.use_kernel = False if name == "reference" else None
        try:
            llm = LLM(folder, dtype="float32", device="cuda", enforce_eager=name != "graph", max_num_seqs=8,
                      max_model_len=512, kv_cache_memory=256 << 20)
            llm.model.backend.kernels.decode_kernel = name != "reference"
            logits = []
            # a logits processor sees every row's raw logits at every step (plain greedy rows would take
            # the device argmax and never reach the host); it leaves them unchanged
            capture = lambda ids, row, logits=logits: logits.append(row.clone()) or row  # noqa: E731
            params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logits_processors=[capture])
            runs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)], logits
        finally:
            RMSNorm.use_kernel = None
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    ref_tokens, ref_logits = runs["reference"]
    for name in ("eager", "graph"):
        tokens, logits = runs[name]
        assert tokens == ref_tokens, name
        assert len(logits) == len(ref_logits) == 3 * 24, name
        for a, b in zip(logits, ref_logits):
            torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_overlapped_graph_decode_equals_plain(tmp_path):
    """Overlapped decode (the next graph replayed before this step's tokens reach the host, its input
    ids copied on the device) gives the plain engine's tokens, with sequences stopping at different
    steps (stop tokens, lengths); also overlapped eager decode."""
    folder, prompts = _model_and_prompts(tmp_path, DCA, 85, (5, 30, 70, 150))
    kw = dict(dtype="float32", device="cuda", max_num_seqs=8, max_model_len=512, kv_cache_memory=256 << 20)
    llm = LLM(folder, **kw)
    assert llm.engine.overlap, "overlap is the default with CUDA graphs"
    llm.engine.overlap = False
    free = llm.generate(prompts, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True, stop_token_ids=stop)
              for m, stop in [(30, [free[0].outputs[0].token_ids[3]]), (12, None), (30, None),
                              (30, [free[3].outputs[0].token_ids[9]])]]
    summary = lambda outs: [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]  # noqa: E731
    want = summary(llm.generate(prompts, params))
    llm.engine.overlap = True
    assert summary(llm.generate(prompts, params)) == want
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    eager = LLM(folder, enforce_eager=True, **kw)
    eager.engine.overlap = True
    assert summary(eager.generate(prompts, params)) == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampled_rows_overlap_without_a_host_sync(tmp_path, monkeypatch):
    """Sampled rows (seeded, top-k/top-p/min-p, logit_bias) beside greedy ones are chosen on the device
    with no host sync, so their steps are launched early: the plain engine's tokens, seed for seed."""
    from qwen1m.engine import step_tokens

    folder, prompts = _model_and_prompts(tmp_path, DCA, 86, (5, 30, 70, 150))
    kw = dict(dtype="float32", device="cuda", max_num_seqs=8, max_model_len=512, kv_cache_memory=256 << 20)
    llm = LLM(folder, **kw)
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=24, temperature=0.9, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=17, temperature=1.1, top_k=12, top_p=0.9, seed=2, ignore_eos=True,
                             logit_bias={3: 2.0}),
              SamplingParams(max_tokens=24, temperature=0.8, min_p=0.05, seed=3, ignore_eos=True)]
    summary = lambda outs: [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]  # noqa: E731
    llm.engine.overlap = False
    want = summary(llm.generate(prompts, params))
    real = step_tokens.sample_on_device

    def no_sync(logits, seqs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(logits, seqs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(step_tokens, "sample_on_device", no_sync)
    inner, aheads = llm.engine.runner.launch_ahead, [0]

    def counting(step, scheduler):
        ahead = inner(step, scheduler)
        aheads[0] += ahead is not None
        return ahead

    llm.engine.runner.launch_ahead = counting
    llm.engine.overlap = True
    assert summary(llm.generate(prompts, params)) == want
    assert aheads[0] >= 10, "sampled steps were not launched early"
