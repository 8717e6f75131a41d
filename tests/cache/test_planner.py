"""The memory plan reserves sparse prefill's workspace (design §3.6) and nothing more when sparse is off."""

from __future__ import annotations

import pytest
import torch
from checkpoints import save_tiny_checkpoint

from qwen1m import LLM
from qwen1m.cache.planner import activation_bytes, plan_memory, sparse_bytes
from qwen1m.cache.sparse_workspace import sparse_workspace_bytes
from qwen1m.config import DCAConfig, ModelConfig
from qwen1m.sparse_config import SparseConfig

GIB = 1 << 30
# the model: Qwen2.5-7B attention (28 / 4 heads of 128), 4 layers, DCA chunk 32768 (s = 31744)
BENCH = ModelConfig("Qwen2ForCausalLM", 4096, 512, 1536, 4, 28, 4, 128, 1 << 20, dca=DCAConfig(32768, 1024))
SPARSE = SparseConfig.uniform(4, 28, 13288, 18384)  # its calibrated config's widest budgets


def _plan(monkeypatch, sparse, max_model_len=1 << 20):
    """An H100 (79.18 GiB) with 1 GiB in use, as ``LLM`` plans it: bf16, 32K prefill chunks."""
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(78.18 * GIB), int(79.18 * GIB)))
    return plan_memory(BENCH, dtype=torch.bfloat16, device=torch.device("cuda", 0), weight_bytes=GIB // 4,
                       fp8=False, block_size=64, max_model_len=max_model_len, max_num_batched_tokens=32768,
                       max_num_seqs=8, gpu_memory_utilization=0.9, kv_cache_memory=None, sparse=sparse)


def test_sparse_config_reserves_the_batched_workspace(monkeypatch):
    dense, sparse = _plan(monkeypatch, None), _plan(monkeypatch, SPARSE)
    workspace = sparse_workspace_bytes(32768, 1 << 20, num_heads=28, head_dim=128, element_size=2,
                                       max_vertical=13288, max_slash=18384, cfg=SPARSE, chunk_len=31744)
    critical = 2 * 32768 * 28 * 128 * 2  # the two selection rotations of the queries
    assert sparse_bytes(BENCH, SPARSE, torch.bfloat16, 32768, 1 << 20) == workspace + critical
    assert 2 * GIB < workspace < 4 * GIB
    assert sparse.activation_bytes - dense.activation_bytes >= workspace + critical
    # the KV cache gives the reserve up (in whole blocks)
    block_bytes = sparse.block_size * sparse.kv_bytes_per_token
    assert dense.kv_bytes - sparse.kv_bytes > sparse.activation_bytes - dense.activation_bytes - block_bytes


@pytest.mark.parametrize("sparse", [None, SparseConfig.uniform(4, 28, 13288, 18384, threshold=1 << 20)])
def test_no_reserve_when_no_prompt_is_sparse(monkeypatch, sparse):
    """Sparse off, or no prompt longer than the threshold: the plan is the dense one."""
    assert _plan(monkeypatch, sparse) == _plan(monkeypatch, None)
    assert activation_bytes(BENCH, torch.bfloat16, 32768, 1 << 20, 8, sparse) == \
        activation_bytes(BENCH, torch.bfloat16, 32768, 1 << 20, 8)


def test_engine_plans_with_its_sparse_config(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "m", seed=3)
    sparse = SparseConfig.uniform(2, 4, 64, 64, threshold=16, last_q=8, block_size=8)
    opts = dict(dtype="float32", device="cpu", kv_cache_memory=1 << 20)
    dense = LLM(folder, **opts).memory_plan
    with_sparse = LLM(folder, sparse_attention_config=sparse, **opts).memory_plan
    assert with_sparse.activation_bytes > dense.activation_bytes and with_sparse.num_blocks == dense.num_blocks
