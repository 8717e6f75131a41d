"""The memory planner's numbers against hand computations of its documented formula.

``cache/planner.py``:
    usable      = GPU total * gpu_memory_utilization      (CPU: the kv_cache_memory budget)
    kv_budget   = usable - memory already in use (our weights included) - peak activations of one step
    max tokens  = kv_budget // kv_bytes_per_token          (rounded down to whole blocks)
The activations of one step of t = min(max_num_batched_tokens, max_model_len) tokens, x1.25: residual
stream 4*t*hidden, q/k/v 4*q_dim + 2*kv_dim per token, MLP 3*t*intermediate (all at the model dtype),
fp32 attention partials 4*t*q_dim, one layer's K/V gather 2*max_model_len*kv_dim, and fp32 logits of
max(max_num_seqs, 1024) rows; plus sparse prefill's workspace with a sparse config. ``share`` ranks on
one GPU each take 1/share of what is left. That is all it reserves: the CUDA graphs' reservation is one
KV block, taken by the engine (tests/engine/test_kv_allocator_rules.py, test_fits_an_empty_cache).

The model below: hidden 64, intermediate 128, 2 layers, 4 heads and 2 KV heads of 16, vocabulary 1000;
so q_dim = 64, kv_dim = 32, and a token's K and V take 2 layers * 2 * 2 heads * 16 = 128 values.
"""

from __future__ import annotations

import logging

import pytest
import torch

from qwen1m.cache import planner
from qwen1m.cache.paged_kv import PagedKVCache
from qwen1m.cache.planner import LOGITS_ROWS, MemoryPlan, activation_bytes, check_fits, plan_memory, sparse_bytes
from qwen1m.config import ModelConfig
from qwen1m.errors import ConfigError
from qwen1m.sparse_config import SparseConfig

CFG = ModelConfig("Qwen2ForCausalLM", 1000, 64, 128, 2, 4, 2, 16, 4096)
GIB = 1 << 30
MIB = 1 << 20
WEIGHTS = 10_000_000
# fp32 activations of the default step below (t = 256, max_model_len 1024, 8 sequences), by hand:
# (4*64 + (4*64 + 2*32) + 3*128) * 4 bytes + 4*64 * 4 (fp32 partials) = 4864 bytes a token,
# 4864 * 256 + 2*1024*32*4 (gather) + 1024*1000*4 (logits) = 5,603,328; x1.25
ACT = 7_004_160


def test_logits_rows_is_the_lm_head_slice():
    assert LOGITS_ROWS == 1024  # the hand computations below take it as the logits' row floor


@pytest.mark.parametrize("dtype, batched, max_model_len, seqs, expected", [
    pytest.param(torch.float32, 256, 1024, 8, ACT, id="fp32"),
    # t = 512: 4864*512 + 2*512*32*4 + 4,096,000 = 6,717,440
    pytest.param(torch.float32, 2048, 512, 8, 8_396_800, id="a-step-holds-at-most-one-sequences-tokens"),
    # 2048 logits rows: 1,245,184 + 262,144 + 2048*1000*4 = 9,699,328
    pytest.param(torch.float32, 256, 1024, 2048, 12_124_160, id="more-sequences-than-logits-rows"),
    # bf16: (4*64 + 320 + 384) * 2 + 1024 (fp32 partials) = 2944 a token; 2944*256 + 2*1024*32*2 + 4,096,000
    # (fp32 logits) = 4,980,736
    pytest.param(torch.bfloat16, 256, 1024, 8, 6_225_920, id="bf16-values-fp32-partials-and-logits"),
])
def test_activation_bytes(dtype, batched, max_model_len, seqs, expected):
    assert activation_bytes(CFG, dtype, batched, max_model_len, seqs) == expected


def test_sparse_workspace_is_sized_for_one_steps_tokens():
    """With a sparse config (threshold below max_model_len) its workspace for t = min(batched,
    max_model_len) queries joins the sum before the x1.25."""
    sparse = SparseConfig.uniform(2, 4, 64, 64, threshold=256, last_q=8, block_size=8)
    dense_sum = 4864 * 512 + 2 * 512 * 32 * 4 + 1024 * 1000 * 4
    ws = sparse_bytes(CFG, sparse, torch.float32, 512, 512)
    assert ws > 0 and ws != sparse_bytes(CFG, sparse, torch.float32, 2048, 512)
    assert activation_bytes(CFG, torch.float32, 2048, 512, 8, sparse) == int(1.25 * (dense_sum + ws))


