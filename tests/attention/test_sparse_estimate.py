"""Pattern estimation equals sums over an explicit dense softmax; budgets, sinks and local window."""

from __future__ import annotations

import torch

from qwen1m.attention.sparse_estimate import attention_sums, estimate_vertical_slash


def _setup(seed=0, num_heads=4, num_kv=2, d=16, total=50, last=8):
    g = torch.Generator().manual_seed(seed)
    queries = {kind: torch.randn(last, num_heads, d, generator=g) for kind in ("intra", "succ", "inter")}
    k = torch.randn(total, num_kv, d, generator=g)
    ranges = [("inter", 0, 10), ("succ", 10, 30), ("intra", 30, total)]
    return queries, k, ranges


def _dense_sums(queries, k, ranges, total, scale):
    last, num_heads, _ = queries["intra"].shape
    group = num_heads // k.shape[1]
    scores = torch.full((num_heads, last, total), float("-inf"), dtype=torch.float64)
    for kind, a, b in ranges:
        kk = k[a:b].double().repeat_interleave(group, dim=1)  # [n, H, D]
        scores[:, :, a:b] = torch.einsum("lhd,nhd->hln", queries[kind].double(), kk) * scale
    q_pos = torch.arange(total - last, total)
    for i in range(last):
        scores[:, i, q_pos[i] + 1:] = float("-inf")
    probs = torch.softmax(scores, -1)
    vertical = probs.sum(1)
    slash = torch.zeros(num_heads, total, dtype=torch.float64)
    for i in range(last):
        for j in range(q_pos[i] + 1):
            slash[:, q_pos[i] - j] += probs[:, i, j]
    return vertical, slash


def test_sums_match_dense_softmax_with_small_key_blocks():
    queries, k, ranges = _setup()
    v, s = attention_sums(queries, k, ranges, 50, softmax_scale=0.3, key_block=7)
    dv, ds = _dense_sums(queries, k, ranges, 50, 0.3)
    assert torch.allclose(v.double(), dv, atol=1e-5) and torch.allclose(s.double(), ds, atol=1e-5)
    assert torch.allclose(v.sum(-1), torch.full((4,), 8.0), atol=1e-4)  # each query's row sums to 1


def test_topk_respects_per_head_budgets_sinks_and_local_window():
    queries, k, ranges = _setup(seed=1)
    v_idx, s_idx = estimate_vertical_slash(queries, k, ranges, 50, softmax_scale=0.3, vertical_sizes=[5, 3, 0, 8],
                                           slash_sizes=[4, 4, 6, 2], sink_tokens=2, local_diagonals=3)
    assert v_idx.shape == (4, 8) and s_idx.shape == (4, 6)
    assert [(row >= 0).sum().item() for row in v_idx] == [5, 3, 0, 8]
    assert [(row >= 0).sum().item() for row in s_idx] == [4, 4, 6, 2]
    for h in (0, 1, 3):
        assert {0, 1} <= set(v_idx[h].tolist())  # sinks always in
    for h in range(4):
        assert set(s_idx[h, :2].tolist()) <= {0, 1, 2}  # the nearest diagonals come first
    dv, ds = _dense_sums(queries, k, ranges, 50, 0.3)
    dv[:, :2] = float("inf")
    expected = set(torch.topk(dv[3], 8).indices.tolist())
    assert set(v_idx[3].tolist()) == expected
