"""build_vertical_slash_index (vectorised torch) vs a straightforward Python-loop construction.

The loop oracle follows the module docstring of qwen1m.attention.vertical_slash step by step, one
query block at a time. Besides equal index tensors, each query row's covered key set must contain
every visible vertical and slash key, and contain nothing else than the documented extras.
"""

from __future__ import annotations

import math

import pytest
import torch

from qwen1m.attention.reference import attend
from qwen1m.attention.vertical_slash import (
    build_vertical_slash_index,
    sparse_attend_reference,
    vertical_slash_mask,
)


def loop_index(v_idx, s_idx, num_q, num_kv, causal, block_m, block_n):
    """Per head, per query block: (list of dense block starts, list of columns)."""
    offset = num_kv - num_q
    result = []
    for h in range(v_idx.shape[0]):
        per_block = []
        for start in range(0, num_q, block_m):
            end = min(start + block_m, num_q)
            lim = min(num_kv, max(0, end + offset)) if causal else num_kv
            intervals = []
            for d in sorted(set(s_idx[h].tolist())):
                if causal and d < 0:
                    continue
                lo, hi = max(0, start + offset - d), min(end + offset - d, lim)
                if lo < hi:
                    intervals.append((lo, hi))
            intervals.sort()
            groups = []
            for lo, hi in intervals:
                if groups and lo - groups[-1][1] < block_n:
                    groups[-1][1] = max(groups[-1][1], hi)
                else:
                    groups.append([lo, hi])
            blocks, dense = [], set()
            for lo, hi in groups:
                for b in range(lo, hi, block_n):
                    blocks.append(b)
                    dense.update(range(b, b + block_n))
            cols = sorted(
                c for c in set(v_idx[h].tolist())
                if 0 <= c < num_kv and c not in dense and (not causal or c <= end - 1 + offset)
            )
            per_block.append((blocks, cols))
        result.append(per_block)
    return result


def covered_sets(index, num_q, num_kv, causal):
    mask = vertical_slash_mask(index, num_q, num_kv, causal)
    return [[set(mask[h, i].nonzero().flatten().tolist()) for i in range(num_q)] for h in range(mask.shape[0])]


def random_indices(num_heads, nv, ns, num_q, num_kv, seed, causal):
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(-3, num_kv + 3, (num_heads, nv), generator=g)
    low = 0 if causal else -num_q
    s = torch.randint(low - 2, num_kv + 2, (num_heads, ns), generator=g)
    if nv >= 4:  # edges and duplicates
        v[:, 0], v[:, 1], v[:, 2], v[:, 3] = 0, num_kv - 1, num_kv - 1, num_kv
    if ns >= 4:
        s[:, 0], s[:, 1], s[:, 2], s[:, 3] = 0, num_kv - 1, 0, 1 - num_q
    return v, s