@pytest.mark.parametrize("dtype, fp8, per_token, name", [
    pytest.param(torch.float32, False, 128 * 4, "float32", id="float32"),
    pytest.param(torch.bfloat16, False, 128 * 2, "bfloat16", id="bfloat16"),
    pytest.param(torch.bfloat16, True, 128 + 2 * 2 * 2 * 4, "fp8_e4m3", id="fp8-one-byte-and-an-fp32-scale-per-head"),
])
def test_kv_bytes_per_token(dtype, fp8, per_token, name):
    assert PagedKVCache.bytes_per_token(2, 2, 16, dtype, fp8) == per_token
    plan = plan_memory(CFG, **_opts(dtype=dtype, fp8=fp8, kv_cache_memory=MIB))
    assert plan.kv_bytes_per_token == per_token and plan.kv_dtype == name
    assert plan.num_blocks == MIB // (per_token * 16)


def _opts(**kw) -> dict:
    opts = dict(dtype=torch.float32, device=torch.device("cpu"), weight_bytes=WEIGHTS, fp8=False, block_size=16,
                max_model_len=1024, max_num_batched_tokens=256, max_num_seqs=8, gpu_memory_utilization=0.5,
                kv_cache_memory=None)
    opts.update(kw)
    return opts


def _gpu(monkeypatch, free: int, total: int) -> None:
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))


def _no_gpu_query(monkeypatch) -> None:
    def refuse(device=None):
        raise AssertionError("the plan asked the GPU for its free memory")
    monkeypatch.setattr(torch.cuda, "mem_get_info", refuse)


def _no_physical_memory(monkeypatch) -> None:
    def refuse():
        raise AssertionError("the plan read the machine's memory")
    monkeypatch.setattr(planner, "physical_memory", refuse)


