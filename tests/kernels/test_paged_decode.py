"""paged_decode_attention (Triton, split-K) vs paged_decode_reference, and the reference vs attend.

CPU: TRITON_INTERPRET=1 (tests/kernels/conftest.py) at small sizes. Every cache slot outside the
attended ranges, every unused block and every hole of the block tables is NaN, and all kernel
outputs and workspaces are NaN-poisoned before the launch, so reading a wrong slot or leaving an
output unwritten fails the test.
GPU (-m gpu): head_dim 128, 28 q heads / 4 kv heads, 8K-128K keys, batch 1 and 32, bf16 and fp8.
Error bound (design §4.8): max error vs a float64 reference at most 2x that of the same maths in
torch at the working precision (scores, probabilities and output rounded to q's dtype).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from qwen1m.attention.reference import attend, paged_decode_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
cpu_only = pytest.mark.skipif(not INTERPRET, reason="CPU tests run through TRITON_INTERPRET=1")
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}
FP8 = torch.float8_e4m3fn


def make_paged(ranges, num_heads, num_kv_heads, head_dim, block_size, cache_dtype, q_dtype,
               device="cpu", seed=0, spare_blocks=3):
    """Random q and a paged cache holding, for sequence b, keys at logical positions ranges[b].

    Physical blocks are shuffled across sequences; logical blocks with no key in the range (holes)
    and spare blocks are NaN, as are the slots of a used block outside the range. fp8 caches get
    per-token scales (NaN outside the ranges too). Returns q, k_cache, v_cache, block_tables,
    kv_start, kv_end, k_scale, v_scale.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    batch = len(ranges)
    logical = [math.ceil(end / block_size) for _, end in ranges]
    needed = [sorted({t // block_size for t in range(start, end)}) for start, end in ranges]
    num_blocks = sum(len(n) for n in needed) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g, device=device).tolist()
    nan_block = perm.pop()  # holes point here (reading it poisons the result)
    width = max(logical + [1]) + 2
    block_tables = torch.full((batch, width), nan_block, dtype=torch.int32, device=device)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), device=device)
    v_cache = torch.full(shape, float("nan"), device=device)
    k_scale = torch.full(shape[:3], float("nan"), device=device)
    v_scale = torch.full(shape[:3], float("nan"), device=device)
    for b, (start, end) in enumerate(ranges):
        for blk in needed[b]:
            block_tables[b, blk] = perm.pop()
        pos = torch.arange(start, end, device=device)
        phys = block_tables[b, pos // block_size].long()
        slot = pos % block_size
        n = end - start
        k_cache[phys, slot] = torch.randn(n, num_kv_heads, head_dim, generator=g, device=device)
        v_cache[phys, slot] = torch.randn(n, num_kv_heads, head_dim, generator=g, device=device)
        k_scale[phys, slot] = torch.rand(n, num_kv_heads, generator=g, device=device) * 0.5 + 0.1
        v_scale[phys, slot] = torch.rand(n, num_kv_heads, generator=g, device=device) * 0.5 + 0.1
    q = torch.randn(batch, num_heads, head_dim, generator=g, device=device).to(q_dtype)
    kv_start = torch.tensor([s for s, _ in ranges], dtype=torch.int32, device=device)
    kv_end = torch.tensor([e for _, e in ranges], dtype=torch.int32, device=device)
    if cache_dtype == FP8:
        # values of a few units so the e4m3 grid is exercised; NaN stays NaN in e4m3fn
        return (q, (k_cache * 4).to(FP8), (v_cache * 4).to(FP8), block_tables, kv_start, kv_end,
                k_scale, v_scale)
    return q, k_cache.to(cache_dtype), v_cache.to(cache_dtype), block_tables, kv_start, kv_end, None, None


def gathered(k_cache, v_cache, block_tables, start, end, k_scale, v_scale, b):
    """Contiguous K/V [n, num_kv_heads, head_dim] of sequence b's range, dequantised to float32 for fp8."""
    block_size = k_cache.shape[1]
    pos = torch.arange(start, end, device=k_cache.device)
    phys, slot = block_tables[b, pos // block_size].long(), pos % block_size
    k, v = k_cache[phys, slot], v_cache[phys, slot]
    if k_scale is not None:
        k = k.float() * k_scale[phys, slot][..., None]
        v = v.float() * v_scale[phys, slot][..., None]
    return k, v


def torch_decode_lowp(q, k, v, softmax_scale):
    """One query row per head, same maths in torch at q's precision (scores, probabilities, output)."""
    num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    k, v = k.to(q.dtype).repeat_interleave(group, dim=1), v.to(q.dtype).repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,khd->hk", q, k).float() * softmax_scale
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[:, None]).to(q.dtype)
    return torch.einsum("hk,khd->hd", probs, v), lse


def check_kernel(out, lse, inputs, softmax_scale):
    q, k_cache, v_cache, block_tables, kv_start, kv_end, k_scale, v_scale = inputs
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    assert not out.isnan().any() and not lse.isnan().any(), "NaN: a poisoned slot was read or an output unwritten"
    k64 = k_cache if k_cache.dtype == FP8 else k_cache.double()
    v64 = v_cache if v_cache.dtype == FP8 else v_cache.double()
    ref_out, ref_lse = paged_decode_reference(q.double(), k64, v64, block_tables, kv_start, kv_end, softmax_scale,
                                              k_scale, v_scale)
    for b in range(q.shape[0]):
        start, end = int(kv_start[b]), int(kv_end[b])
        if end <= start:
            assert (out[b] == 0).all() and torch.isneginf(lse[b]).all()
            continue
        k, v = gathered(k_cache, v_cache, block_tables, start, end, k_scale, v_scale, b)
        base_out, base_lse = torch_decode_lowp(q[b], k, v, softmax_scale)
        err = (out[b].double() - ref_out[b]).abs().max().item()
        base_err = (base_out.double() - ref_out[b]).abs().max().item()
        assert err <= 2 * base_err + ATOL[q.dtype], f"seq {b}: out error {err:.3g} vs torch {base_err:.3g}"
        lse_err = (lse[b].double() - ref_lse[b]).abs().max().item()
        base_lse_err = (base_lse.double() - ref_lse[b]).abs().max().item()
        assert lse_err <= 2 * base_lse_err + 1e-5, f"seq {b}: lse error {lse_err:.3g} vs torch {base_lse_err:.3g}"


@pytest.fixture
def poisoned(monkeypatch):
    """NaN-fill every output / workspace the wrapper allocates."""
    from qwen1m.kernels import paged_decode

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(paged_decode, "_empty", nan_empty)


# (ranges per sequence, num_heads, num_kv_heads, head_dim, block_size). Interpreter tiles are 16
# keys: block_size 4 takes the per-token block lookup, 16 and 64 the one-entry-per-tile path.
CASES = [
    ([(0, 1)], 4, 2, 32, 4),  # one key
    ([(5, 70)], 8, 1, 32, 16),  # start and end inside blocks and tiles, GQA 8/1
    ([(0, 0), (3, 4), (13, 77), (64, 128), (1, 150)], 4, 2, 32, 4),  # empty, length 1, aligned
    ([(10, 150), (0, 64), (7, 7), (63, 65), (100, 230)], 8, 1, 16, 64),
    ([(30, 95)], 4, 2, 64, 16),
]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (FP8, torch.bfloat16)]


