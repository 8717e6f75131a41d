"""Tensor parallelism on CUDA with both ranks on one GPU (GPU only: run with -m gpu on the device).

QWEN1M_TP_DEVICES=0,0 puts ranks 0 and 1 of tensor_parallel_size=2 on cuda:0; they join over gloo
(NCCL refuses two ranks on one device), which all-reduces CUDA tensors through host memory. This
runs the sharded CUDA path (Triton kernels on each rank's head slice, each rank's memory plan for
its share of the GPU) on a one-GPU machine: TP=2 must equal TP=1 on logits and greedy tokens.

    QWEN1M_TP_DEVICES is read by every rank (the workers inherit the driver's environment).
    TP steps run eagerly: CUDA graphs stay a TP=1 feature (a step's broadcast and all-reduces are
    host-driven collectives, not capturable); the tests assert that too.
"""

from __future__ import annotations

import gc

import pytest
import torch
from checkpoints import save_tiny_checkpoint

from qwen1m import LLM, SamplingParams
from qwen1m.sparse_config import SparseConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DCA = {"chunk_size": 64, "local_size": 16, "original_max_position_embeddings": 64}
SIZES = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512)


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setenv("QWEN1M_TP_DEVICES", "0,0")
    yield
    gc.collect()  # an engine holds reference cycles: free its memory before the next test plans
    torch.cuda.empty_cache()


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=gen).tolist() for n in lengths]