# per fp32 block of 16 tokens: 16 * 512 = 8192 bytes
PLANS = [
    # kv_cache_memory: the KV budget as given, on any device; usable = weights + activations + it
    pytest.param(dict(kv_cache_memory=MIB), None, None, 128, WEIGHTS + ACT + MIB, id="kv-cache-memory-in-blocks"),
    pytest.param(dict(kv_cache_memory=1_000_000), None, None, 122, WEIGHTS + ACT + 1_000_000,
                 id="kv-cache-memory-rounded-down-to-whole-blocks"),
    pytest.param(dict(kv_cache_memory=MIB, device=torch.device("cuda", 0)), None, None, 128, WEIGHTS + ACT + MIB,
                 id="kv-cache-memory-overrides-the-gpu"),
    # GPU of 8 GiB, 2 GiB in use, utilisation 0.5: usable 4 GiB; (4 GiB - 2 GiB - ACT) / 8192 = 262,144 - 855
    pytest.param(dict(device=torch.device("cuda", 0)), (6 * GIB, 8 * GIB), None, 261_289, 4 * GIB,
                 id="gpu-usable-minus-in-use-minus-activations"),
    # two ranks on it: each (4 GiB - 2 GiB - 2 * ACT) / 2 = (262,144 - 1,710) / 2 blocks, usable 2 GiB
    pytest.param(dict(device=torch.device("cuda", 0), share=2), (6 * GIB, 8 * GIB), None, 130_217, 2 * GIB,
                 id="gpu-shared-by-two-ranks"),
    # (8 GiB - 2 GiB - ACT) / 8192 = 786,432 - 855
    pytest.param(dict(device=torch.device("cuda", 0), gpu_memory_utilization=1.0), (6 * GIB, 8 * GIB), None,
                 785_577, 8 * GIB, id="gpu-utilisation-one"),
    pytest.param(dict(device=torch.device("cuda", 0)), (GIB, 8 * GIB), None, 0, 4 * GIB,
                 id="gpu-already-fuller-than-the-utilisation-no-blocks"),
    # CPU: min(a quarter of the machine, max_model_len * min(max_num_seqs, 8) * bytes a token)
    pytest.param({}, None, 64 * GIB, 1024 * 8 * 512 // 8192, WEIGHTS + ACT + 1024 * 8 * 512,
                 id="cpu-eight-full-length-sequences"),
    pytest.param(dict(max_num_seqs=2), None, 64 * GIB, 1024 * 2 * 512 // 8192, None,
                 id="cpu-fewer-sequences-allowed"),
    pytest.param(dict(max_num_seqs=20), None, 64 * GIB, 1024 * 8 * 512 // 8192, None,
                 id="cpu-at-most-eight-sequences"),
    pytest.param({}, None, 8 * MIB, 2 * MIB // 8192, WEIGHTS + ACT + 2 * MIB, id="cpu-a-quarter-of-a-small-machine"),
]


@pytest.mark.parametrize("opts, gpu, physical, num_blocks, usable", PLANS)
def test_plan_memory(monkeypatch, opts, gpu, physical, num_blocks, usable):
    if gpu is None:
        _no_gpu_query(monkeypatch)
    else:
        _gpu(monkeypatch, *gpu)
    if physical is None:
        _no_physical_memory(monkeypatch)
    else:
        monkeypatch.setattr(planner, "physical_memory", lambda: physical)
    plan = plan_memory(CFG, **_opts(**opts))
    assert plan.num_blocks == num_blocks
    assert plan.max_tokens == num_blocks * 16 and plan.kv_bytes == num_blocks * 8192
    assert (plan.weight_bytes, plan.activation_bytes, plan.kv_bytes_per_token) == (WEIGHTS, ACT, 512)
    if usable is not None:
        assert plan.usable_bytes == usable
    assert plan.device == str(opts.get("device", "cpu"))


@pytest.mark.parametrize("opts, gpu, message", [
    pytest.param(dict(kv_cache_memory=0), None, "kv_cache_memory must be a positive number of bytes, got 0.",
                 id="kv-cache-memory-zero"),
    pytest.param(dict(kv_cache_memory=-5, device=torch.device("cuda", 0)), None,
                 "kv_cache_memory must be a positive number of bytes, got -5.", id="kv-cache-memory-negative"),
    pytest.param(dict(device=torch.device("cuda", 0), gpu_memory_utilization=0.0), (6 * GIB, 8 * GIB),
                 "gpu_memory_utilization must be in (0, 1], got 0.0.", id="utilisation-zero"),
    pytest.param(dict(device=torch.device("cuda", 0), gpu_memory_utilization=1.5), (6 * GIB, 8 * GIB),
                 "gpu_memory_utilization must be in (0, 1], got 1.5.", id="utilisation-above-one"),
])
def test_plan_memory_refuses(monkeypatch, opts, gpu, message):
    if gpu is not None:
        _gpu(monkeypatch, *gpu)
    with pytest.raises(ConfigError) as err:
        plan_memory(CFG, **_opts(**opts))
    assert str(err.value) == message


def _plan(num_blocks: int, block_size: int = 16, kv_dtype: str = "float32") -> MemoryPlan:
    return MemoryPlan("cuda:0", 4 * GIB, 3 * GIB, GIB // 2, 512, block_size, num_blocks, kv_dtype)


@pytest.mark.parametrize("plan, max_model_len, explicit, expected", [
    pytest.param(_plan(128), 2048, True, 2048, id="explicit-that-fits-exactly"),
    pytest.param(_plan(128), 1000, True, 1000, id="explicit-that-fits"),
    pytest.param(_plan(128), 1000, False, 1000, id="default-that-fits"),
    pytest.param(_plan(128), 4096, False, 2048, id="default-lowered-to-what-fits"),
    pytest.param(_plan(2, block_size=1), 4096, False, 2, id="default-lowered-to-two-tokens"),
])
def test_check_fits(caplog, plan, max_model_len, explicit, expected):
    with caplog.at_level(logging.WARNING, logger=planner.__name__):
        assert check_fits(plan, max_model_len, explicit) == expected
    lowered = [r.getMessage() for r in caplog.records if r.name == planner.__name__]
    if expected < max_model_len:
        assert lowered == [f"max_model_len lowered from {max_model_len} to {expected} tokens: that is what fits "
                           f"in the KV cache ({plan})"]
    else:
        assert lowered == []


@pytest.mark.parametrize("plan, explicit, hint, helps", [
    pytest.param(_plan(128), True, True, "a smaller max_model_len, kv_cache_dtype='fp8' (half the KV bytes), a larger "
                 "gpu_memory_utilization or kv_cache_memory, or more GPUs", id="explicit-too-long"),
    pytest.param(_plan(1, block_size=1), False, True, "a smaller max_model_len, kv_cache_dtype='fp8' (half the KV "
                 "bytes), a larger gpu_memory_utilization or kv_cache_memory, or more GPUs",
                 id="a-default-with-fewer-than-two-tokens-is-refused-too"),
    pytest.param(_plan(0), False, True, "a smaller max_model_len, kv_cache_dtype='fp8' (half the KV bytes), a "
                 "larger gpu_memory_utilization or kv_cache_memory, or more GPUs", id="no-blocks-at-all"),
    pytest.param(_plan(128, kv_dtype="fp8_e4m3"), True, True, "a smaller max_model_len, a larger "
                 "gpu_memory_utilization or kv_cache_memory, or more GPUs", id="already-fp8-no-fp8-hint"),
    pytest.param(_plan(128), True, False, "a smaller max_model_len, kv_cache_dtype='fp8' (half the KV bytes), a "
                 "larger gpu_memory_utilization or kv_cache_memory", id="no-gpus-hint-where-they-would-not-help"),
])
def test_check_fits_refuses(plan, explicit, hint, helps):
    with pytest.raises(ConfigError) as err:
        check_fits(plan, 4096, explicit, tensor_parallel_hint=hint)
    # 4096 tokens * 512 bytes = 2 MiB = 0.0 GiB; weights 3.0 GiB, activations 0.5 GiB
    assert str(err.value) == (
        f"max_model_len=4,096 tokens needs 0.0 GiB of KV cache but only {plan.max_tokens:,} tokens (0.0 GiB) fit on "
        f"cuda:0 after 3.0 GiB of weights and 0.5 GiB of activations; use {helps}.")
