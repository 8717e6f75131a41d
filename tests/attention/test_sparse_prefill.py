"""Sparse prefill: full budgets == dense (DCA and plain), gather path == masked dense oracle."""

from __future__ import annotations

import math

import pytest
import torch

from qwen1m.attention.dca import dca_attention
from qwen1m.attention.reference import attend
from qwen1m.attention.sparse_prefill import sparse_attend_gather, sparse_prefill_attention
from qwen1m.attention.vertical_slash import build_vertical_slash_index, sparse_attend_reference
from qwen1m.config import DCAConfig
from qwen1m.rope import RotaryEmbedding, dca_positions
from qwen1m.sparse_config import SparseConfig

H, KVH, D = 4, 2, 16


def _qkv(total, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(total, H, D, generator=g, dtype=torch.float64),
            torch.randn(total, KVH, D, generator=g, dtype=torch.float64),
            torch.randn(total, KVH, D, generator=g, dtype=torch.float64))


def _dca_queries(q, positions, dca, rotary):
    pos = dca_positions(positions, dca)
    return {"intra": rotary.rotate(q, pos.intra), "succ": rotary.rotate(q, pos.succ),
            "inter": rotary.rotate(q, pos.inter), "succ_critical": rotary.rotate(q, pos.succ_critical),
            "inter_critical": rotary.rotate(q, pos.inter_critical)}


@pytest.mark.parametrize("begin", [0, 23])  # one-shot prefill and a chunk that starts mid DCA chunk
def test_full_budgets_equal_dense_dca(begin):
    dca = DCAConfig(16, 4)
    total = 50
    rotary = RotaryEmbedding(D, 10000.0)
    q, k, v = _qkv(total)
    k = rotary.rotate(k, dca_positions(torch.arange(total), dca).key)
    queries = _dca_queries(q[begin:], torch.arange(begin, total), dca, rotary)
    scale = 1 / math.sqrt(D)
    cfg = SparseConfig.uniform(1, H, total, total, last_q=8, block_size=4)
    sparse, sparse_lse = sparse_prefill_attention(
        queries, k, v, begin=begin, chunk_len=dca.chunk_len, softmax_scale=scale,
        vertical_sizes=[total] * H, slash_sizes=[total] * H, cfg=cfg)
    dense, dense_lse = dca_attention(queries["intra"], queries["succ"], queries["inter"], k, v, begin=begin,
                                     dca=dca, softmax_scale=scale)
    assert torch.allclose(sparse, dense, atol=1e-10) and torch.allclose(sparse_lse, dense_lse, atol=1e-10)


def test_full_budgets_equal_dense_plain_rope():
    total = 40
    q, k, v = _qkv(total, seed=1)
    cfg = SparseConfig.uniform(1, H, total, total, last_q=8, block_size=8)
    out, _ = sparse_prefill_attention({"intra": q[10:]}, k, v, begin=10, chunk_len=None, softmax_scale=0.25,
                                      vertical_sizes=[total] * H, slash_sizes=[total] * H, cfg=cfg)
    ref, _ = attend(q[10:], k, v, softmax_scale=0.25, causal=True)
    assert torch.allclose(out, ref, atol=1e-10)


def test_small_budgets_are_sparse_and_keep_sinks_and_local():
    total = 96
    q, k, v = _qkv(total, seed=2)
    cfg = SparseConfig.uniform(1, H, 4, 4, last_q=8, block_size=8, sink_tokens=2, local_diagonals=3)
    stats = {}
    out, lse = sparse_prefill_attention({"intra": q}, k, v, begin=0, chunk_len=None, softmax_scale=0.25,
                                        vertical_sizes=[4] * H, slash_sizes=[4] * H, cfg=cfg, stats=stats)
    ref, ref_lse = attend(q, k, v, softmax_scale=0.25, causal=True)
    assert 0 < stats["computed"] < stats["causal"] * 0.6  # really sparse
    assert torch.isfinite(out).all() and (lse <= ref_lse + 1e-5).all()  # a subset of the keys: lse can only drop


@pytest.mark.parametrize("causal", [True, False])
def test_gather_path_equals_masked_dense_oracle(causal):
    g = torch.Generator().manual_seed(3)
    num_q, num_kv = 37, 70
    q = torch.randn(num_q, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(num_kv, KVH, D, generator=g, dtype=torch.float64)
    v = torch.randn(num_kv, KVH, D, generator=g, dtype=torch.float64)
    v_idx = torch.randint(0, num_kv, (H, 5), generator=g)
    s_idx = torch.randint(-num_q + 1 if not causal else 0, num_kv, (H, 4), generator=g)
    s_idx[1] = -1  # a head with no valid slash in causal mode
    index = build_vertical_slash_index(v_idx, s_idx, num_q, num_kv, causal=causal, block_m=8, block_n=8)
    out, lse = sparse_attend_gather(q, k, v, index, softmax_scale=0.3, causal=causal)
    ref, ref_lse = sparse_attend_reference(q, k, v, index, softmax_scale=0.3, causal=causal)
    assert torch.allclose(out, ref, atol=1e-10)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_index_density_counts_listed_over_visible_keys(causal):
    """index_density = keys listed per query block (blocks x block_n + columns, capped at what the
    block's last row sees) over the keys that row sees; checked against a direct count."""
    from qwen1m.attention.sparse_prefill import index_density

    g = torch.Generator().manual_seed(3)
    num_q, num_kv, heads = 37, 90, 3
    v_idx = torch.randint(0, num_kv, (heads, 5), generator=g)
    s_idx = torch.randint(0 if causal else -num_q + 1, num_kv, (heads, 4), generator=g)
    index = build_vertical_slash_index(v_idx, s_idx, num_q, num_kv, causal=causal, block_m=8, block_n=8)
    listed = index.block_count.long() * 8 + index.column_count.long()
    got = full = 0
    for m in range(index.block_count.shape[1]):
        end = min((m + 1) * 8, num_q)
        visible = min(num_kv, end + num_kv - num_q) if causal else num_kv
        got += listed[:, m].clamp(max=visible).sum().item()
        full += visible * heads
    assert index_density(index) == pytest.approx(got / full)
    assert 0 < index_density(index) < 1
    every = build_vertical_slash_index(torch.arange(num_kv).repeat(heads, 1), torch.zeros(heads, 0, dtype=torch.long),
                                       num_q, num_kv, causal=causal, block_m=8, block_n=8)
    assert index_density(every) == pytest.approx(1.0)


def test_dense_above_density_must_be_a_share():
    from qwen1m.errors import ConfigError

    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="dense_above_density"):
            SparseConfig.uniform(1, 1, 4, 4, dense_above_density=bad)
