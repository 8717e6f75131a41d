"""Flash-attention forward in Triton, with the log-sum-exp, bottom-right causal masks and packed GQA.

Oracle: ``qwen1m.attention.reference.attend`` (same contract, same argument names).

Packed GQA. One program owns one kv head and ``BLOCK_M`` *rows*, where row ``r`` of the flattened
[num_q * group] axis is (token ``r // GROUP``, query head ``kv_head * GROUP + r % GROUP``). Every row of
a tile reads the same K/V, so each K/V tile is loaded once for all query heads of its group and no
K/V copy per query head exists. A tile spans ``BLOCK_M / GROUP`` tokens, so the causal diagonal
band is narrow: with GROUP = 7 a 128-row tile covers ~19 tokens.

Causal split (bottom-right: token t sees keys j <= t + num_kv - num_q). For the tile's tokens
[t_lo, t_hi], keys [0, t_lo + offset + 1) rounded down to BLOCK_N are visible to every row and run
without masks; keys up to t_hi + offset run with the mask; later keys are never visited, so causal
costs half of non-causal. Heavy tiles (late tokens) are launched first to shorten the tail.

Softmax in base 2: scores are scaled by softmax_scale * log2(e) once, so the inner loop uses exp2;
the LSE is converted back to natural log at the end. Masked scores get -1e6 (finite, so a row whose
first block is fully masked has no NaN); rows that see no key at all are known from their index and
written as out = 0, lse = -inf.

The same body, with the ``FP8`` switch, serves e4m3 inputs (``kernels/flash_attn_fp8.py``; its tile
arithmetic in ``kernels/fp8_tile.py``), and the dense problems of a sparse step
(``kernels/flash_attn_problems.py``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qwen1m.kernels.fp8_tile import _fold_v_scale

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, c_i,
    k_ptrs, v_ptrs, ks_ptrs, vs_ptrs,
    start, end, q_lim, num_kv,
    stride_kn, stride_vn, stride_ksn, stride_vsn, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, FP8: tl.constexpr,
):
    """Online softmax over keys [start, end) in BLOCK_N steps; k_ptrs / v_ptrs point at key 0.

    FP8 (kernels/flash_attn_fp8.py): q, K and V are e4m3 with one scale per (token, head); qk_scale is
    then a [BLOCK_M] vector (the query rows' scales times softmax_scale * log2 e), ks_ptrs / vs_ptrs
    point at key 0's K / V scales, and acc is kept in units of c_i, the current tile's P.V scale.
    """
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs += tl.cast(start, tl.int64) * stride_kn
    v_ptrs += tl.cast(start, tl.int64) * stride_vn
    if FP8:
        ks_ptrs += tl.cast(start, tl.int64) * stride_ksn
        vs_ptrs += tl.cast(start, tl.int64) * stride_vsn
    for start_n in range(start, end, BLOCK_N):
        if MASKED:
            key_ok = (start_n + offs_n) < num_kv
            k = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
        if UPCAST_DOT:
            qk = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, k, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if FP8:  # the keys' scales per column; the rows' (with softmax_scale) below
            if MASKED:
                k_sc = tl.load(ks_ptrs, mask=key_ok, other=0.0)
            else:
                k_sc = tl.load(ks_ptrs)
            qk = qk * k_sc[None, :]
            row_scale = qk_scale[:, None]
        else:
            row_scale = qk_scale
        if MASKED:
            visible = key_ok[None, :]
            if CAUSAL:
                visible = visible & ((start_n + offs_n)[None, :] <= q_lim[:, None])
            qk = qk * row_scale + tl.where(visible, 0.0, -1.0e6)
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk -= m_ij[:, None]
        elif FP8:
            qk = qk * row_scale
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk -= m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        if FP8:  # P.V in e4m3, each key's V scale folded into P (_fold_v_scale)
            if MASKED:
                v_sc = tl.load(vs_ptrs, mask=key_ok, other=0.0)
            else:
                v_sc = tl.load(vs_ptrs)
            acc, p_v, c_i = _fold_v_scale(acc, p, alpha, c_i, v, v_sc, UPCAST_DOT)
            ks_ptrs += BLOCK_N * stride_ksn
            vs_ptrs += BLOCK_N * stride_vsn
        else:
            acc = acc * alpha[:, None]
            p_v = p.to(v.dtype)
        if UPCAST_DOT:
            acc = tl.dot(p_v.to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
        elif FP8:
            # Hopper's FP8 MMA accumulates with fewer bits than float32 unless told how many products
            # it may add that way (triton's sm_90 default: all of them); acc sums up to 1M keys, so the
            # tile's products are promoted into the float32 acc once per tile
            acc = tl.dot(p_v, v, acc, input_precision=DOT_PRECISION, max_num_imprecise_acc=BLOCK_N)
        else:
            acc = tl.dot(p_v, v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i, c_i


@triton.jit
def _attn_rows(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, qs_ptr, ks_ptr, vs_ptr,
    pid_m, kv_head, num_q, num_kv, qk_scale,
    stride_qm, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_om, stride_oh, stride_od,
    stride_lh, stride_lm, stride_qsm, stride_qsh, stride_sn, stride_sh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    FP8: tl.constexpr,
):
    """One program's work: flattened rows [pid_m * BLOCK_M, +BLOCK_M) of kv head ``kv_head`` attend
    keys [0, num_kv); q / out / lse point at query row 0, k / v at key 0 (one problem of either kernel).
    FP8: qs / ks / vs point at the scales of query row 0 ([num_q, num_heads]) and of key 0 (K and V
    scales [num_kv, num_kv_heads] with equal strides); unused otherwise."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # flattened (token, head-in-group) rows
    tok = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = tok < num_q
    offs_d = tl.arange(0, HEAD_DIM)
    offset = num_kv - num_q
    q_lim = tok + offset  # causal: the last key each row sees

    # int64 offsets: at 1M tokens x 28 heads x 128, token * stride_qm overflows int32
    tok64 = tok.to(tl.int64)
    q_ptrs = q_ptr + tok64[:, None] * stride_qm + head[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    # K is read transposed, [HEAD_DIM, BLOCK_N]; V as [BLOCK_N, HEAD_DIM]. Each K/V element is read
    # once per tile: 2 * num_kv * HEAD_DIM elements per program, shared by all GROUP heads.
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs = k_ptr + kv_head * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_ptr + kv_head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    if FP8:  # the query rows' scales join softmax_scale: one factor per row
        ks_ptrs = ks_ptr + kv_head * stride_sh + offs_n * stride_sn
        vs_ptrs = vs_ptr + kv_head * stride_sh + offs_n * stride_sn
        q_sc = tl.load(qs_ptr + tok64 * stride_qsm + head * stride_qsh, mask=row_ok, other=0.0)
        qk_scale = q_sc * qk_scale
    else:
        ks_ptrs = k_ptr
        vs_ptrs = v_ptr

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    c_i = 1.0  # FP8: acc's unit (the last tile's P.V scale)

    if CAUSAL:
        tok_lo = (pid_m * BLOCK_M) // GROUP
        tok_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, num_q - 1)
        seen_by_all = tl.maximum(tok_lo + offset + 1, 0)  # keys every row of the tile sees
        unmasked_end = (seen_by_all // BLOCK_N) * BLOCK_N
        masked_end = tl.minimum(tok_hi + offset + 1, num_kv)
    else:
        unmasked_end = (num_kv // BLOCK_N) * BLOCK_N
        masked_end = num_kv
    acc, l_i, m_i, c_i = _attn_fwd_inner(
        acc, l_i, m_i, q, c_i, k_ptrs, v_ptrs, ks_ptrs, vs_ptrs, 0, unmasked_end, q_lim, num_kv,
        stride_kn, stride_vn, stride_sn, stride_sn, qk_scale,
        MASKED=False, CAUSAL=CAUSAL, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION,
        UPCAST_DOT=UPCAST_DOT, FP8=FP8,
    )
    acc, l_i, m_i, c_i = _attn_fwd_inner(
        acc, l_i, m_i, q, c_i, k_ptrs, v_ptrs, ks_ptrs, vs_ptrs, unmasked_end, masked_end, q_lim, num_kv,
        stride_kn, stride_vn, stride_sn, stride_sn, qk_scale,
        MASKED=True, CAUSAL=CAUSAL, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION,
        UPCAST_DOT=UPCAST_DOT, FP8=FP8,
    )

    if CAUSAL:  # rows before the first key (num_q > num_kv) see nothing
        no_key = q_lim < 0
    else:
        no_key = (tok < 0) | (num_kv <= 0)  # no keys at all (possible in the problem kernel's table)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    if FP8:
        out = acc * (c_i / l_safe)[:, None]
    else:
        out = acc / l_safe[:, None]
    out = tl.where(no_key[:, None], 0.0, out)
    lse = tl.where(no_key, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)

    out_ptrs = out_ptr + tok64[:, None] * stride_om + head[:, None] * stride_oh + offs_d[None, :] * stride_od
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + head * stride_lh + tok64 * stride_lm, lse, mask=row_ok)


@triton.jit
def _flash_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, qs_ptr, ks_ptr, vs_ptr,
    num_q, num_kv, qk_scale,
    stride_qm, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_om, stride_oh, stride_od,
    stride_lh, stride_lm, stride_qsm, stride_qsh, stride_sn, stride_sh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    FP8: tl.constexpr,
):
    if CAUSAL:  # heavy tiles first: the last tokens see the most keys
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    _attn_rows(
        q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, qs_ptr, ks_ptr, vs_ptr, pid_m, tl.program_id(1), num_q, num_kv,
        qk_scale, stride_qm, stride_qh, stride_qd, stride_kn, stride_kh, stride_kd, stride_vn, stride_vh,
        stride_vd, stride_om, stride_oh, stride_od, stride_lh, stride_lm, stride_qsm, stride_qsh, stride_sn,
        stride_sh, GROUP=GROUP, HEAD_DIM=HEAD_DIM, CAUSAL=CAUSAL, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        DOT_PRECISION=DOT_PRECISION, UPCAST_DOT=UPCAST_DOT, FP8=FP8,
    )


def _default_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """BLOCK_M / BLOCK_N / num_warps / num_stages for one call.

    head_dim 128, 16-bit: the best of the sweep in benchmarks/bench_attention.py on an H200
    (2026-11-29, triton 3.6, causal, 28 q / 4 kv heads; benchmarks/results/
    attention_2026-11-29_sweep.json; TFLOP/s at 8K / 32K):
      128x64 w8 s4: 460 / 479   128x64 w8 s3: 458 / 458   128x128 w8 s3: 449 / 466
      64x64 w4 s3: 399 / 419    256x64 w8 s2: 380 / 420   128x64 w4 s3: 147 / 160
    (4 warps on 128-row tiles run 3x slower: probably register spills, not checked.) Other head
    sizes and fp32 are scaled from it, not measured. Interpreter (CPU): small blocks so tiny tests
    cross block edges.
    """
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # 4-byte tiles: halve the blocks to fit shared memory
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim >= 256:
        return dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4 if head_dim == 128 else 3)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            f"flash_attn expects q [num_q, num_heads, head_dim] and k, v [num_kv, num_kv_heads, head_dim] "
            f"of equal shape, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}."
        )
    head_dim = q.shape[2]
    if k.shape[2] != head_dim:
        raise ValueError(f"flash_attn: q head_dim {head_dim} differs from k/v head_dim {k.shape[2]}.")
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"flash_attn supports head_dim a power of two in [16, 256], got {head_dim}.")
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"flash_attn: num_heads {q.shape[1]} is not a multiple of num_kv_heads {k.shape[1]}."
        )
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"flash_attn supports float16/bfloat16/float32 with q, k, v of one dtype, "
            f"got {q.dtype}, {k.dtype}, {v.dtype}."
        )


