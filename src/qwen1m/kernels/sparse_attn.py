"""Vertical-slash sparse attention forward in Triton (MInference / vLLM ``sparse_attn_func``, design §3.3).

Oracle: ``qwen1m.attention.vertical_slash.sparse_attend_reference`` (same contract). The index comes
from ``build_vertical_slash_index``; its module docstring defines exactly which keys each row reads.

One program owns one query head and one query block of ``BLOCK_M = index.block_m`` rows. It runs a
FlashAttention online softmax first over the block's dense key blocks (``block_offset``: BLOCK_N
consecutive keys each, at arbitrary, not BLOCK_N-aligned, starts), then over its single columns
(``column_index``) gathered BLOCK_N at a time. The index differs per query head, so unlike the dense
kernel the query heads of one kv group cannot share K/V tiles; GQA is a head -> kv head mapping in the
pointer arithmetic (K/V are read in place, any strides, never copied per query head).

Masks. A tile near the causal diagonal or past the keys is masked: key < num_kv (the last block of a
group may run past it, and padded column slots) and, when causal, key <= i + num_kv - num_q
(bottom-right). Tiles whose keys every row of the block sees ("clear": all of them below the first
row's limit) run without masks; offsets and columns ascend, so they are a prefix, counted from its
end (the few tiles at the diagonal). Masked scores are -inf and the running max is made safe (0
when still -inf), so a row that reads no key at all ends with l_i == 0 and is written as out = 0,
lse = -inf. Softmax in base 2 (scores scaled by softmax_scale * log2(e)), LSE converted back to
natural log.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from qwen1m.kernels.flash_attn_problems import problem_strides
from qwen1m.kernels.fp8_tile import _fold_v_scale, check_fp8_inputs
from qwen1m.sparse_index import BatchedVSIndex, VerticalSlashIndex

_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)  # global constexpr: readable inside the kernel
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_BLOCK = 16  # tl.dot needs every tile dimension >= 16 on the GPU


@triton.jit
def _attend_keys(
    acc, l_i, m_i, c_i, q, keys, key_ok, q_lim,
    k_head_ptr, v_head_ptr, ks_head_ptr, vs_head_ptr, stride_kn, stride_kd, stride_vn, stride_vd, stride_sn,
    qk_scale,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, MASKED: tl.constexpr,
    FP8: tl.constexpr,
):
    """One online-softmax step over the BLOCK_N keys ``keys`` (any indices; ``key_ok`` = real keys).

    MASKED=False: the caller guarantees every key is real and visible to every row of the block (a
    "clear" tile), so no mask is built or applied and the loads are unpredicated; ``key_ok`` and
    ``q_lim`` are then unused. The running max stays finite after a clear tile, so no -inf guard.
    FP8: q, K, V in e4m3 as the dense FP8 kernel takes them (kernels/flash_attn_fp8.py): qk_scale is a
    [BLOCK_M] vector holding the rows' scales, each key's K scale multiplies its score column, its V
    scale is folded into P (``_fold_v_scale``), and acc is kept in units of c_i.
    """
    offs_d = tl.arange(0, HEAD_DIM)
    BLOCK_N: tl.constexpr = keys.shape[0]
    keys64 = keys.to(tl.int64)
    # K read transposed [HEAD_DIM, BLOCK_N], V as [BLOCK_N, HEAD_DIM]: 2 * BLOCK_N * HEAD_DIM elements
    k_ptrs = k_head_ptr + keys64[None, :] * stride_kn + offs_d[:, None] * stride_kd
    if MASKED:
        k = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
    if UPCAST_DOT:
        qk = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
    else:
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if FP8:  # the keys' scales per column, the rows' (with softmax_scale) per row
        if MASKED:
            k_sc = tl.load(ks_head_ptr + keys64 * stride_sn, mask=key_ok, other=0.0)
        else:
            k_sc = tl.load(ks_head_ptr + keys64 * stride_sn)
        qk = qk * k_sc[None, :]
        row_scale = qk_scale[:, None]
    else:
        row_scale = qk_scale
    if MASKED:
        visible = key_ok[None, :] & (keys[None, :] <= q_lim[:, None])  # q_lim >= num_kv when not causal
        qk = tl.where(visible, qk * row_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)  # rows with no visible key yet: p = alpha = 0
    elif FP8:
        qk = qk * row_scale
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = m_ij
    else:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale
        m_safe = m_ij
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v_ptrs = v_head_ptr + keys64[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if MASKED:
        v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    if FP8:
        if MASKED:
            v_sc = tl.load(vs_head_ptr + keys64 * stride_sn, mask=key_ok, other=0.0)
        else:
            v_sc = tl.load(vs_head_ptr + keys64 * stride_sn)
        acc, p_v, c_i = _fold_v_scale(acc, p, alpha, c_i, v, v_sc, UPCAST_DOT)
    else:
        acc = acc * alpha[:, None]
        p_v = p.to(v.dtype)
    if UPCAST_DOT:
        acc = tl.dot(p_v.to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    elif FP8:  # promoted into the float32 acc once per tile, as in the dense FP8 kernel
        acc = tl.dot(p_v, v, acc, input_precision=DOT_PRECISION, max_num_imprecise_acc=BLOCK_N)
    else:
        acc = tl.dot(p_v, v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_ij, c_i


@triton.jit
def _count_at_most(ptr, stride, n, bound):
    """How many of the n ascending int32 values ptr[0], ptr[stride], ... are <= bound, counted from the
    end: the values past ``bound`` are the few tiles at the causal diagonal (at most about BLOCK_M +
    BLOCK_N keys' worth), so this takes one to a few dependent scalar loads where a binary search would
    take ~log2(n) (each ~0.5 us of latency before the first tile)."""
    cnt = n
    last = tl.load(ptr + tl.maximum(cnt - 1, 0) * stride, mask=cnt > 0, other=0)
    while (cnt > 0) & (last > bound):
        cnt -= 1
        last = tl.load(ptr + tl.maximum(cnt - 1, 0) * stride, mask=cnt > 0, other=0)
    return cnt


# index widths, query counts (strides of out / lse / q slots) change with every step: not specialised on
@triton.jit(do_not_specialize=["num_m_blocks", "stride_qs", "stride_os", "stride_ls", "stride_lh", "stride_bcp",
                               "stride_bch", "stride_bop", "stride_boh", "stride_bom", "stride_ccp", "stride_cch",
                               "stride_cip", "stride_cih", "stride_cim"])
def _sparse_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, prob_ptr, qs_ptr, ks_ptr, vs_ptr,
    block_count_ptr, block_offset_ptr, column_count_ptr, column_index_ptr,
    num_m_blocks, qk_scale,
    stride_qss, stride_qsm, stride_qsh, stride_sn, stride_sh,
    stride_qs, stride_qm, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_os, stride_om, stride_oh, stride_od,
    stride_ls, stride_lh, stride_lm,
    stride_bcp, stride_bch, stride_bcm,
    stride_bop, stride_boh, stride_bom, stride_bob,
    stride_ccp, stride_cch, stride_ccm,
    stride_cip, stride_cih, stride_cim, stride_cic,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    HEADS_FIRST: tl.constexpr, SPLIT: tl.constexpr, FP8: tl.constexpr,
):
    # grid (query blocks, heads, problems), or (heads, query blocks, problems) with HEADS_FIRST: the
    # heads of one query block then run side by side, and a kv group's query heads read overlapping
    # K / V from L2. A problem (``prob_ptr``, int32 [P, PROB_FIELDS]) is one query range attending one
    # key range: query copy (slot of q), first query row, first key, num_q, num_kv, causal, dense, and
    # the output slot (of out / lse) it writes rows q_row0 ... of. Sizes are read at run time: a new
    # region length compiles nothing. dense = 1: the problem is skipped (``flash_attn_problems``
    # attends it with every key, at the dense kernel's rate).
    AXIS_M: tl.constexpr = 1 if HEADS_FIRST else 0
    problem = tl.program_id(2)
    prob = prob_ptr + problem * 8
    q_slot = tl.load(prob)
    q_row0 = tl.load(prob + 1).to(tl.int64)
    key_begin = tl.load(prob + 2).to(tl.int64)
    num_q = tl.load(prob + 3)
    num_kv = tl.load(prob + 4)
    causal = tl.load(prob + 5) != 0
    dense = tl.load(prob + 6)  # int: 0 sparse, 1 dense (skipped here)
    out_slot = tl.load(prob + 7)
    # late query blocks read the most keys when causal (more visible columns): launch them first
    pid_m = num_m_blocks - 1 - tl.program_id(AXIS_M)
    if (pid_m * BLOCK_M < num_q) & (dense == 0):
        head = tl.program_id(1 - AXIS_M)
        kv_head = head // GROUP

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < num_q
        # causal: the last key each row sees; otherwise past every key
        q_lim = tl.where(causal, offs_m + (num_kv - num_q), num_kv)

        # at 1M tokens x 28 heads x 128, token * stride_qm overflows int32
        rows64 = q_row0 + offs_m.to(tl.int64)
        q_ptrs = (q_ptr + q_slot.to(tl.int64) * stride_qs + rows64[:, None] * stride_qm + head * stride_qh
                  + offs_d[None, :] * stride_qd)
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        k_head_ptr = k_ptr + key_begin * stride_kn + kv_head * stride_kh
        v_head_ptr = v_ptr + key_begin * stride_vn + kv_head * stride_vh
        if FP8:  # the rows' scales join softmax_scale; K / V scales [keys, kv heads], equal strides
            q_sc = tl.load(qs_ptr + q_slot.to(tl.int64) * stride_qss + rows64 * stride_qsm + head * stride_qsh,
                           mask=row_ok, other=0.0)
            row_qk_scale = q_sc * qk_scale
            ks_head_ptr = ks_ptr + key_begin * stride_sn + kv_head * stride_sh
            vs_head_ptr = vs_ptr + key_begin * stride_sn + kv_head * stride_sh
        else:
            row_qk_scale = qk_scale
            ks_head_ptr = k_head_ptr
            vs_head_ptr = v_head_ptr
        c_i = 1.0  # FP8: acc's unit (the last tile's P.V scale)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        # Keys [0, clear_end) are visible to every row of the block (causal: the first row's limit).
        # Offsets and columns ascend, so the "clear" tiles, wholly inside it, come first: they run
        # without masks (MASKED=False), and only the tiles near the diagonal or past num_kv pay for
        # them (as the dense kernel's causal split does). SPLIT=False masks every tile (A/B in benchmarks).
        # the dense key blocks (BLOCK_N consecutive keys from each offset), then the single columns
        problem64 = problem.to(tl.int64)
        n_blocks = tl.load(block_count_ptr + problem64 * stride_bcp + head * stride_bch + pid_m * stride_bcm)
        offset_ptr = (block_offset_ptr + problem64 * stride_bop + head.to(tl.int64) * stride_boh
                      + pid_m.to(tl.int64) * stride_bom)
        n_cols = tl.load(column_count_ptr + problem64 * stride_ccp + head * stride_cch + pid_m * stride_ccm)
        column_ptr = (column_index_ptr + problem64 * stride_cip + head.to(tl.int64) * stride_cih
                      + pid_m.to(tl.int64) * stride_cim)
        if SPLIT:
            clear_end = tl.where(causal, tl.minimum(num_kv, pid_m * BLOCK_M + (num_kv - num_q) + 1), num_kv)
            n_clear = _count_at_most(offset_ptr, stride_bob, n_blocks, clear_end - BLOCK_N)
            # whole groups of BLOCK_N clear columns (real slots, every column < clear_end) run unmasked
            clear_cols = (_count_at_most(column_ptr, stride_cic, n_cols, clear_end - 1) // BLOCK_N) * BLOCK_N
        else:  # every tile masked
            n_clear = n_blocks * 0
            clear_cols = n_cols * 0
        for t in range(0, n_clear):
            start_n = tl.load(offset_ptr + t * stride_bob)
            acc, l_i, m_i, c_i = _attend_keys(
                acc, l_i, m_i, c_i, q, start_n + offs_n, offs_n < BLOCK_N, q_lim,
                k_head_ptr, v_head_ptr, ks_head_ptr, vs_head_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_sn, row_qk_scale, HEAD_DIM=HEAD_DIM, DOT_PRECISION=DOT_PRECISION, UPCAST_DOT=UPCAST_DOT,
                FP8=FP8, MASKED=False,
            )
        for t in range(n_clear, n_blocks):
            start_n = tl.load(offset_ptr + t * stride_bob)
            keys = start_n + offs_n
            acc, l_i, m_i, c_i = _attend_keys(
                acc, l_i, m_i, c_i, q, keys, keys < num_kv, q_lim,
                k_head_ptr, v_head_ptr, ks_head_ptr, vs_head_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_sn, row_qk_scale, HEAD_DIM=HEAD_DIM, DOT_PRECISION=DOT_PRECISION, UPCAST_DOT=UPCAST_DOT,
                FP8=FP8, MASKED=True,
            )

        # single columns, gathered BLOCK_N at a time; padding slots are masked
        for start_c in range(0, clear_cols, BLOCK_N):
            keys = tl.load(column_ptr + (start_c + offs_n) * stride_cic)
            acc, l_i, m_i, c_i = _attend_keys(
                acc, l_i, m_i, c_i, q, keys, offs_n < BLOCK_N, q_lim,
                k_head_ptr, v_head_ptr, ks_head_ptr, vs_head_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_sn, row_qk_scale, HEAD_DIM=HEAD_DIM, DOT_PRECISION=DOT_PRECISION, UPCAST_DOT=UPCAST_DOT,
                FP8=FP8, MASKED=False,
            )
        for start_c in range(clear_cols, n_cols, BLOCK_N):
            slot_ok = (start_c + offs_n) < n_cols
            keys = tl.load(column_ptr + (start_c + offs_n) * stride_cic, mask=slot_ok, other=0)
            acc, l_i, m_i, c_i = _attend_keys(
                acc, l_i, m_i, c_i, q, keys, slot_ok, q_lim,
                k_head_ptr, v_head_ptr, ks_head_ptr, vs_head_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_sn, row_qk_scale, HEAD_DIM=HEAD_DIM, DOT_PRECISION=DOT_PRECISION, UPCAST_DOT=UPCAST_DOT,
                FP8=FP8, MASKED=True,
            )

        no_key = l_i == 0.0  # every read key has p = 1 at the running max, so l_i >= 1 otherwise
        l_safe = tl.where(no_key, 1.0, l_i)
        if FP8:
            out = tl.where(no_key[:, None], 0.0, acc * (c_i / l_safe)[:, None])
        else:
            out = tl.where(no_key[:, None], 0.0, acc / l_safe[:, None])
        lse = tl.where(no_key, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)

        out_ptrs = (out_ptr + out_slot.to(tl.int64) * stride_os + rows64[:, None] * stride_om + head * stride_oh
                    + offs_d[None, :] * stride_od)
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(lse_ptr + out_slot.to(tl.int64) * stride_ls + head * stride_lh + rows64 * stride_lm, lse,
                 mask=row_ok)


def _launch_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """num_warps / num_stages for 64 x 64 tiles. Not tuned: the dense kernel's 64x64 w4 s3 entry of
    the bench_attention sweep, with fewer stages where the tiles would not fit the H200's 228 KiB of
    shared memory (Q tile + num_stages * (K tile + V tile))."""
    if device.type != "cuda":
        return dict(num_warps=4, num_stages=1)
    tile_bytes = head_dim * _element_bytes(dtype)  # one row of a Q, K or V tile
    if tile_bytes >= 1024:  # fp32 x 256: a 64-row Q tile is 64 KiB and each K+V stage 128 KiB
        return dict(num_warps=8, num_stages=1)
    if tile_bytes >= 512:  # fp32 x 128 or 16-bit x 256: 32 KiB Q + 64 KiB per stage
        # a 64 x 256 fp32 accumulator is 128 registers a thread over 4 warps: use 8
        return dict(num_warps=8 if head_dim >= 256 else 4, num_stages=2)
    return dict(num_warps=4, num_stages=3)


def _element_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _check_inputs(q, k, v, index: VerticalSlashIndex, causal: bool, fp8: bool = False) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"vertical_slash_attention expects q [num_q, num_heads, head_dim] and k, v [num_kv, "
            f"num_kv_heads, head_dim], got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}."
        )
    num_q, num_heads, head_dim = q.shape
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"vertical_slash_attention supports head_dim a power of two in [16, 256], got {head_dim}.")
    if num_heads % k.shape[1]:
        raise ValueError(f"vertical_slash_attention: num_heads {num_heads} is not a multiple of "
                         f"num_kv_heads {k.shape[1]}.")
    if not fp8 and (q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype):
        raise ValueError(f"vertical_slash_attention supports float16/bfloat16/float32 with q, k, v of one "
                         f"dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if (index.num_q, index.num_kv, index.num_heads, index.causal) != (num_q, k.shape[0], num_heads, causal):
        raise ValueError(
            f"vertical_slash_attention: the index was built for num_q {index.num_q}, num_kv {index.num_kv}, "
            f"{index.num_heads} heads, causal={index.causal}; the call has num_q {num_q}, num_kv {k.shape[0]}, "
            f"{num_heads} heads, causal={causal}."
        )
    for name in ("block_m", "block_n"):
        size = getattr(index, name)
        if size < _MIN_BLOCK or size & (size - 1):
            raise ValueError(f"vertical_slash_attention needs index.{name} a power of two >= {_MIN_BLOCK}, "
                             f"got {size}.")


PROB_FIELDS = 8  # q slot, q row0, key begin, num_q, num_kv, causal, dense, out slot


def vertical_slash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: VerticalSlashIndex,
    *,
    softmax_scale: float,
    causal: bool,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: dict | None = None,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over the keys ``index`` selects; ``sparse_attend_reference``'s contract.

    q: [num_q, num_heads, head_dim]; k, v: [num_kv, num_kv_heads, head_dim], any strides; query head h
    reads kv head h // (num_heads // num_kv_heads). index: from ``build_vertical_slash_index`` with
    the same num_q, num_kv, num_heads and causal, block_m / block_n powers of two >= 16.
    Returns out [num_q, num_heads, head_dim] in q's dtype and lse [num_heads, num_q] float32 (natural
    log); rows that read no key get out = 0, lse = -inf. out / lse, if given, are written in place.
    config: num_warps / num_stages / heads_first (grid order) / split_masks (False: mask every tile,
    the kernel before clear tiles ran unmasked) overriding ``_launch_config`` (for
    benchmarks/bench_sparse.py --sweep; the result does not depend on it beyond float rounding).
    scales: FP8 attention: q, k, v float8_e4m3fn and their float32 scales (q [num_q, num_heads], k and v
    [num_kv, num_kv_heads]), as ``flash_attn_fp8`` takes them; out is then ``out_dtype`` (bf16 default).
    """
    fp8 = scales is not None
    _check_inputs(q, k, v, index, causal, fp8)
    if fp8:
        check_fp8_inputs("vertical_slash_attention", q, k, v, scales)
    num_q, num_heads, head_dim = q.shape
    num_kv = k.shape[0]
    if out is None:
        dtype = out_dtype or (torch.bfloat16 if fp8 else q.dtype)
        out = torch.empty(num_q, num_heads, head_dim, dtype=dtype, device=q.device)
    if lse is None:
        lse = torch.empty(num_heads, num_q, dtype=torch.float32, device=q.device)
    if num_q == 0:
        return out, lse
    if num_kv == 0:  # nothing to attend to: no launch
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    from qwen1m.transfer import host_to_device

    device = q.device
    prob = host_to_device(torch.tensor([[0, 0, 0, num_q, num_kv, int(causal), 0, 0]], dtype=torch.int32), device)
    _launch(q[None], k, v, out[None], lse[None], prob,
            index.block_count[None].to(device), index.block_offset[None].to(device),
            index.column_count[None].to(device), index.column_index[None].to(device),
            num_m_blocks=math.ceil(num_q / index.block_m), block_m=index.block_m, block_n=index.block_n,
            softmax_scale=softmax_scale, config=config,
            scales=(scales[0][None], scales[1], scales[2]) if fp8 else None)
    return out, lse


def vertical_slash_attention_batched(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BatchedVSIndex,
    problems: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    softmax_scale: float,
    config: dict | None = None,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Several sparse (or dense) attention problems over one K / V in one launch, written in place.

    q: [num_slots, num_tokens, num_heads, head_dim] (e.g. the DCA query rotations of a prefill step);
    k, v: [total_keys, num_kv_heads, head_dim]; index: problem p's index in slot p;
    problems: int32 [P, PROB_FIELDS] on q's device, per problem (q slot, first query row, first key,
    num_q, num_kv, causal, dense, out slot): rows [row0, row0 + num_q) of q[q slot] attend keys
    [first key, first key + num_kv) as ``vertical_slash_attention`` does with index.problem(p) and
    write the same rows of out[out slot]
    ([num_out_slots, num_tokens, num_heads, head_dim]) and lse[out slot] ([.., num_heads, num_tokens]).
    Problems with dense = 1 are skipped: ``kernels.flash_attn_problems.flash_attn_problems`` attends them.
    Rows that no problem writes are left as they were. No host synchronisation.
    scales: FP8 attention (attention_dtype="fp8"): q, k, v are float8_e4m3fn and these their float32
    scales, q's [num_slots, num_tokens, num_heads], k's and v's [total_keys, num_kv_heads] with equal
    strides (the FP8 KV cache's format); both products then run in e4m3 as in ``flash_attn_fp8``, and
    out keeps its own (16-bit) dtype.
    """
    if q.dim() != 4 or q.shape[2] % k.shape[1] or index.block_count.shape[1] != q.shape[2]:
        raise ValueError(f"vertical_slash_attention_batched: q {tuple(q.shape)}, k {tuple(k.shape)} and the "
                         f"index's {index.block_count.shape[1]} heads do not match.")
    if scales is not None:
        check_fp8_inputs("vertical_slash_attention_batched", q, k, v, scales)
    num_m_blocks = index.block_count.shape[2]
    if not index.problems or not num_m_blocks:
        return
    _launch(q, k, v, out, lse, problems, index.block_count, index.block_offset, index.column_count,
            index.column_index, num_m_blocks=num_m_blocks, block_m=index.block_m, block_n=index.block_n,
            softmax_scale=softmax_scale, config=config, scales=scales)


def _launch(q, k, v, out, lse, prob, block_count, block_offset, column_count, column_index, *,
            num_m_blocks, block_m, block_n, softmax_scale, config, scales=None):
    """One launch over (query blocks, heads, problems); q / out [slots, tokens, heads, dim], lse
    [slots, heads, tokens], index tensors [problems, heads, m blocks, ...]; scales: None, or for e4m3
    q / k / v their float32 scales (q [slots, tokens, heads], k and v [keys, kv heads], equal strides)."""
    num_heads, head_dim = q.shape[2], q.shape[3]
    fp8 = scales is not None
    qs, ks, vs = scales if fp8 else (q, k, v)  # unused pointers when not fp8
    launch = {"heads_first": False, "split_masks": True, **_launch_config(head_dim, q.dtype, q.device),
              **(config or {})}
    heads_first = bool(launch.pop("heads_first"))
    split = bool(launch.pop("split_masks"))
    num_problems = prob.shape[0]
    grid = (num_heads, num_m_blocks, num_problems) if heads_first else (num_m_blocks, num_heads, num_problems)
    _sparse_attn_fwd_kernel[grid](
        q, k, v, out, lse, prob, qs, ks, vs,
        block_count, block_offset, column_count, column_index,
        num_m_blocks, softmax_scale * _LOG2E,
        **problem_strides(q, k, v, out, lse, scales),
        stride_bcp=block_count.stride(0), stride_bch=block_count.stride(1), stride_bcm=block_count.stride(2),
        stride_bop=block_offset.stride(0), stride_boh=block_offset.stride(1),
        stride_bom=block_offset.stride(2), stride_bob=block_offset.stride(3),
        stride_ccp=column_count.stride(0), stride_cch=column_count.stride(1), stride_ccm=column_count.stride(2),
        stride_cip=column_index.stride(0), stride_cih=column_index.stride(1),
        stride_cim=column_index.stride(2), stride_cic=column_index.stride(3),
        GROUP=num_heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        # fp32 inputs get true fp32 products (tf32 would cost ~3e-4 relative error)
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # triton 3.9's interpreter computes bf16/fp16 tl.dot wrongly (see kernels/flash_attn.py)
        UPCAST_DOT=os.environ.get("TRITON_INTERPRET", "0") == "1",
        HEADS_FIRST=heads_first, SPLIT=split, FP8=fp8, **launch,
    )


__all__ = ["PROB_FIELDS", "vertical_slash_attention", "vertical_slash_attention_batched"]
