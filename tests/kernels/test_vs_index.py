"""build_vertical_slash_index_triton vs the PyTorch builder build_vertical_slash_index (the oracle).

Exact equality: same block_count and column_count, same valid entries of block_offset and column_index
in the same order (the padding past the counts is undefined and the widths are upper bounds).
CPU: TRITON_INTERPRET=1 (tests/conftest.py) at small sizes, many query blocks per program (its cost is
per operation) and small tiles, so that the carries between slash tiles, slot chunks and column tiles
are exercised; a few cases with the GPU's launch shape (one query block per program, 256-wide tiles,
tl.associative_scan). GPU (-m gpu): the Qwen2.5-7B budget (28 heads, 1000 verticals, 6096 slashes).
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from qwen1m.attention.vertical_slash import (
    VerticalSlashIndex,
    build_vertical_slash_index,
    vertical_slash_mask,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
cpu_only = pytest.mark.skipif(not INTERPRET, reason="CPU tests run through TRITON_INTERPRET=1")
SMALL_TILES = (8, 4, 8)  # slash tile, slot chunk, column tile


def build_triton(v, s, num_q, num_kv, *, causal, block_m, block_n, **launch):
    from qwen1m.kernels.vs_index import _build

    return _build(v, s, num_q, num_kv, causal=causal, block_m=block_m, block_n=block_n, **launch)


def assert_same_index(ref: VerticalSlashIndex, out: VerticalSlashIndex) -> None:
    assert (out.num_q, out.num_kv, out.causal, out.block_m, out.block_n) == (
        ref.num_q, ref.num_kv, ref.causal, ref.block_m, ref.block_n)
    for name in ("block_count", "block_offset", "column_count", "column_index"):
        assert getattr(out, name).dtype == torch.int32 and getattr(out, name).device == ref.block_count.device
    assert torch.equal(out.block_count, ref.block_count)
    assert torch.equal(out.column_count, ref.column_count)
    for entries, counts in (("block_offset", "block_count"), ("column_index", "column_count")):
        a, b, n = getattr(ref, entries), getattr(out, entries), getattr(ref, counts)
        assert b.shape[:2] == a.shape[:2]
        if n.numel() == 0:
            continue
        used = int(n.max())
        assert used <= b.shape[-1] and used <= a.shape[-1]
        valid = torch.arange(used, device=n.device) < n[..., None]
        assert torch.equal(torch.where(valid, a[..., :used], 0), torch.where(valid, b[..., :used], 0)), entries


def check(v, s, num_q, num_kv, *, causal, block_m, block_n, **launch):
    ref = build_vertical_slash_index(v, s, num_q, num_kv, causal=causal, block_m=block_m, block_n=block_n)
    out = build_triton(v, s, num_q, num_kv, causal=causal, block_m=block_m, block_n=block_n, **launch)
    assert_same_index(ref, out)
    from qwen1m.kernels.vs_index import index_widths

    assert (out.block_offset.shape[-1], out.column_index.shape[-1]) == index_widths(
        v.shape[1], s.shape[1], num_q, num_kv, causal=causal, block_m=block_m, block_n=block_n)
    return ref, out


def random_case(seed: int):
    """Odd sizes, out-of-range values, duplicates, -1 padding, slashes at the edges, empty sets."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    causal = seed % 2 == 0
    block_m, block_n = [(4, 4), (8, 4), (4, 8), (3, 5), (16, 8), (6, 6)][seed % 6]
    num_q = r(1, 70) if seed % 5 else r(1, block_m - 1 if block_m > 1 else 1)  # sometimes < block_m
    num_kv = r(0, 150) if causal or seed % 3 else r(0, 12)
    num_heads = r(1, 3)
    nv = 0 if seed % 7 == 3 else r(1, 25)
    ns = 0 if seed % 7 == 5 else r(1, 45)
    v = torch.randint(-3, num_kv + 4, (num_heads, nv), generator=g)
    s = torch.randint(-num_q - 3, num_kv + 3, (num_heads, ns), generator=g)
    if nv >= 6:
        v[:, :3] = -1  # padding
        v[:, 3] = v[:, 4]  # duplicate
        v[:, 5] = num_kv - 1
    if ns >= 8:
        s[:, 0], s[:, 1], s[:, 2], s[:, 3] = 0, num_kv - 1, 1 - num_q, num_kv
        s[:, 4], s[:, 5] = -1, -num_q  # padding / just out of range (non-causal), out of range (causal)
        s[:, 6] = s[:, 7]  # duplicate
    if seed % 4 == 1 and ns:  # a dense run of diagonals: groups spanning several tiles and slot chunks
        run = torch.arange(-min(num_q - 1, 5), min(num_kv, ns))[:ns]
        s[:, : run.numel()] = run
    return v, s, num_q, num_kv, causal, block_m, block_n