# (num_q, num_kv, nv, ns): odd sizes, num_q < num_kv, num_q > num_kv, one query, empty sets
SHAPES = [(1, 1, 1, 1), (1, 37, 5, 4), (13, 13, 4, 6), (13, 50, 7, 9), (29, 71, 0, 12),
          (29, 71, 9, 0), (29, 71, 0, 0), (40, 17, 6, 8), (64, 200, 20, 30), (70, 70, 5, 70)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block_m,block_n", [(4, 4), (8, 4), (4, 8), (8, 8), (64, 64)])
@pytest.mark.parametrize("num_q,num_kv,nv,ns", SHAPES)
def test_index_matches_loop(num_q, num_kv, nv, ns, block_m, block_n, causal):
    num_heads = 3
    v, s = random_indices(num_heads, nv, ns, num_q, num_kv, seed=num_q * 7 + num_kv + block_m, causal=causal)
    index = build_vertical_slash_index(v, s, num_q, num_kv, causal=causal, block_m=block_m, block_n=block_n)
    expected = loop_index(v, s, num_q, num_kv, causal, block_m, block_n)
    num_blocks = math.ceil(num_q / block_m)
    assert index.block_count.shape == (num_heads, num_blocks) and index.block_count.dtype == torch.int32
    assert index.column_index.dtype == torch.int32 and index.block_offset.dtype == torch.int32
    for h in range(num_heads):
        for b in range(num_blocks):
            blocks, cols = expected[h][b]
            assert index.block_count[h, b] == len(blocks)
            assert index.block_offset[h, b, : len(blocks)].tolist() == blocks
            assert index.column_count[h, b] == len(cols)
            assert index.column_index[h, b, : len(cols)].tolist() == cols

    # covered set of each row: verticals and slash keys included; the only extras are the documented ones
    offset = num_kv - num_q
    covered = covered_sets(index, num_q, num_kv, causal)
    for h in range(num_heads):
        verts = {c for c in v[h].tolist() if 0 <= c < num_kv}
        for i in range(num_q):
            visible = set(range(num_kv if not causal else max(0, min(num_kv, i + offset + 1))))
            blocks, cols = expected[h][i // block_m]
            dense = {j for st in blocks for j in range(st, st + block_n)}
            assert covered[h][i] == (dense | set(cols)) & visible  # the mask oracle is the index, exactly
            slash_keys = {i + offset - d for d in s[h].tolist() if not causal or d >= 0}
            exact = (verts | slash_keys) & visible
            assert exact <= covered[h][i]
            assert covered[h][i] <= visible
            b = i // block_m
            start, end = b * block_m, min(b * block_m + block_m, num_q)
            band = {r + offset - d for d in s[h].tolist() for r in range(start, end) if not causal or d >= 0}
            for j in covered[h][i] - exact - band:  # gap fill or group tail: within block_n of a band key
                assert any(abs(j - x) < block_n for x in band), (h, i, j)


def test_no_double_counting():
    v, s = random_indices(4, 30, 40, 100, 300, seed=5, causal=False)
    for causal in (True, False):
        index = build_vertical_slash_index(v, s, 100, 300, causal=causal, block_m=8, block_n=8)
        for h in range(4):
            for b in range(index.block_count.shape[1]):
                starts = index.block_offset[h, b, : index.block_count[h, b]].tolist()
                assert all(b2 - b1 >= 8 for b1, b2 in zip(starts, starts[1:]))  # disjoint, ascending
                cols = index.column_index[h, b, : index.column_count[h, b]].tolist()
                assert cols == sorted(set(cols))
                assert not any(st <= c < st + 8 for c in cols for st in starts)


def test_chunked_heads_equal_one_shot(monkeypatch):
    import qwen1m.attention.vertical_slash as vs

    v, s = random_indices(5, 11, 13, 37, 90, seed=3, causal=True)
    whole = build_vertical_slash_index(v, s, 37, 90, causal=True, block_m=8, block_n=4)
    monkeypatch.setattr(vs, "_MAX_ELEMENTS", 1)  # one head per step
    split = build_vertical_slash_index(v, s, 37, 90, causal=True, block_m=8, block_n=4)
    assert torch.equal(whole.block_count, split.block_count)
    assert torch.equal(whole.column_count, split.column_count)
    for name in ("block_offset", "column_index"):
        a, b = getattr(whole, name), getattr(split, name)
        width = max(a.shape[-1], b.shape[-1])
        assert torch.equal(torch.nn.functional.pad(a, (0, width - a.shape[-1])),
                           torch.nn.functional.pad(b, (0, width - b.shape[-1])))


def test_zero_queries_and_zero_keys():
    v, s = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)
    index = build_vertical_slash_index(v, s, 0, 10, causal=True, block_m=4, block_n=4)
    assert index.block_count.shape == (2, 0)
    index = build_vertical_slash_index(v, s, 5, 0, causal=False, block_m=4, block_n=4)
    assert (index.block_count == 0).all() and (index.column_count == 0).all()


@pytest.mark.parametrize("causal", [True, False])
def test_full_budget_reference_equals_attend(causal):
    num_q, num_kv = 23, 41
    g = torch.Generator().manual_seed(0)
    q = torch.randn(num_q, 4, 16, generator=g, dtype=torch.float64)
    k = torch.randn(num_kv, 2, 16, generator=g, dtype=torch.float64)
    val = torch.randn(num_kv, 2, 16, generator=g, dtype=torch.float64)
    s = torch.arange(-num_q, num_kv + 1).expand(4, -1)  # every diagonal
    v = torch.empty(4, 0, dtype=torch.long)
    index = build_vertical_slash_index(v, s, num_q, num_kv, causal=causal, block_m=8, block_n=8)
    out, lse = sparse_attend_reference(q, k, val, index, softmax_scale=0.25, causal=causal)
    ref_out, ref_lse = attend(q, k, val, softmax_scale=0.25, causal=causal)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_reference_empty_rows():
    v, s = torch.empty(2, 0, dtype=torch.long), torch.empty(2, 0, dtype=torch.long)
    index = build_vertical_slash_index(v, s, 9, 12, causal=True, block_m=4, block_n=4)
    q, k = torch.randn(9, 2, 16), torch.randn(12, 1, 16)
    out, lse = sparse_attend_reference(q, k, k, index, softmax_scale=0.25, causal=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
