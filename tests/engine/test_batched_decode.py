"""The batched decode path (paged split-K kernel, interpreted on CPU) equals the per-sequence path."""

from __future__ import annotations

import pytest
import torch
from checkpoints import save_tiny_checkpoint

from qwen1m import LLM, SamplingParams

DCA = {"chunk_size": 16, "local_size": 4, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("dca", [None, DCA])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per-region"])
def test_kernel_decode_equals_reference_decode(tmp_path, dca, kv_cache_dtype, fused):
    """fused: decode_prep + one multi-region kernel launch; per-region: PyTorch RoPE, one kernel call
    per DCA region, LSE merge. Both must give the reference path's tokens."""
    extra = {"dual_chunk_attention_config": dca} if dca else None
    folder = save_tiny_checkpoint(tmp_path / "m", seed=41, extra_config=extra)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (3, 11, 30)]
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)

    def run(kernel: bool):
        llm = LLM(folder, dtype="float32", device="cpu", kv_cache_dtype=kv_cache_dtype, block_size=4)
        llm.model.backend.kernels.decode_kernel = kernel
        llm.model.backend.kernels.fused_decode = fused
        calls = []
        if kernel:
            original = llm.model.backend.forward_decode_batch

            def spy(*args, **kwargs):
                calls.append(len(args[-1]))
                return original(*args, **kwargs)

            llm.model.backend.forward_decode_batch = spy
        logits = []  # every step's sampled-row logits: a stronger check than the greedy tokens alone
        compute = llm.model.compute_logits
        llm.model.compute_logits = lambda h: logits.append(compute(h)) or logits[-1]
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        return outs, calls, logits

    expected, _, ref_logits = run(False)
    got, calls, got_logits = run(True)
    assert got == expected
    assert len(got_logits) == len(ref_logits)
    for a, b in zip(got_logits, ref_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert calls and max(calls) == 3  # the three sequences decoded in one batch


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per-region"])
def test_kernel_decode_as_dca_ranges_appear(tmp_path, fused):
    """One sequence decoding from inside the first DCA chunk (s = 12) past the third: the decode launch
    has 1, then 2, then 3 key ranges (``_dca_decode_ranges``); every step's logits equal the reference."""
    from qwen1m.attention import metadata as md

    folder = save_tiny_checkpoint(tmp_path / "m", seed=42, extra_config={"dual_chunk_attention_config": DCA})
    prompt = torch.randint(0, 97, (5,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=36, temperature=0, ignore_eos=True)
    seen = []
    ranges = md._dca_decode_ranges

    def run(kernel: bool):
        llm = LLM(folder, dtype="float32", device="cpu", block_size=4)
        llm.model.backend.kernels.decode_kernel = kernel
        llm.model.backend.kernels.fused_decode = fused
        logits = []
        compute = llm.model.compute_logits
        llm.model.compute_logits = lambda h: logits.append(compute(h)) or logits[-1]
        return llm.generate([prompt], params)[0].outputs[0].token_ids, logits

    expected, ref_logits = run(False)
    md._dca_decode_ranges = lambda seqs, s: seen.append(ranges(seqs, s).shape[1]) or ranges(seqs, s)
    try:
        got, got_logits = run(True)
    finally:
        md._dca_decode_ranges = ranges
    assert got == expected and len(got_logits) == len(ref_logits)
    for a, b in zip(got_logits, ref_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert sorted(set(seen)) == [1, 2, 3]