@cpu_only
@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("cache_dtype,q_dtype", DTYPES, ids=["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("ranges,num_heads,num_kv_heads,head_dim,block_size", CASES)
def test_paged_decode_matches_reference(ranges, num_heads, num_kv_heads, head_dim, block_size, cache_dtype, q_dtype,
                                        num_splits, poisoned):
    from qwen1m.kernels.paged_decode import paged_decode_attention

    inputs = make_paged(ranges, num_heads, num_kv_heads, head_dim, block_size, cache_dtype, q_dtype,
                        seed=len(ranges) + head_dim)
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = paged_decode_attention(*inputs[:6], scale, *inputs[6:], num_splits=num_splits)
    check_kernel(out, lse, inputs, scale)


@cpu_only
@pytest.mark.parametrize("block_n,block_size", [(32, 16), (16, 1)])
def test_paged_decode_tiles_spanning_blocks(block_n, block_size, poisoned):
    """Tiles wider than a block (each key looks up its own block), including block_size 1."""
    from qwen1m.kernels.paged_decode import paged_decode_attention

    inputs = make_paged([(3, 61), (16, 17)], 4, 2, 32, block_size, torch.float32, torch.float32, seed=7)
    config = dict(BLOCK_N=block_n, num_warps=4, num_stages=1)
    out, lse = paged_decode_attention(*inputs[:6], 0.2, *inputs[6:], num_splits=5, config=config)
    check_kernel(out, lse, inputs, 0.2)


@cpu_only
def test_paged_decode_rejects_bad_inputs():
    from qwen1m.kernels.paged_decode import paged_decode_attention

    inputs = make_paged([(0, 8)], 4, 2, 48, 4, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(*inputs[:6], 0.1)
    inputs = make_paged([(0, 8)], 4, 2, 32, 4, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(inputs[0], inputs[1], inputs[2], inputs[3].long(), *inputs[4:6], 0.1)
    with pytest.raises(ValueError, match="k_scale"):
        paged_decode_attention(*inputs[:6], 0.1, k_scale=torch.ones(inputs[1].shape[:3]),
                               v_scale=torch.ones(inputs[1].shape[:3]))


def merge_pieces_f64(part_out, part_lse):
    """float64 LSE merge of the pieces (dim 2): out [B, H, D], lse [B, H]; all-empty rows: 0, -inf."""
    lse64 = part_lse.double()
    total = torch.logsumexp(lse64, dim=2)
    safe = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    w = torch.exp(lse64 - safe[..., None])  # -inf pieces: 0
    return (w[..., None] * part_out.double()).sum(2), total


@cpu_only
@pytest.mark.parametrize("reduce_cfg", [None, dict(BLOCK_S=32, BLOCK_D=16, num_warps=4)], ids=["plan", "small"])
def test_reduce_many_pieces(reduce_cfg, monkeypatch):
    """The reduce alone over 300 pieces (plan: 2 sweeps of 256 pieces, 2 head_dim slices of 16; small:
    10 sweeps of 32): rows with every piece empty, only the last piece, only the first, an LSE rising
    to 300 (exp overflows float32 unless the running max is subtracted and rescaled), one falling
    to -300, and a random half of the pieces empty. Empty pieces hold garbage partials (weight 0)."""
    from qwen1m.kernels import paged_decode

    if reduce_cfg is not None:
        monkeypatch.setattr(paged_decode, "reduce_config", lambda pieces, head_dim: reduce_cfg)
    g = torch.Generator().manual_seed(2)
    batch, heads, pieces, head_dim = 2, 3, 300, 32
    part_out = torch.randn(batch, heads, pieces, head_dim, generator=g) * 3
    part_lse = torch.full((batch, heads, pieces), float("-inf"))
    part_lse[0, 1, -1] = 1.5
    part_lse[0, 2, 0] = -2.0
    part_lse[1, 0] = torch.linspace(-5.0, 300.0, pieces)
    part_lse[1, 1] = torch.linspace(4.0, -300.0, pieces)
    keep = torch.rand(pieces, generator=g) < 0.5
    part_lse[1, 2, keep] = torch.randn(int(keep.sum()), generator=g) * 5
    out = torch.full((batch, heads, head_dim), float("nan"))
    lse = torch.full((batch, heads), float("nan"))
    paged_decode._reduce(part_out, part_lse, out, lse)
    ref_out, ref_lse = merge_pieces_f64(part_out, part_lse)
    assert torch.isneginf(lse[0, 0]) and (out[0, 0] == 0).all()
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-5)


def test_choose_num_splits_fills_the_gpu_per_range(monkeypatch):
    """Pure arithmetic, with a 132-SM GPU faked: each range's batch * num_kv_heads * splits programs
    aim at 4 per SM (so R ranges launch R times that), bounded by the piece length floor and the cap."""
    from qwen1m.kernels import paged_decode_plan as plan

    monkeypatch.setattr(plan, "_num_sms", lambda index: 132)
    gpu = torch.device("cuda", 0)  # a device object only: nothing is allocated or queried
    # Qwen2.5-7B decode, batch 1, 4 kv heads: 128 splits at 32K keys (32768 / 256 keys: the floor
    # binds), 132 = cdiv(528, 4) at 128K and 1M keys, for one range or three
    assert plan.choose_num_splits(1, 4, 32768, gpu) == 128
    assert plan.choose_num_splits(1, 4, 32768, gpu, num_ranges=3) == 43  # cdiv(32768, 3 * 256)
    assert plan.choose_num_splits(1, 4, 131072, gpu, num_ranges=3) == 132
    assert plan.choose_num_splits(1, 4, 1 << 20, gpu, num_ranges=3) == 132  # 396 pieces
    assert plan.choose_num_splits(1, 4, 8192, gpu, num_ranges=3) == 11  # cdiv(8192, 3 * 256): pieces >= ~256 keys
    assert plan.choose_num_splits(32, 4, 8192, gpu, num_ranges=3) == 5  # cdiv(528, 128)
    assert plan.choose_num_splits(200, 4, 8192, gpu, num_ranges=3) == 1
    assert plan.choose_num_splits(1, 1, 1 << 20, gpu, num_ranges=3) == 170  # 510 pieces <= _MAX_PIECES
    assert plan.choose_num_splits(1, 4, 1, gpu, num_ranges=3) == 1
    target = plan._PROGRAMS_PER_SM * 132
    for batch in (1, 2, 5, 32, 256):
        for num_kv_heads in (1, 4, 8):
            for max_len in (64, 4096, 32768, 1 << 20):
                for num_ranges in (1, 2, 3):
                    splits = plan.choose_num_splits(batch, num_kv_heads, max_len, gpu, num_ranges)
                    rows = batch * num_kv_heads  # programs of one range per split
                    assert splits >= 1 and num_ranges * splits <= max(plan._MAX_PIECES, num_ranges)
                    assert splits == 1 or rows * (splits - 1) < target  # never a whole step past the target
                    assert splits == 1 or num_ranges * (splits - 1) * plan._MIN_TOKENS_PER_SPLIT < max_len
                    # short of the target only where one more split would break the floor or the cap
                    floor_binds = num_ranges * splits * plan._MIN_TOKENS_PER_SPLIT >= max_len
                    cap_binds = num_ranges * (splits + 1) > plan._MAX_PIECES
                    assert rows * splits >= target or floor_binds or cap_binds, (batch, num_kv_heads, max_len,
                                                                                 num_ranges)
    # the CPU plan (interpreter) counts 4 "SMs": cdiv(16, 1 * 2) = 8, cdiv(1000, 768) = 2
    assert plan.choose_num_splits(1, 2, 1000, torch.device("cpu"), num_ranges=3) == 2
    with pytest.raises(ValueError, match="num_ranges"):
        plan.choose_num_splits(1, 4, 1024, gpu, num_ranges=0)


def test_reduce_config_bounds():
    """The reduce tile fits its registers, head_dim splits into whole slices, and every piece count the
    default plan can produce (<= _MAX_PIECES) is covered in at most two sweeps."""
    from qwen1m.kernels import paged_decode_plan as plan

    for head_dim in (16, 32, 64, 128, 256):
        for pieces in (2, 3, 9, 16, 66, 128, 129, 132, 256, 300, 768):
            cfg = plan.reduce_config(pieces, head_dim)
            assert cfg["BLOCK_S"] * cfg["BLOCK_D"] <= max(plan._REDUCE_TILE_ELEMS, 16 * cfg["BLOCK_S"])
            assert head_dim % cfg["BLOCK_D"] == 0 and cfg["BLOCK_D"] >= 16
            assert cfg["BLOCK_S"] & (cfg["BLOCK_S"] - 1) == 0
            if pieces <= plan._MAX_PIECES:
                assert 2 * cfg["BLOCK_S"] >= pieces
    assert plan.reduce_config(132, 128) == dict(BLOCK_S=256, BLOCK_D=16, num_warps=4)
    assert plan.reduce_config(6, 128) == dict(BLOCK_S=8, BLOCK_D=128, num_warps=4)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("ranges,num_heads,num_kv_heads,head_dim,block_size", CASES)
def test_reference_matches_contiguous_attend(ranges, num_heads, num_kv_heads, head_dim, block_size, fp8):
    """The paged oracle == plain attend over the range's keys laid out contiguously (float64)."""
    cache_dtype = FP8 if fp8 else torch.float64
    q, k_cache, v_cache, block_tables, kv_start, kv_end, k_scale, v_scale = make_paged(
        ranges, num_heads, num_kv_heads, head_dim, block_size, cache_dtype, torch.float64, seed=3)
    out, lse = paged_decode_reference(q, k_cache, v_cache, block_tables, kv_start, kv_end, 0.3, k_scale, v_scale)
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    for b, (start, end) in enumerate(ranges):
        k, v = gathered(k_cache, v_cache, block_tables, start, end, k_scale, v_scale, b)
        assert not k.isnan().any() and not v.isnan().any()
        ref_out, ref_lse = attend(q[b : b + 1], k.double(), v.double(), softmax_scale=0.3, causal=False)
        torch.testing.assert_close(out[b], ref_out[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse[b], ref_lse[:, 0].double(), rtol=1e-12, atol=1e-12)
        if end == start:
            assert (out[b] == 0).all() and torch.isneginf(lse[b]).all()


def test_reference_fp8_dequantises_with_scales():
    """fp8 cache + scales == the same attention over a float cache holding k8.float() * scale."""
    q, k8, v8, bt, s, e, ks, vs = make_paged([(2, 21)], 4, 2, 16, 4, FP8, torch.float64, seed=5)
    kf = torch.nan_to_num(k8.double() * ks.double()[..., None])
    vf = torch.nan_to_num(v8.double() * vs.double()[..., None])
    out8, lse8 = paged_decode_reference(q, k8, v8, bt, s, e, 0.25, ks, vs)
    outf, lsef = paged_decode_reference(q, kf, vf, bt, s, e, 0.25)
    torch.testing.assert_close(out8, outf, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse8, lsef, rtol=1e-6, atol=1e-6)


# (batch, context, cache dtype): contexts 8K-128K, ranges not block-aligned
GPU_CASES = [(1, 8192, torch.bfloat16), (1, 131072, torch.bfloat16), (32, 8192, torch.bfloat16),
             (1, 32768, FP8), (32, 8192, FP8)]


@pytest.mark.gpu
@pytest.mark.parametrize("batch,context,cache_dtype", GPU_CASES)
def test_paged_decode_gpu(batch, context, cache_dtype, poisoned):
    from qwen1m.kernels.paged_decode import paged_decode_attention

    g = torch.Generator().manual_seed(batch + context)
    ranges = []
    for b in range(batch):  # DCA-like: some ranges start late, lengths vary, one per batch is odd-sized
        start = int(torch.randint(0, 100, (1,), generator=g)) if b % 2 else 0
        end = context - int(torch.randint(0, 300, (1,), generator=g)) if b % 3 else context
        ranges.append((start, end))
    inputs = make_paged(ranges, 28, 4, 128, 64, cache_dtype, torch.bfloat16, device="cuda", seed=1)
    scale = 128**-0.5
    for num_splits in (None, 1, 7):
        out, lse = paged_decode_attention(*inputs[:6], scale, *inputs[6:], num_splits=num_splits)
        torch.cuda.synchronize()
        check_kernel(out, lse, inputs, scale)
