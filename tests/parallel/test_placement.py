"""Where tensor-parallel ranks run (CPU tests with a pretend GPU count): QWEN1M_TP_DEVICES, the
backend, each rank's share of its device, and each rank's memory plan on a shared GPU."""

from __future__ import annotations

import re

import pytest
import torch

from qwen1m.cache.planner import plan_memory
from qwen1m.config import ModelConfig
from qwen1m.errors import ConfigError
from qwen1m.parallel.placement import DEVICES_ENV, Placement, place_ranks, torchrun_rank


@pytest.fixture
def gpus(monkeypatch):
    def visible(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    monkeypatch.delenv(DEVICES_ENV, raising=False)
    return visible


def test_cpu_ranks_use_gloo():
    assert place_ranks(torch.device("cpu"), 2) == Placement(("cpu", "cpu"), "gloo")


def test_one_gpu_per_rank_uses_nccl(gpus):
    gpus(4)
    placement = place_ranks(torch.device("cuda"), 2)
    assert placement == Placement(("cuda:0", "cuda:1"), "nccl") and placement.share(1) == 1


def test_ranks_sharing_a_gpu_use_gloo_and_share_it(gpus, monkeypatch):
    gpus(1)
    monkeypatch.setenv(DEVICES_ENV, "0,0")
    placement = place_ranks(torch.device("cuda"), 2)
    assert placement == Placement(("cuda:0", "cuda:0"), "gloo")
    assert placement.device(1) == torch.device("cuda", 0) and placement.share(0) == 2
    assert torchrun_rank(torch.device("cuda"), 1, 2) == (torch.device("cuda", 0), "gloo", 2)


@pytest.mark.parametrize(("visible", "env", "message"), [
    (1, None, "tensor_parallel_size=2 needs 2 GPUs but this machine has 1 visible; to test the sharded path on "
              f"fewer GPUs, set {DEVICES_ENV} to one CUDA index per rank (e.g. {DEVICES_ENV}=0,0)."),
    (1, "0", f"{DEVICES_ENV}='0' names 1 devices but tensor_parallel_size is 2; give one CUDA index per rank."),
    (2, "0,2", f"{DEVICES_ENV}='0,2' names cuda:2, but this machine has 2 visible GPU(s) (indices 0..1)."),
    (2, "0;1", f"{DEVICES_ENV}='0;1' must be comma-separated CUDA device indices, one per tensor-parallel rank"),
])
def test_bad_placements_are_one_sentence(gpus, monkeypatch, visible, env, message):
    gpus(visible)
    if env is not None:
        monkeypatch.setenv(DEVICES_ENV, env)
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        place_ranks(torch.device("cuda"), 2)


def test_ranks_on_one_gpu_plan_their_share(monkeypatch):
    """Two ranks on one 80 GiB GPU, 10 GiB in use after both loaded: each plans half of the rest."""
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * gib, 80 * gib))
    cfg = ModelConfig("Qwen2ForCausalLM", 97, 64, 112, 2, 2, 1, 32, 4096)
    opts = dict(dtype=torch.float32, device=torch.device("cuda", 0), weight_bytes=gib, fp8=False, block_size=64,
                max_model_len=4096, max_num_batched_tokens=512, max_num_seqs=8, gpu_memory_utilization=0.5,
                kv_cache_memory=None)
    alone, shared = plan_memory(cfg, **opts), plan_memory(cfg, **opts, share=2)
    assert alone.usable_bytes == 40 * gib and shared.usable_bytes == 20 * gib
    budget = 40 * gib - 10 * gib - alone.activation_bytes  # what one process may give its KV cache
    assert alone.kv_bytes <= budget < alone.kv_bytes + alone.block_size * alone.kv_bytes_per_token
    block_bytes = alone.block_size * alone.kv_bytes_per_token
    assert 2 * shared.kv_bytes <= budget - shared.activation_bytes < 2 * (shared.kv_bytes + block_bytes)