@cpu_only
@pytest.mark.parametrize("seed", range(60))
def test_matches_torch_builder(seed):
    v, s, num_q, num_kv, causal, block_m, block_n = random_case(seed)
    check(v, s, num_q, num_kv, causal=causal, block_m=block_m, block_n=block_n, tiles=SMALL_TILES)


ONE_ROW = dict(rows=1, tiles=SMALL_TILES)  # one query block per program
GPU_TILES = dict(rows=4, tiles=(256, 256, 256))  # the GPU's tiles: one tile each
SCAN = dict(rows=2, tiles=SMALL_TILES, scan_2d=False)  # tl.associative_scan, the GPU's running max


@cpu_only
@pytest.mark.parametrize("seed,launch", [(1, ONE_ROW), (13, ONE_ROW), (4, ONE_ROW), (2, GPU_TILES), (9, GPU_TILES),
                                         (13, GPU_TILES), (1, SCAN), (9, SCAN), (12, SCAN)])
def test_launch_shapes(seed, launch):
    v, s, num_q, num_kv, causal, block_m, block_n = random_case(seed)
    check(v, s, num_q, num_kv, causal=causal, block_m=block_m, block_n=block_n, **launch)


@cpu_only
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_q,num_kv,nv,ns,block_m,block_n", [
    (37, 83, 0, 9, 8, 8),  # no verticals
    (37, 83, 9, 0, 8, 8),  # no slashes
    (19, 30, 0, 0, 4, 4),  # nothing
    (3, 40, 5, 7, 16, 8),  # one partial query block
    (40, 17, 6, 8, 4, 4),  # num_q > num_kv: causal rows without keys
    (5, 0, 3, 4, 4, 4),  # no keys
    (1, 1, 1, 1, 4, 4),
])
def test_edge_shapes(num_q, num_kv, nv, ns, block_m, block_n, causal):
    g = torch.Generator().manual_seed(num_q + nv + ns)
    v = torch.randint(-2, num_kv + 2, (2, nv), generator=g)
    s = torch.randint(-num_q - 1, num_kv + 1, (2, ns), generator=g)
    check(v, s, num_q, num_kv, causal=causal, block_m=block_m, block_n=block_n, tiles=SMALL_TILES)


@cpu_only
def test_empty_launches():
    """No query or no head: nothing to launch, the shapes of the PyTorch builder (widths aside)."""
    for heads, num_q in ((2, 0), (0, 9)):
        v, s = torch.zeros(heads, 3, dtype=torch.long), torch.zeros(heads, 4, dtype=torch.long)
        ref, out = check(v, s, num_q, 10, causal=True, block_m=4, block_n=4)
        assert out.block_count.shape == (heads, math.ceil(num_q / 4))


@cpu_only
@pytest.mark.parametrize("causal", [True, False])
def test_all_diagonals_and_columns(causal):
    """Every diagonal and every column: one group per query block spanning many slash tiles and slot
    chunks, every column inside it."""
    num_q, num_kv = 45, 130
    s = torch.arange(1 - num_q, num_kv).flip(0).expand(3, -1)
    v = torch.arange(num_kv).expand(3, -1)
    check(v, s, num_q, num_kv, causal=causal, block_m=8, block_n=4, tiles=SMALL_TILES)


