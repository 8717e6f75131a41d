"""paged_decode_attention_multi (R key ranges, one query rotation each, one split + one reduce launch)
vs the LSE merge of per-range paged_decode_reference calls in float64.

CPU: TRITON_INTERPRET=1 at small sizes. As in test_paged_decode.py, every cache slot outside the
union of a sequence's ranges, every hole of the block tables and every spare block is NaN, and the
kernel's outputs and workspaces are NaN-poisoned, so a wrong slot read or a piece left unwritten
fails. Ranges include empty ones (alone and next to others) and rows with every range empty.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from qwen1m.attention.reference import paged_decode_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
cpu_only = pytest.mark.skipif(not INTERPRET, reason="CPU tests run through TRITON_INTERPRET=1")
FP8 = torch.float8_e4m3fn


def make_multi(ranges, num_heads, num_kv_heads, head_dim, block_size, cache_dtype, q_dtype, seed=0, spare_blocks=2):
    """ranges[r][b] = (start, end): range r of sequence b (a sequence's ranges are disjoint).

    Returns q [R, batch, num_heads, head_dim], k_cache, v_cache, block_tables, kv_start, kv_end
    ([R, batch] int32), k_scale, v_scale (fp8 only). Keys exist at the union of a sequence's ranges;
    physical blocks are shuffled across sequences, holes point at a NaN block, other slots are NaN.
    """
    g = torch.Generator().manual_seed(seed)
    num_ranges, batch = len(ranges), len(ranges[0])
    keys = [sorted({t for r in range(num_ranges) for t in range(*ranges[r][b])}) for b in range(batch)]
    needed = [sorted({t // block_size for t in ks}) for ks in keys]
    num_blocks = sum(len(n) for n in needed) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g).tolist()
    nan_block = perm.pop()
    width = max([math.ceil(max(ks, default=0) / block_size) + 1 for ks in keys]) + 1
    block_tables = torch.full((batch, width), nan_block, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    k_scale, v_scale = torch.full(shape[:3], float("nan")), torch.full(shape[:3], float("nan"))
    for b in range(batch):
        for blk in needed[b]:
            block_tables[b, blk] = perm.pop()
        pos = torch.tensor(keys[b], dtype=torch.long)
        phys, slot, n = block_tables[b, pos // block_size].long(), pos % block_size, len(keys[b])
        k_cache[phys, slot] = torch.randn(n, num_kv_heads, head_dim, generator=g)
        v_cache[phys, slot] = torch.randn(n, num_kv_heads, head_dim, generator=g)
        k_scale[phys, slot] = torch.rand(n, num_kv_heads, generator=g) * 0.5 + 0.1
        v_scale[phys, slot] = torch.rand(n, num_kv_heads, generator=g) * 0.5 + 0.1
    q = torch.randn(num_ranges, batch, num_heads, head_dim, generator=g).to(q_dtype)
    kv_start = torch.tensor([[s for s, _ in rr] for rr in ranges], dtype=torch.int32)
    kv_end = torch.tensor([[e for _, e in rr] for rr in ranges], dtype=torch.int32)
    if cache_dtype == FP8:
        return q, (k_cache * 4).to(FP8), (v_cache * 4).to(FP8), block_tables, kv_start, kv_end, k_scale, v_scale
    return q, k_cache.to(cache_dtype), v_cache.to(cache_dtype), block_tables, kv_start, kv_end, None, None


def merged_reference(inputs, softmax_scale):
    """float64 LSE merge of the R per-range paged_decode_reference results: out [B, H, D], lse [B, H]."""
    q, k_cache, v_cache, block_tables, kv_start, kv_end, k_scale, v_scale = inputs
    k64 = k_cache if k_cache.dtype == FP8 else k_cache.double()
    v64 = v_cache if v_cache.dtype == FP8 else v_cache.double()
    outs, lses = [], []
    for r in range(q.shape[0]):
        o, lse = paged_decode_reference(q[r].double(), k64, v64, block_tables, kv_start[r], kv_end[r],
                                        softmax_scale, k_scale, v_scale)
        outs.append(o.double())
        lses.append(lse.double())
    lses = torch.stack(lses)  # [R, B, H]
    total = torch.logsumexp(lses, dim=0)
    safe = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    w = torch.exp(lses - safe)  # empty ranges: exp(-inf) = 0
    out = sum(w[r][..., None] * outs[r] for r in range(len(outs)))
    return out, total


# out tolerance vs the float64 merge, by cache dtype: fp32 maths; bf16: probabilities and V in bf16
# (~5e-3 seen); fp8: V dequantised to bf16, values ~4x larger (~1.2e-2 seen). A wrong range, query or
# weight gives errors of order 1. LSE: float32 scores in every case (~7e-7 seen).
OUT_TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, FP8: 3e-2}
LSE_TOL = 2e-6


def check_multi(out, lse, inputs, softmax_scale):
    q, k_cache = inputs[0], inputs[1]
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert out.shape == q.shape[1:] and lse.shape == q.shape[1:3]
    assert not out.isnan().any() and not lse.isnan().any(), "NaN: a poisoned slot was read or an output unwritten"
    ref_out, ref_lse = merged_reference(inputs, softmax_scale)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "rows with no key must (only they) give lse = -inf"
    assert (out[empty] == 0).all()
    out_err = (out.double() - ref_out).abs().max().item()
    assert out_err <= OUT_TOL[k_cache.dtype], f"out error {out_err:.3g}"
    if (~empty).any():
        lse_err = (lse.double() - ref_lse)[~empty].abs().max().item()
        assert lse_err <= LSE_TOL, f"lse error {lse_err:.3g}"


@pytest.fixture
def poisoned(monkeypatch):
    """NaN-fill every output / workspace the wrapper allocates."""
    from qwen1m.kernels import paged_decode

    monkeypatch.setattr(paged_decode, "_empty",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def dca_ranges(lengths, s):
    """Design §2.4 per sequence of length L, n = (L - 1) // s: intra [n s, L), succ [(n-1) s, n s), inter
    [0, (n-1) s), empty (0, 0) where they do not exist; returned as ranges[r][b]."""
    rows = []
    for length in lengths:
        n = (length - 1) // s
        rows.append([(n * s, length), ((n - 1) * s, n * s) if n >= 1 else (0, 0),
                     (0, (n - 1) * s) if n >= 2 else (0, 0)])
    return [[row[r] for row in rows] for r in range(3)]


# (ranges[r][b], num_heads, num_kv_heads, head_dim, block_size). Interpreter tiles are 16 keys:
# block_size 4 takes the per-token block lookup, 16 the one-entry-per-tile path.
CASES = [
    ([[(0, 1), (5, 70), (0, 0)]], 4, 2, 32, 16),  # R = 1, one empty row
    ([[(0, 0), (40, 77), (3, 3)], [(10, 30), (0, 0), (9, 9)]], 4, 2, 32, 4),  # R = 2, empty ranges, an all-empty row
    (dca_ranges([5, 24, 25, 49, 50, 93], 24), 4, 2, 32, 16),  # R = 3, DCA layout (s = 24): 1, 2, 3 non-empty
    ([[(50, 61), (0, 0)], [(17, 50), (33, 34)], [(0, 17), (0, 0)]], 8, 1, 64, 4),  # GQA 8/1, unaligned
]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (FP8, torch.bfloat16)]


@cpu_only
@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("cache_dtype,q_dtype", DTYPES, ids=["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("ranges,num_heads,num_kv_heads,head_dim,block_size", CASES,
                         ids=["R1", "R2", "R3-dca", "R3-gqa"])
def test_multi_matches_merged_reference(ranges, num_heads, num_kv_heads, head_dim, block_size, cache_dtype,
                                        q_dtype, num_splits, poisoned):
    from qwen1m.kernels.paged_decode import paged_decode_attention_multi

    inputs = make_multi(ranges, num_heads, num_kv_heads, head_dim, block_size, cache_dtype, q_dtype,
                        seed=len(ranges) * 10 + head_dim)
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = paged_decode_attention_multi(*inputs[:6], scale, *inputs[6:], num_splits=num_splits)
    check_multi(out, lse, inputs, scale)


@cpu_only
def test_multi_equals_merge_of_single_range_kernels(poisoned):
    """float32: the one-launch result == merge_attn_states of three paged_decode_attention calls."""
    from qwen1m.attention.reference import merge_attn_states
    from qwen1m.kernels.paged_decode import paged_decode_attention, paged_decode_attention_multi

    inputs = make_multi(dca_ranges([3, 30, 70, 71], 24), 4, 2, 32, 16, torch.float32, torch.float32, seed=11)
    q, kc, vc, bt, starts, ends, _, _ = inputs
    out, lse = paged_decode_attention_multi(q, kc, vc, bt, starts, ends, 0.2, num_splits=2)
    parts = [paged_decode_attention(q[r], kc, vc, bt, starts[r], ends[r], 0.2, num_splits=2) for r in range(3)]
    ref_out, ref_lse = merge_attn_states([(o, lse_r.t()) for o, lse_r in parts])
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse.t(), rtol=1e-6, atol=1e-6)


@cpu_only
def test_multi_strided_inputs_and_tiles_spanning_blocks(poisoned):
    """q / kv_start / kv_end as non-contiguous views, BLOCK_N 32 over 16-token blocks, 5 splits."""
    from qwen1m.kernels.paged_decode import paged_decode_attention_multi

    inputs = make_multi(dca_ranges([9, 60, 77], 24), 4, 2, 32, 16, torch.float32, torch.float32, seed=5)
    q, kc, vc, bt, starts, ends, _, _ = inputs
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # [R, B, H, D] with permuted strides
    se = torch.stack([starts, ends], dim=-1)  # kv_start = se[..., 0]: stride 2 over the batch
    config = dict(BLOCK_N=32, num_warps=4, num_stages=1)
    out, lse = paged_decode_attention_multi(q_t, kc, vc, bt, se[..., 0], se[..., 1], 0.2, num_splits=5,
                                            config=config)
    check_multi(out, lse, inputs, 0.2)


@cpu_only
def test_multi_rejects_bad_inputs():
    from qwen1m.kernels.paged_decode import paged_decode_attention_multi

    q, kc, vc, bt, starts, ends, _, _ = make_multi([[(0, 8)], [(8, 9)]], 4, 2, 32, 4, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="num_ranges"):
        paged_decode_attention_multi(q[0], kc, vc, bt, starts, ends, 0.1)
    with pytest.raises(ValueError, match="kv_start"):
        paged_decode_attention_multi(q, kc, vc, bt, starts[0], ends, 0.1)
    with pytest.raises(ValueError, match="kv_end"):
        paged_decode_attention_multi(q, kc, vc, bt, starts, ends.long(), 0.1)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention_multi(q, kc, vc, bt.long(), starts, ends, 0.1)


# (batch, sequence lengths, cache dtype): Qwen2.5-7B shapes, DCA ranges with s = 7168 (c = 8192, w = 1024)
GPU_CASES = [(1, [30001], torch.bfloat16), (32, None, torch.bfloat16), (8, None, FP8)]


@pytest.mark.gpu
@pytest.mark.parametrize("batch,lengths,cache_dtype", GPU_CASES)
def test_multi_gpu(batch, lengths, cache_dtype, poisoned):
    from qwen1m.kernels.paged_decode import paged_decode_attention_multi

    if lengths is None:  # 1 to 3 non-empty ranges, lengths not block-aligned
        g = torch.Generator().manual_seed(batch)
        lengths = [int(x) for x in torch.randint(1, 20000, (batch,), generator=g)]
        lengths[0] = 7168  # exactly one chunk: succ and inter empty
    inputs = make_multi(dca_ranges(lengths, 7168), 28, 4, 128, 64, cache_dtype, torch.bfloat16, seed=1)
    inputs = tuple(t.cuda() if t is not None else None for t in inputs)
    scale = 128**-0.5
    for num_splits in (None, 1, 7):
        out, lse = paged_decode_attention_multi(*inputs[:6], scale, *inputs[6:], num_splits=num_splits)
        torch.cuda.synchronize()
        check_multi(out, lse, inputs, scale)


# ---- many pieces, pieces over range boundaries, the default split count of R ranges ----


@cpu_only
def test_multi_many_pieces(poisoned):
    """R = 3 and num_splits = 22: 66 pieces per row over the concatenated tiles of the three ranges.
    Rows: only the last range non-empty (short: most pieces get no tile), all three, a long first
    range and a one-key middle one, every range empty."""
    from qwen1m.kernels.paged_decode import paged_decode_attention_multi

    ranges = [[(0, 0), (0, 40), (0, 600), (0, 0)],
              [(0, 0), (40, 75), (600, 601), (0, 0)],
              [(3, 90), (75, 130), (601, 640), (0, 0)]]
    inputs = make_multi(ranges, 4, 1, 32, 16, torch.float32, torch.float32, seed=21)
    out, lse = paged_decode_attention_multi(*inputs[:6], 0.2, num_splits=22)
    check_multi(out, lse, inputs, 0.2)


def capture_reduce(monkeypatch):
    """Record the workspaces _launch hands to the reduce (and still reduce them)."""
    from qwen1m.kernels import paged_decode

    seen = []
    real = paged_decode._reduce

    def spy(part_out, part_lse, out, lse):
        seen.append((part_out.clone(), part_lse.clone()))
        real(part_out, part_lse, out, lse)

    monkeypatch.setattr(paged_decode, "_reduce", spy)
    return seen


@cpu_only
def test_multi_pieces_run_across_ranges(poisoned, monkeypatch):
    """Ranges 0 and 2 of 50 keys with range 1 empty between them, num_splits = 1: the 8 tiles (16 keys;
    tile 3 holds keys of both ranges) are cut into 3 pieces of 3, 3 and 2 tiles. Piece 1 ends range 0
    and starts range 2 (two queries in one program); the empty range takes no piece, so all three
    pieces hold keys (with one piece per range, piece 1 would be range 1's, empty)."""
    from qwen1m.kernels.paged_decode import paged_decode_attention_multi

    seen = capture_reduce(monkeypatch)
    ranges = [[(0, 50), (5, 9)], [(50, 50), (0, 0)], [(50, 100), (9, 40)]]
    inputs = make_multi(ranges, 4, 2, 32, 16, torch.float32, torch.float32, seed=8)
    out, lse = paged_decode_attention_multi(*inputs[:6], 0.2, num_splits=1)
    check_multi(out, lse, inputs, 0.2)
    (part_out, part_lse), = seen
    assert part_lse.shape == (2, 4, 3)
    assert torch.isfinite(part_lse[0]).all(), "a piece of sequence 0 holds no key"
    # piece 1 of sequence 0: keys 48, 49 of range 0 (query 0) and keys 50..79 of range 2 (query 2)
    q, k_cache, v_cache, block_tables = inputs[:4]
    pos = torch.arange(48, 80)
    k = k_cache[block_tables[0, pos // 16].long(), pos % 16].double()  # [32, kv_heads, D]
    group = q.shape[2] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    q_rows = torch.where((pos < 50)[:, None, None], q[0, 0].double()[None], q[2, 0].double()[None])
    scores = (q_rows * k).sum(-1) * 0.2  # [32, heads]
    torch.testing.assert_close(part_lse[0, :, 1].double(), torch.logsumexp(scores, dim=0), rtol=1e-6, atol=1e-6)


@cpu_only
def test_multi_default_splits_per_range(poisoned, monkeypatch):
    """num_splits=None: choose_num_splits gets num_ranges = R, each range's splits fill the GPU and
    the piece floor counts every range. CPU plan: 4 "SMs" * 4 programs = 16; batch 1, 1 kv head,
    R = 3, max_len = 300 blocks * 16 = 4800: splits = min(cdiv(16, 1), cdiv(4800, 768)) = 7, 21 pieces."""
    from qwen1m.kernels.paged_decode import paged_decode_attention_multi

    seen = capture_reduce(monkeypatch)
    ranges = [[(70, 100)], [(40, 70)], [(0, 40)]]
    q, kc, vc, bt, starts, ends, _, _ = make_multi(ranges, 4, 1, 32, 16, torch.float32, torch.float32, seed=4)
    bt = torch.cat([bt, bt[:, -1:].expand(1, 300 - bt.shape[1])], dim=1)  # wider table: the NaN block
    out, lse = paged_decode_attention_multi(q, kc, vc, bt, starts, ends, 0.2)
    check_multi(out, lse, (q, kc, vc, bt, starts, ends, None, None), 0.2)
    (part_out, part_lse), = seen
    assert part_lse.shape[-1] == 21