def _check_out(q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, out_dtype: torch.dtype) -> None:
    num_q, num_heads, _ = q.shape
    bad_out = out.shape != q.shape or out.dtype != out_dtype
    if bad_out or lse.shape != (num_heads, num_q) or lse.dtype != torch.float32:
        raise ValueError(
            f"flash_attn: out must be {tuple(q.shape)} {out_dtype} and lse ({num_heads}, {num_q}) float32, "
            f"got {tuple(out.shape)} {out.dtype} and {tuple(lse.shape)} {lse.dtype}."
        )


def _launch(q, k, v, out, lse, scales, *, softmax_scale: float, causal: bool, config: dict[str, int]):
    """One launch of the dense kernel; scales: None (16/32-bit) or (q, k, v scales) for e4m3 inputs."""
    num_q, num_heads, head_dim = q.shape
    num_kv, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    if num_q == 0:
        return
    if num_kv == 0:  # nothing to attend to: no launch
        out.zero_()
        lse.fill_(float("-inf"))
        return
    fp8 = scales is not None
    qs, ks, vs = scales if fp8 else (q, k, v)  # unused pointers when not fp8
    block_m = config["BLOCK_M"]
    grid = (triton.cdiv(num_q * group, block_m), num_kv_heads)
    _flash_attn_fwd_kernel[grid](
        q, k, v, out, lse, qs, ks, vs,
        num_q, num_kv, softmax_scale * _LOG2E,
        stride_qm=q.stride(0), stride_qh=q.stride(1), stride_qd=q.stride(2),
        stride_kn=k.stride(0), stride_kh=k.stride(1), stride_kd=k.stride(2),
        stride_vn=v.stride(0), stride_vh=v.stride(1), stride_vd=v.stride(2),
        stride_om=out.stride(0), stride_oh=out.stride(1), stride_od=out.stride(2),
        stride_lh=lse.stride(0), stride_lm=lse.stride(1),
        stride_qsm=qs.stride(0) if fp8 else 0, stride_qsh=qs.stride(1) if fp8 else 0,
        stride_sn=ks.stride(0) if fp8 else 0, stride_sh=ks.stride(1) if fp8 else 0,
        GROUP=group, HEAD_DIM=head_dim, CAUSAL=causal,
        BLOCK_M=block_m, BLOCK_N=config["BLOCK_N"],
        # fp32 inputs get true fp32 products (tf32 would cost ~3e-4 relative error)
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # triton 3.9's interpreter computes bf16/fp16 tl.dot wrongly; fp32 operands holding the same
        # 16-bit values give the GPU's result (exact products, fp32 accumulation)
        UPCAST_DOT=os.environ.get("TRITON_INTERPRET", "0") == "1", FP8=fp8,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )


def flash_attn_with_config(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool,
    config: dict[str, int],
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``flash_attn`` with explicit BLOCK_M / BLOCK_N / num_warps / num_stages (for tuning sweeps)."""
    _check_inputs(q, k, v)
    num_q, num_heads, head_dim = q.shape
    if out is None:
        out = torch.empty(num_q, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(num_heads, num_q, dtype=torch.float32, device=q.device)
    _check_out(q, out, lse, q.dtype)
    _launch(q, k, v, out, lse, None, softmax_scale=softmax_scale, causal=causal, config=config)
    return out, lse


def flash_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with LSE; the contract of ``qwen1m.attention.reference.attend``.

    q: [num_q, num_heads, head_dim]; k, v: [num_kv, num_kv_heads, head_dim], any strides (views of a
    cache are read in place). Query head h reads kv head h // (num_heads // num_kv_heads).
    causal: bottom-right aligned, query t sees keys j <= t + num_kv - num_q.
    Returns out [num_q, num_heads, head_dim] in q's dtype and lse [num_heads, num_q] float32 (natural
    log); rows that see no key get out = 0, lse = -inf. out / lse, if given, are written in place
    (any strides), e.g. slices of a larger result.
    """
    _check_inputs(q, k, v)
    config = _default_config(q.shape[2], q.dtype, q.device)
    return flash_attn_with_config(
        q, k, v, softmax_scale=softmax_scale, causal=causal, config=config, out=out, lse=lse
    )


__all__ = ["flash_attn", "flash_attn_with_config"]