@cpu_only
@pytest.mark.parametrize("block_m,block_n", [(4, 4), (8, 4), (4, 8), (5, 3)])
def test_width_bound_worst_case(block_m, block_n):
    """Slashes spaced block_m + block_n - 1 apart: each joins the previous group with the widest gap,
    the most blocks per slash; the count stays within index_widths and reaches the per-slash part."""
    from qwen1m.kernels.vs_index import index_widths

    ns, num_q = 9, block_m
    step = block_m + block_n - 1
    num_kv = ns * step + 2 * block_n
    s = (torch.arange(ns) * step).expand(2, -1)
    ref, out = check(torch.empty(2, 0, dtype=torch.long), s, num_q, num_kv, causal=False, block_m=block_m,
                     block_n=block_n, tiles=SMALL_TILES)
    width, _ = index_widths(0, ns, num_q, num_kv, causal=False, block_m=block_m, block_n=block_n)
    # one group spanning (ns - 1) * step + block_m keys: ns * step // block_n blocks, the bound exactly
    assert int(out.block_count.max()) == ns * step // block_n == width


@cpu_only
@pytest.mark.parametrize("seed", [0, 3, 4, 7])
def test_same_mask(seed):
    """The index as a key set (vertical_slash_mask reads within the counts): equal, padding poisoned."""
    v, s, num_q, num_kv, causal, block_m, block_n = random_case(seed)
    ref = build_vertical_slash_index(v, s, num_q, num_kv, causal=causal, block_m=block_m, block_n=block_n)
    out = poison(build_triton(v, s, num_q, num_kv, causal=causal, block_m=block_m, block_n=block_n,
                              tiles=SMALL_TILES))
    assert torch.equal(vertical_slash_mask(out, num_q, num_kv, causal),
                       vertical_slash_mask(ref, num_q, num_kv, causal))


def poison(index: VerticalSlashIndex) -> VerticalSlashIndex:
    """The padding past the counts set to values no consumer may use."""
    def fill(x, n, value):
        pad = torch.arange(x.shape[-1], device=x.device) >= n[..., None]
        return torch.where(pad, torch.full_like(x, value), x)

    return dataclasses.replace(index, block_offset=fill(index.block_offset, index.block_count, -(1 << 30)),
                               column_index=fill(index.column_index, index.column_count, (1 << 30) + 7))


@cpu_only
@pytest.mark.parametrize("causal", [True, False])
def test_consumers_read_within_counts(causal):
    """The CPU gather path and the Triton sparse kernel give identical results with the Triton index
    (poisoned padding, wider than needed) and with the PyTorch one."""
    from qwen1m.attention.sparse_prefill import sparse_attend_gather
    from qwen1m.kernels.sparse_attn import vertical_slash_attention

    num_q, num_kv, heads, kv_heads, head_dim = 37, 83, 4, 2, 16
    g = torch.Generator().manual_seed(1)
    q = torch.randn(num_q, heads, head_dim, generator=g)
    k = torch.randn(num_kv, kv_heads, head_dim, generator=g)
    val = torch.randn(num_kv, kv_heads, head_dim, generator=g)
    v = torch.randint(-2, num_kv + 2, (heads, 7), generator=g)
    s = torch.randint(-num_q, num_kv, (heads, 9), generator=g)
    s[:, 0] = 0
    ref = build_vertical_slash_index(v, s, num_q, num_kv, causal=causal, block_m=16, block_n=16)
    out = poison(build_triton(v, s, num_q, num_kv, causal=causal, block_m=16, block_n=16))
    for fn in (sparse_attend_gather, vertical_slash_attention):
        a = fn(q, k, val, ref, softmax_scale=0.25, causal=causal)
        b = fn(q, k, val, out, softmax_scale=0.25, causal=causal)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), fn.__name__


