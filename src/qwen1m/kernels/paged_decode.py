"""Split-K ("flash-decoding") attention of one query token per sequence over a paged KV cache.

Oracle: ``qwen1m.attention.reference.paged_decode_reference`` (same signature and semantics).

Paged layout. Logical token t of sequence b lives at ``k_cache[block_tables[b, t // block_size],
t % block_size]``; sequence b attends to keys [kv_start[b], kv_end[b]).

Several ranges, one launch (``paged_decode_attention_multi``). DCA decode attends to three disjoint
ranges (intra / succ / inter, design §2.4), each with its own query rotation, and merges them by LSE.
The split kernel takes every range: q is [R, batch, num_heads, head_dim], kv_start / kv_end are
[R, batch]. The tiles of a sequence's R ranges, concatenated in range order, are cut into
P = R * num_splits equal pieces, program_id(2) = piece (a piece may end one range and start the
next, switching query; an empty range takes no piece). Every piece writes its partial to one
float32 workspace [batch, num_heads, P, head_dim], and one reduce merges all P pieces of a row at
once (the LSE merge is associative, so this is exactly the merge of the R per-range results). A DCA
layer is two launches instead of three splits, three reduces and a merge; the single-range API is
the same launch with R = 1.

Decode is memory-bound: the work is one read of K and V for the range, 2 * n * num_kv_heads *
head_dim * elem bytes, and the goal is to read it exactly once at full bandwidth.

  - GQA packing: one program owns one kv head and all ``GROUP`` query heads reading it, as the rows
    of a [BLOCK_G, HEAD_DIM] query tile (BLOCK_G >= 16 so ``tl.dot`` applies; padding rows are zero
    and never stored), so each K/V tile is loaded once per group, not once per query head.
  - Split-K: with batch * num_kv_heads programs (4 at batch 1 for Qwen2.5-7B) the GPU would be
    nearly idle, so the ranges are cut into P pieces, one program each, grid (batch, num_kv_heads,
    P). ``choose_num_splits`` picks P = R * splits so that each range's batch * num_kv_heads *
    splits programs fill the GPU (fewer, filling it once for all R ranges, ran 1.5x slower at 1M
    keys in DCA's three ranges on the H200). Pieces are whole BLOCK_N-aligned tiles of *logical*
    positions, so no key is read by two programs. Each piece writes its normalised partial out and
    its LSE to a float32 workspace; ``_paged_decode_reduce_kernel`` merges the pieces of a row by
    LSE (exact: out = sum_s exp(lse_s - LSE) out_s) in one online-rescaled pass, grid (batch,
    num_heads, head_dim slices). With a single piece the first kernel writes the result directly.
  - Block tables: if BLOCK_N <= block_size a tile lies inside one physical block (both are powers of
    two and tiles are aligned), so one table entry per tile is read and the tile is a contiguous
    [BLOCK_N, num_kv_heads, head_dim] slab; otherwise each token looks up its own block.
  - Masks: only keys in [kv_start, kv_end) are loaded (masked loads never touch other slots, so
    unused or stale blocks, even NaN-filled ones, cannot leak in); every visited tile holds at least
    one valid key, so -inf scores are safe in the online softmax.
  - fp8 (float8_e4m3fn) caches: K/V tiles are upcast to q's dtype (exact: every e4m3 value is a
    bf16/fp16/fp32 value) and the per-token float32 scales are applied outside the dot products:
    scores = (q . k8) * k_scale in float32 (one dot per tile, one multiply per key), and V is
    dequantised as v8.float() * v_scale and rounded once to q's dtype for the P.V product (kept in
    float32 under the interpreter, whose bf16 casts truncate), so the maths is that of the
    dequantised cache (k8.float() * k_scale, v8.float() * v_scale).

Softmax in base 2 (scores pre-scaled by softmax_scale * log2(e), exp2 in the loop), LSE returned
in natural log. Empty ranges give out = 0, lse = -inf.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qwen1m.kernels.paged_decode_plan import (
    check_inputs,
    check_multi_inputs,
    choose_num_splits,
    default_config,
    reduce_config,
)

_LOG2E = 1.4426950408889634
@triton.jit
def _paged_decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
    block_tables_ptr, kv_start_ptr, kv_end_ptr, out_ptr, lse_ptr,
    qk_scale, num_pieces,
    stride_qr, stride_qb, stride_qh, stride_qd,
    stride_ksr, stride_ksq, stride_ker, stride_keq,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ksb, stride_kst, stride_ksh,
    stride_vsb, stride_vst, stride_vsh,
    stride_btb, stride_btn,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, NUM_RANGES: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    piece = tl.program_id(2)  # this program's slot in the workspace, of num_pieces per row

    # Work split over the ranges together: the whole BLOCK_N-aligned tiles covering each range
    # [kv_start_r, kv_end_r), concatenated in range order, are cut into num_pieces equal shares. An
    # empty range costs nothing (at 32K under DCA two of three ranges are empty: per-range splits
    # would leave two thirds of the programs idle), and a piece may run over the end of one range
    # into the next, switching query (the online softmax over the union of both key sets is exact).
    total_tiles = seq * 0
    for r in tl.static_range(NUM_RANGES):
        kv_start = tl.load(kv_start_ptr + r * stride_ksr + seq * stride_ksq)
        kv_end = tl.load(kv_end_ptr + r * stride_ker + seq * stride_keq)
        total_tiles += tl.where(kv_end > kv_start, (kv_end + BLOCK_N - 1) // BLOCK_N - kv_start // BLOCK_N, 0)
    tiles_per_piece = (total_tiles + num_pieces - 1) // num_pieces
    mine_lo = piece * tiles_per_piece  # this piece's share [mine_lo, mine_hi) of the concatenation
    mine_hi = tl.minimum(mine_lo + tiles_per_piece, total_tiles)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    head = kv_head * GROUP + offs_g
    g_ok = offs_g < GROUP
    seq64 = seq.to(tl.int64)
    bt_ptr = block_tables_ptr + seq64 * stride_btb
    k_head_ptr = k_cache_ptr + kv_head * stride_kh
    v_head_ptr = v_cache_ptr + kv_head * stride_vh

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    tiles_before = seq * 0  # tiles of the ranges before rng in the concatenation
    # a loop, not tl.static_range: compiled for sm_90 (Triton 3.9, bf16, R = 3) the unrolled form
    # takes 139 registers per thread, this one 80 (single-range kernel: 72), same shared memory
    for rng in range(0, NUM_RANGES):
        kv_start = tl.load(kv_start_ptr + rng * stride_ksr + seq * stride_ksq)
        kv_end = tl.load(kv_end_ptr + rng * stride_ker + seq * stride_keq)
        tile_first = kv_start // BLOCK_N
        num_tiles = tl.where(kv_end > kv_start, (kv_end + BLOCK_N - 1) // BLOCK_N - tile_first, 0)
        # this piece's tiles of range rng (none if the shares do not meet)
        tile_lo = tile_first + tl.maximum(mine_lo - tiles_before, 0)
        tile_hi = tile_first + tl.minimum(mine_hi - tiles_before, num_tiles)
        tiles_before += num_tiles

        q_ptrs = (q_ptr + rng * stride_qr + seq64 * stride_qb + head[:, None] * stride_qh
                  + offs_d[None, :] * stride_qd)
        q = tl.load(q_ptrs, mask=g_ok[:, None], other=0.0)  # [BLOCK_G, HEAD_DIM], padding rows zero
        if UPCAST_DOT:
            q = q.to(tl.float32)
        for tile in range(tile_lo, tile_hi):
            pos = tile * BLOCK_N + offs_n  # logical token positions of this tile
            key_ok = (pos >= kv_start) & (pos < kv_end)
            if BLOCK_N <= BLOCK_SIZE:  # the tile sits in one physical block: one table entry
                block = tl.load(bt_ptr + ((tile * BLOCK_N) // BLOCK_SIZE) * stride_btn).to(tl.int64)
            else:
                block = tl.load(bt_ptr + (pos // BLOCK_SIZE) * stride_btn, mask=key_ok, other=0).to(tl.int64)
            slot = pos % BLOCK_SIZE
            k_off = block * stride_kb + slot * stride_kt  # [BLOCK_N] (or scalar + [BLOCK_N])
            v_off = block * stride_vb + slot * stride_vt
            # K read transposed, [HEAD_DIM, BLOCK_N]; V as [BLOCK_N, HEAD_DIM]: 2 * BLOCK_N * HEAD_DIM
            # elements per tile, shared by the GROUP query heads
            k = tl.load(k_head_ptr + k_off[None, :] + offs_d[:, None] * stride_kd, mask=key_ok[None, :],
                        other=0.0)
            if UPCAST_DOT:
                qk = tl.dot(q, k.to(tl.float32), input_precision="ieee")
            else:
                qk = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION)  # [BLOCK_G, BLOCK_N]
            if HAS_SCALE:
                k_scale = tl.load(k_scale_ptr + block * stride_ksb + slot * stride_kst + kv_head * stride_ksh,
                                  mask=key_ok, other=0.0)
                qk = qk * k_scale[None, :]
            qk = tl.where(key_ok[None, :], qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_ij[:, None])
            alpha = tl.math.exp2(m_i - m_ij)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            v = tl.load(v_head_ptr + v_off[:, None] + offs_d[None, :] * stride_vd, mask=key_ok[:, None],
                        other=0.0)
            if HAS_SCALE:  # dequantise V in float32, then (GPU) round once to q's dtype for the dot
                v_scale = tl.load(v_scale_ptr + block * stride_vsb + slot * stride_vst + kv_head * stride_vsh,
                                  mask=key_ok, other=0.0)
                v = v.to(tl.float32) * v_scale[:, None]
                if not UPCAST_DOT:  # the interpreter's fp32 -> bf16 cast truncates: there V stays float32
                    v = v.to(q_ptr.dtype.element_ty)
            if UPCAST_DOT:
                acc = tl.dot(p.to(q_ptr.dtype.element_ty).to(tl.float32), v.to(tl.float32), acc,
                             input_precision="ieee")
            else:
                acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc, input_precision=DOT_PRECISION)
            m_i = m_ij

    # a piece with no tile (every range empty, or more pieces than tiles) writes out 0, lse -inf
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # * ln(2)
    out_ptrs = (out_ptr + seq64 * stride_ob + head[:, None] * stride_oh + piece * stride_os
                + offs_d[None, :] * stride_od)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
    tl.store(lse_ptr + seq64 * stride_lb + head * stride_lh + piece * stride_ls, lse, mask=g_ok)


@triton.jit
def _paged_decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr,
    num_pieces,
    stride_pob, stride_poh, stride_pos, stride_pod,
    stride_plb, stride_plh, stride_pls,
    stride_ob, stride_oh, stride_od,
    stride_lb, stride_lh,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (sequence, query head, BLOCK_D slice of head_dim): out = sum_s exp(lse_s - LSE)
    out_s, LSE = logsumexp_s lse_s, over the num_pieces pieces of the row (R ranges * splits).

    At batch 1 there are few rows and hundreds of pieces, so the cost is dependent memory round
    trips, not bytes: one pass with online rescaling (running max m, sum l, acc) over
    [BLOCK_S, BLOCK_D] tiles, whose LSE and partial loads are independent, covers a row in
    cdiv(num_pieces, BLOCK_S) iterations (one with the default plan), and the head_dim slices put
    more SMs on the workspace. Each slice recomputes the row's LSE (num_pieces floats, cheap); slice
    0 stores it. Empty pieces (lse = -inf) weigh exp(-inf) = 0; an all-empty row gives out 0, lse -inf.
    """
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d_slice = tl.program_id(2)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = d_slice * BLOCK_D + tl.arange(0, BLOCK_D)  # BLOCK_D divides head_dim (powers of two)
    lse_base = part_lse_ptr + seq * stride_plb + head * stride_plh
    out_base = part_out_ptr + seq * stride_pob + head * stride_poh

    m = tl.full([], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_pieces, BLOCK_S):
        s_ok = (s0 + offs_s) < num_pieces
        lse_s = tl.load(lse_base + (s0 + offs_s) * stride_pls, mask=s_ok, other=float("-inf"))
        out_s = tl.load(out_base + (s0 + offs_s)[:, None] * stride_pos + offs_d[None, :] * stride_pod,
                        mask=s_ok[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse_s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no piece yet: keep exp() off -inf - -inf
        alpha = tl.exp(m - m_safe)  # 0 while m = -inf (acc and l_sum are 0 then)
        w = tl.exp(lse_s - m_safe)  # empty pieces: exp(-inf) = 0
        acc = acc * alpha + tl.sum(w[:, None] * out_s, 0)
        l_sum = l_sum * alpha + tl.sum(w, 0)
        m = m_new
    has_keys = l_sum > 0.0
    l_safe = tl.where(has_keys, l_sum, 1.0)
    out = acc / l_safe
    lse = tl.where(has_keys, m + tl.log(l_safe), float("-inf"))
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d * stride_od, out.to(out_ptr.dtype.element_ty))
    if d_slice == 0:
        tl.store(lse_ptr + seq * stride_lb + head * stride_lh, lse)


def _reduce(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge the pieces of every row: part_out [batch, num_heads, pieces, head_dim] float32, part_lse
    [batch, num_heads, pieces] -> out [batch, num_heads, head_dim], lse [batch, num_heads] (in place).
    Separate from _launch so benchmarks/bench_decode.py can time the reduce alone."""
    batch, num_heads, pieces, head_dim = part_out.shape
    cfg = reduce_config(pieces, head_dim)
    _paged_decode_reduce_kernel[(batch, num_heads, head_dim // cfg["BLOCK_D"])](
        part_out, part_lse, out, lse, pieces,
        stride_pob=part_out.stride(0), stride_poh=part_out.stride(1), stride_pos=part_out.stride(2),
        stride_pod=part_out.stride(3),
        stride_plb=part_lse.stride(0), stride_plh=part_lse.stride(1), stride_pls=part_lse.stride(2),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_od=out.stride(2),
        stride_lb=lse.stride(0), stride_lh=lse.stride(1),
        BLOCK_S=cfg["BLOCK_S"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and workspace allocation goes through here, so tests can poison them all."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(q, k_cache, v_cache, block_tables, kv_start, kv_end, softmax_scale, k_scale, v_scale, num_splits,
            config) -> tuple[torch.Tensor, torch.Tensor]:
    """Both public entry points: q [R, batch, num_heads, head_dim], kv_start / kv_end [R, batch] int32
    (inputs already checked). One split launch over (batch, num_kv_heads, R * num_splits) programs,
    which cut the concatenated tiles of a sequence's R ranges into R * num_splits equal pieces, then,
    unless there is a single piece, one reduce launch merging the pieces of each row."""
    num_ranges, batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if config is None:
        config = default_config(head_dim, k_cache.dtype, q.device)
    group = num_heads // num_kv_heads
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    # triton's interpreter casts float32 -> bfloat16 by truncation, the GPU rounds to nearest even:
    # under the interpreter the kernels write float32 and torch rounds, as the GPU would
    out_dtype = torch.float32 if interpret and q.dtype == torch.bfloat16 else q.dtype
    out = _empty((batch, num_heads, head_dim), out_dtype, q.device)
    lse = _empty((batch, num_heads), torch.float32, q.device)
    if batch == 0:
        return out.to(q.dtype), lse
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size, q.device,
                                       num_ranges)
    if num_splits < 1:
        raise ValueError(f"paged_decode_attention: num_splits must be >= 1, got {num_splits}.")
    pieces = num_ranges * num_splits

    if pieces == 1:  # the split kernel writes the result; stride 0 over the (single) piece
        part_out, part_lse = out, lse
        po_strides = (out.stride(0), out.stride(1), 0, out.stride(2))
        pl_strides = (lse.stride(0), lse.stride(1), 0)
    else:  # float32 workspace: R * num_splits partial rows per (sequence, head)
        part_out = _empty((batch, num_heads, pieces, head_dim), torch.float32, q.device)
        part_lse = _empty((batch, num_heads, pieces), torch.float32, q.device)
        po_strides, pl_strides = part_out.stride(), part_lse.stride()

    has_scale = k_scale is not None
    dummy = kv_start  # never read when HAS_SCALE is False
    ks, vs = (k_scale, v_scale) if has_scale else (dummy, dummy)
    ks_strides = k_scale.stride() if has_scale else (0, 0, 0)
    vs_strides = v_scale.stride() if has_scale else (0, 0, 0)
    _paged_decode_split_kernel[(batch, num_kv_heads, pieces)](
        q, k_cache, v_cache, ks, vs, block_tables, kv_start, kv_end, part_out, part_lse,
        softmax_scale * _LOG2E, pieces,
        stride_qr=q.stride(0), stride_qb=q.stride(1), stride_qh=q.stride(2), stride_qd=q.stride(3),
        stride_ksr=kv_start.stride(0), stride_ksq=kv_start.stride(1),
        stride_ker=kv_end.stride(0), stride_keq=kv_end.stride(1),
        stride_kb=k_cache.stride(0), stride_kt=k_cache.stride(1), stride_kh=k_cache.stride(2),
        stride_kd=k_cache.stride(3),
        stride_vb=v_cache.stride(0), stride_vt=v_cache.stride(1), stride_vh=v_cache.stride(2),
        stride_vd=v_cache.stride(3),
        stride_ksb=ks_strides[0], stride_kst=ks_strides[1], stride_ksh=ks_strides[2],
        stride_vsb=vs_strides[0], stride_vst=vs_strides[1], stride_vsh=vs_strides[2],
        stride_btb=block_tables.stride(0), stride_btn=block_tables.stride(1),
        stride_ob=po_strides[0], stride_oh=po_strides[1], stride_os=po_strides[2], stride_od=po_strides[3],
        stride_lb=pl_strides[0], stride_lh=pl_strides[1], stride_ls=pl_strides[2],
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=config["BLOCK_N"], HAS_SCALE=has_scale,
        # fp32 queries get true fp32 products (tf32 would cost ~3e-4 relative error)
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # triton 3.9's interpreter computes bf16/fp16 tl.dot wrongly (see kernels/flash_attn.py);
        # fp32 operands holding the same 16-bit values give the GPU's result
        UPCAST_DOT=interpret, NUM_RANGES=num_ranges,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    if pieces > 1:  # LSE merge is associative: merging every piece of every range at once is exact
        _reduce(part_out, part_lse, out, lse)
    return out.to(q.dtype), lse


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    softmax_scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    num_splits: int | None = None,
    *,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query token per sequence to a range of its paged KV cache, with the LSE.

    q: [batch, num_heads, head_dim], already rotated (query head h reads kv head
    h // (num_heads // num_kv_heads)); k_cache, v_cache: [num_blocks, block_size, num_kv_heads,
    head_dim] in q's dtype or float8_e4m3fn; block_tables: [batch, max_blocks_per_seq] int32,
    the physical block of each logical block; kv_start, kv_end: [batch] int32, the key range
    [kv_start, kv_end) in logical positions (kv_start == kv_end: empty). k_scale, v_scale:
    [num_blocks, block_size, num_kv_heads] float32 per-token dequant scales (fp8 only; None with an
    fp8 cache means scale 1). num_splits: pieces per range (None: ``choose_num_splits``, enough to
    fill the GPU, from max_blocks_per_seq * block_size and the SM count, without a device sync).
    config: BLOCK_N / num_warps / num_stages (None: ``default_config``; benchmarks/bench_decode.py
    sweeps them).
    Returns out [batch, num_heads, head_dim] in q's dtype and lse [batch, num_heads] float32 (natural
    log); empty ranges give out = 0, lse = -inf.
    """
    check_inputs(q, k_cache, v_cache, block_tables, kv_start, kv_end, k_scale, v_scale)
    # one range: the multi-range launch with R = 1 (views, no copies)
    return _launch(q[None], k_cache, v_cache, block_tables, kv_start[None], kv_end[None], softmax_scale,
                   k_scale, v_scale, num_splits, config)


def paged_decode_attention_multi(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    softmax_scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    num_splits: int | None = None,
    *,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of R key ranges, each read with its own query: a whole DCA decode
    layer (R = 3: intra, succ, inter, each with its own query rotation) in two launches.

    q: [R, batch, num_heads, head_dim] (q[r] attends to the keys of range r); kv_start, kv_end:
    [R, batch] int32, range r of sequence b is [kv_start[r, b], kv_end[r, b]) (empty ranges add
    nothing). Every other argument as in ``paged_decode_attention``; num_splits is per range: the
    ranges' tiles, concatenated, are cut into R * num_splits equal pieces (None: ``choose_num_splits``
    with num_ranges = R: each range's share of programs fills the GPU, as measured fastest at 1M).
    Returns out [batch, num_heads, head_dim] in q's dtype and lse [batch, num_heads] float32: exactly
    the LSE merge of the R single-range results (out 0, lse -inf when every range of a row is empty).
    No host reads of device tensors: CUDA-graph capturable.
    """
    check_multi_inputs(q, kv_start, kv_end)
    check_inputs(q[0], k_cache, v_cache, block_tables, kv_start[0], kv_end[0], k_scale, v_scale)
    return _launch(q, k_cache, v_cache, block_tables, kv_start, kv_end, softmax_scale, k_scale, v_scale,
                   num_splits, config)


__all__ = ["choose_num_splits", "paged_decode_attention", "paged_decode_attention_multi"]