def _run(llm: LLM, prompts, params) -> tuple[torch.Tensor, list[list[int]]]:
    logits = llm.logits(prompts[-1])
    return logits, [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def _compare(folder, prompts, params, **opts) -> None:
    one = LLM(folder, device="cuda", **opts)
    ref_logits, ref_tokens = _run(one, prompts, params)
    del one
    gc.collect()
    torch.cuda.empty_cache()
    two = LLM(folder, device="cuda", tensor_parallel_size=2, **opts)
    try:
        assert two.engine.runner.graph_runner is None  # TP decodes eagerly
        assert str(two.engine.device) == "cuda:0" and two.memory_plan.device == "cuda:0"
        logits, tokens = _run(two, prompts, params)
        assert logits.shape == ref_logits.shape
        rel = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
        # float32 everywhere (the Triton kernels use ieee fp32 dots): only the split o_proj/down_proj
        # sums differ from TP=1, ~1e-6 relative
        assert rel < 1e-4, rel
        assert tokens == ref_tokens
    finally:
        two.shutdown()


@pytest.mark.parametrize("dca", [None, DCA])
def test_tp2_on_one_gpu_equals_tp1(tmp_path, one_gpu, dca):
    folder = save_tiny_checkpoint(tmp_path / "m", seed=91, extra_config={"dual_chunk_attention_config": dca}
                                  if dca else None, **SIZES)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    _compare(folder, _prompts(91, (5, 70, 150)), params, dtype="float32", max_model_len=512,
             kv_cache_memory=64 << 20, max_num_batched_tokens=64)


def test_tp2_on_one_gpu_sparse_prefill_equals_tp1(tmp_path, one_gpu):
    """Sparse prefill on each rank's heads (the Triton index and sparse kernels on a head slice):
    budgets differ per head, every region stays sparse, DCA on."""
    dca = {"chunk_size": 256, "local_size": 64, "original_max_position_embeddings": 256}
    folder = save_tiny_checkpoint(tmp_path / "m", seed=92, extra_config={"dual_chunk_attention_config": dca},
                                  **SIZES)
    sparse = SparseConfig(((40, 64, 24, 48), (56, 32, 64, 40)), ((64, 40, 96, 48), (48, 80, 40, 64)),
                          ((None,) * 4,) * 2, threshold=128, last_q=64, block_size=64, sink_tokens=4,
                          local_diagonals=16, dense_above_density=1.0)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    _compare(folder, _prompts(92, (200, 450)), params, dtype="float32", max_model_len=1024,
             kv_cache_memory=64 << 20, sparse_attention_config=sparse)


def test_tp2_on_one_gpu_bfloat16(tmp_path, one_gpu):
    """The checkpoint dtype on GPU (bfloat16 all-reduces through gloo): logits close to TP=1."""
    folder = save_tiny_checkpoint(tmp_path / "m", seed=93, **SIZES)
    prompt = _prompts(93, (120,))[0]
    opts = dict(dtype="bfloat16", max_model_len=256, kv_cache_memory=32 << 20)
    one = LLM(folder, device="cuda", **opts)
    ref = one.logits(prompt)
    del one
    gc.collect()
    two = LLM(folder, device="cuda", tensor_parallel_size=2, **opts)
    try:
        logits = two.logits(prompt)
        rel = ((logits - ref).abs().max() / ref.abs().max()).item()
        assert rel < 3e-2, rel  # bf16 rounding of two partial sums against one
        out = two.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
        assert len(out.outputs[0].token_ids) == 8
    finally:
        two.shutdown()


def test_ranks_sharing_a_gpu_plan_half_of_it_each(tmp_path, one_gpu):
    """Without kv_cache_memory each rank plans for half of what the GPU has left, so both KV caches
    together stay within gpu_memory_utilization of the device."""
    folder = save_tiny_checkpoint(tmp_path / "m", seed=94, **SIZES)
    utilization = 0.5
    total = torch.cuda.mem_get_info(0)[1]
    two = LLM(folder, device="cuda", tensor_parallel_size=2, dtype="float32", gpu_memory_utilization=utilization,
              max_model_len=2048)
    try:
        plan = two.memory_plan
        assert plan.usable_bytes <= total * utilization / 2 + 1
        out = two.generate([_prompts(94, (50,))[0]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 4
        free, total = torch.cuda.mem_get_info(0)
        # both processes' memory on the device: contexts, weights, two KV caches, this step's activations,
        # plus what the plan cannot see (cuBLAS workspaces, loaded Triton kernels: the slack). Ranks
        # that each planned for the whole GPU would hold about twice the budget.
        assert total - free <= total * utilization + (3 << 29), (total - free, plan)
        assert 2 * plan.kv_bytes >= total * utilization / 4  # and the plan did use the memory it was given
    finally:
        two.shutdown()


def test_tp2_on_one_gpu_prefix_cache_tiers(tmp_path, one_gpu):
    """Host and disk tiers with CUDA ranks: each worker's replica copies its shard on its own side
    stream into its own pinned slots (GPU -> host -> disk evictions, then a restart from disk)."""
    folder = save_tiny_checkpoint(tmp_path / "m", seed=95, extra_config={"dual_chunk_attention_config": DCA},
                                  **SIZES)
    docs = _prompts(95, (240, 240, 240))  # 15 blocks of 16 tokens each
    first = [d + q for d, q in zip(docs, _prompts(96, (16, 16, 16)))]
    follow = [d + q for d, q in zip(docs, _prompts(97, (16, 16, 16)))]  # the same length: the same YaRN m
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    # 24 blocks per rank (float32, one KV head of 64 dims, 2 layers: 1 KiB a token): one sequence at a time
    opts = dict(dtype="float32", block_size=16, max_model_len=300, max_num_batched_tokens=64,
                kv_cache_memory=384 << 10, tensor_parallel_size=2)
    block = 16 << 10

    def run(llm: LLM, prompts) -> tuple[list[list[int]], list[int]]:
        outs = [llm.generate([p], params)[0] for p in prompts]
        return [o.outputs[0].token_ids for o in outs], [o.num_cached_tokens for o in outs]

    plain = LLM(folder, device="cuda", **opts)
    try:
        want = run(plain, first + follow)[0]
    finally:
        plain.shutdown()
    llm = LLM(folder, device="cuda", cpu_offload_gb=20 * block / 2**30, prefix_cache_dir=tmp_path / "kv", **opts)
    try:
        assert llm.engine.kv.tiers.host.data.is_pinned()
        assert run(llm, first) == (want[:3], [0, 0, 0])
        # the writers are done: no host slot is held by a pending write (which would cut a lookup short)
        llm.engine.kv.tiers.flush()
        assert run(llm, follow) == (want[3:], [240] * 3)
        assert llm.engine.kv.stats().hit_tokens["disk"] >= 240  # 20 host slots: some documents went to disk
    finally:
        llm.shutdown()
    again = LLM(folder, device="cuda", prefix_cache_dir=tmp_path / "kv", **opts)
    try:
        tokens, cached = run(again, first + follow)
        assert tokens == want and cached == [240] * 6
        assert again.engine.kv.stats().hit_tokens["disk"] == 3 * 240
    finally:
        again.shutdown()