def region_index_with_sync(v_idx, s_idx, key_begin, key_end, piece_begin, piece_end, causal, cfg):
    """sparse_prefill._region_index as it was: the fallback columns appended after a host sync."""
    num_q, num_kv = piece_end - piece_begin, key_end - key_begin
    cols = torch.where((v_idx >= key_begin) & (v_idx < key_end), v_idx - key_begin, torch.full_like(v_idx, -1))
    d = torch.where(s_idx >= 0, s_idx - (piece_end - key_end), torch.full_like(s_idx, -(1 << 40)))
    lo = 0 if causal else 1 - num_q
    has_slash = ((d >= lo) & (d <= num_kv - 1)).any(-1)
    has_col = (cols >= 0).any(-1)
    if cfg.empty_region_columns and not bool((has_slash | has_col).all()):
        spread = torch.linspace(0, num_kv - 1, cfg.empty_region_columns, device=cols.device).long()
        empty = ~(has_slash | has_col)
        fallback = torch.where(empty[:, None], spread[None, :], torch.full_like(spread, -1)[None, :])
        cols = torch.cat([cols, fallback], dim=1)
    return build_vertical_slash_index(cols, d, num_q, num_kv, causal=causal, block_m=cfg.block_size,
                                      block_n=cfg.block_size)


@pytest.mark.parametrize("case", range(4))
def test_region_index_without_sync(case):
    """_region_index appends the fallback columns (-1 for heads that have picks) without a host sync:
    the same index as deciding first (the CPU path, widths included)."""
    from qwen1m.attention.kernel_choice import KernelChoice
    from qwen1m.attention.sparse_prefill import _region_index
    from qwen1m.sparse_config import SparseConfig

    cfg = SparseConfig.uniform(1, 4, 8, 8, last_q=4, block_size=4)
    g = torch.Generator().manual_seed(case)
    piece_begin, piece_end = 40, 57
    v = torch.randint(0, piece_end, (4, 6), generator=g)
    s = torch.randint(0, piece_end, (4, 5), generator=g)
    if case >= 1:  # head 1 picks nothing in the region [0, 20): no column, only slashes reaching past it
        v[1], s[1] = 30 + torch.arange(6) % 3, torch.tensor([0, 1, 2, -1, -1])
    if case >= 2:  # every head empty
        v[:], s[:] = 30, 0
    if case == 3:
        cfg = dataclasses.replace(cfg, empty_region_columns=0)
    for region in ((0, 20, False), (20, 40, False), (40, 57, True)):
        a = _region_index(v, s, region[0], region[1], piece_begin, piece_end, region[2], cfg, KernelChoice())
        b = region_index_with_sync(v, s, region[0], region[1], piece_begin, piece_end, region[2], cfg)
        for name in ("block_count", "block_offset", "column_count", "column_index"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (case, region, name)
    if case in (1, 2):
        index = _region_index(v, s, 0, 20, piece_begin, piece_end, False, cfg, KernelChoice())
        assert (index.column_count[1] > 0).all()


def gpu_indices(num_heads, num_q, num_kv, nv, ns, seed, causal):
    """Sinks and local diagonals always, the other columns uniform, the other slashes log-uniform
    (mostly near, a few far: groups of all sizes), plus duplicates and -1 padding."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    v = torch.randint(0, num_kv, (num_heads, nv), generator=g, device="cuda")
    v[:, :30] = torch.arange(30, device="cuda")
    far = torch.exp(torch.rand(num_heads, ns, generator=g, device="cuda") * math.log(num_kv)).long() - 1
    s = far if causal else far - num_q // 2
    s[:, :100] = torch.arange(100, device="cuda")
    v[:, -5:], s[:, -5:] = -1, -1
    return v, s


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_q,num_kv", [(8192, 65536), (4096, 4096), (1000, 5003)])
def test_matches_torch_builder_gpu(num_q, num_kv, causal):
    from qwen1m.kernels.vs_index import build_vertical_slash_index_triton

    for seed, uniform in ((0, False), (1, True)):
        v, s = gpu_indices(28, num_q, num_kv, 1000, 6096, seed, causal)
        if uniform:  # slashes spread evenly: the most blocks
            s[:, 100:-5] = torch.randint(0 if causal else 1 - num_q, num_kv, (28, 6096 - 105), device="cuda")
        for block in (64, 128):
            ref = build_vertical_slash_index(v, s, num_q, num_kv, causal=causal, block_m=block, block_n=block)
            out = build_vertical_slash_index_triton(v, s, num_q, num_kv, causal=causal, block_m=block, block_n=block)
            assert_same_index(ref, out)
