"""FP8 (e4m3) tile arithmetic shared by the attention kernels (dense ``flash_attn``, its problem table
``flash_attn_problems``, sparse ``sparse_attn``): rounding P, folding each key's V scale into P, and the
inputs' contract. Why P.V is quantised this way: ``kernels/flash_attn_fp8.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

P_SCALE = tl.constexpr(256.0)  # P.V operands reach at most this (< 448, e4m3's largest)


@triton.jit
def _round_e4m3(x):
    """x >= 0 rounded to the nearest e4m3 value (3 mantissa bits; subnormal step 2^-9), in float32:
    what the GPU's cast does (ties aside), for the interpreter, whose cast to float8e4nv drops the
    carry into the exponent (127 becomes 64; triton 3.9)."""
    e = tl.floor(tl.log2(tl.maximum(x, 1.0e-30)))
    step = tl.exp2(tl.maximum(e, -6.0) - 3.0)
    return tl.floor(x / step + 0.5) * step


@triton.jit
def _fold_v_scale(acc, p, alpha, c_i, v, v_sc, EXPLICIT_ROUND: tl.constexpr):
    """FP8 P.V for one tile (kernels/flash_attn_fp8.py): each key's V scale goes into P,
    P' = P * v_scale / c with c = the tile's largest V scale / P_SCALE (so P' <= P_SCALE < 448), and
    acc, kept in units of c, is rescaled by c_old / c_new together with alpha: no extra pass over acc.
    Keys outside the tile's mask have v_sc = 0 (P' = 0); a tile with no V scale at all keeps c.
    Returns (acc rescaled, P' in v's dtype (e4m3) or explicitly rounded for the interpreter, the new c)."""
    v_max = tl.max(v_sc, 0)
    c_new = tl.where(v_max > 0.0, v_max / P_SCALE, c_i)
    acc = acc * (alpha * (c_i / c_new))[:, None]
    p_v = p * (v_sc / c_new)[None, :]
    if EXPLICIT_ROUND:  # the interpreter's float32 -> e4m3 cast is wrong near powers of two
        p_v = _round_e4m3(p_v)
    else:
        p_v = p_v.to(v.dtype)
    return acc, p_v, c_new


def check_fp8_inputs(who: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales) -> None:
    """e4m3 q / k / v with float32 scales of their shape less head_dim, K's and V's of equal strides
    (the FP8 kernels' contract); one sentence otherwise."""
    if any(t.dtype != torch.float8_e4m3fn for t in (q, k, v)):
        raise ValueError(f"{who} takes float8_e4m3fn q, k, v with scales, got {q.dtype}, {k.dtype}, {v.dtype}.")
    q_scale, k_scale, v_scale = scales
    if (q_scale.shape != q.shape[:-1] or k_scale.shape != k.shape[:-1] or v_scale.shape != k_scale.shape
            or k_scale.stride() != v_scale.stride()
            or any(t.dtype != torch.float32 for t in (q_scale, k_scale, v_scale))):
        raise ValueError(
            f"{who}: scales must be float32 q {tuple(q.shape[:-1])} and k, v {tuple(k.shape[:-1])} with equal "
            f"strides, got {tuple(q_scale.shape)}, {tuple(k_scale.shape)} {k_scale.stride()}, "
            f"{tuple(v_scale.shape)} {v_scale.stride()}.")


__all__ = ["P_SCALE", "check_fp8_inputs"]
