"""Exact LSE merge of partial attention results over disjoint key sets, in Triton.

Oracle: ``qwen1m.attention.reference.merge_attn_states``. For parts (o_a, lse_a), (o_b, lse_b):
LSE = log(exp(lse_a) + exp(lse_b)) and o = w_a * o_a + w_b * o_b with w_p = exp(lse_p - LSE).
More than two parts merge pairwise, keeping the running result in float32 (the merge is
associative, so this is exact up to rounding). An empty part (lse = -inf) gets weight 0; if both
are empty the row is out = 0, lse = -inf. Memory-bound: one read of each part, one write.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_attn_states_kernel(
    out_ptr, lse_ptr, a_out_ptr, a_lse_ptr, b_out_ptr, b_lse_ptr,
    num_heads,
    stride_om, stride_oh, stride_od,
    stride_lh, stride_lm,
    stride_aom, stride_aoh, stride_aod,
    stride_alh, stride_alm,
    stride_bom, stride_boh, stride_bod,
    stride_blh, stride_blm,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    h_ok = offs_h < num_heads

    lse_a = tl.load(a_lse_ptr + offs_h * stride_alh + tok * stride_alm, mask=h_ok, other=float("-inf"))
    lse_b = tl.load(b_lse_ptr + offs_h * stride_blh + tok * stride_blm, mask=h_ok, other=float("-inf"))
    m = tl.maximum(lse_a, lse_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # both empty: keep exp() away from -inf - -inf
    w_a = tl.exp(lse_a - m_safe)
    w_b = tl.exp(lse_b - m_safe)
    total = w_a + w_b
    total_safe = tl.where(total > 0.0, total, 1.0)
    lse = tl.where(total > 0.0, m_safe + tl.log(total_safe), float("-inf"))
    w_a = w_a / total_safe
    w_b = w_b / total_safe

    mask = h_ok[:, None]
    o_a = tl.load(a_out_ptr + tok * stride_aom + offs_h[:, None] * stride_aoh + offs_d[None, :] * stride_aod,
                  mask=mask, other=0.0).to(tl.float32)
    o_b = tl.load(b_out_ptr + tok * stride_bom + offs_h[:, None] * stride_boh + offs_d[None, :] * stride_bod,
                  mask=mask, other=0.0).to(tl.float32)
    out = w_a[:, None] * o_a + w_b[:, None] * o_b
    tl.store(out_ptr + tok * stride_om + offs_h[:, None] * stride_oh + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + offs_h * stride_lh + tok * stride_lm, lse, mask=h_ok)


def _merge_two(
    a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    (a_out, a_lse), (b_out, b_lse) = a, b
    num_q, num_heads, head_dim = a_out.shape
    if b_out.shape != a_out.shape or a_lse.shape != (num_heads, num_q) or b_lse.shape != a_lse.shape:
        raise ValueError(
            "merge_attn_states: parts must share out [num_q, num_heads, head_dim] and lse "
            "[num_heads, num_q], "
            f"got {tuple(a_out.shape)}/{tuple(a_lse.shape)} and {tuple(b_out.shape)}/{tuple(b_lse.shape)}."
        )
    if head_dim & (head_dim - 1):
        raise ValueError(f"merge_attn_states supports a power-of-two head_dim, got {head_dim}.")
    out = torch.empty(num_q, num_heads, head_dim, dtype=out_dtype, device=a_out.device)
    lse = torch.empty(num_heads, num_q, dtype=torch.float32, device=a_out.device)
    if num_q == 0:
        return out, lse
    if a_lse.dtype != torch.float32:
        a_lse = a_lse.float()
    if b_lse.dtype != torch.float32:
        b_lse = b_lse.float()
    block_h = min(triton.next_power_of_2(num_heads), max(1, 4096 // head_dim))
    grid = (num_q, triton.cdiv(num_heads, block_h))
    _merge_attn_states_kernel[grid](
        out, lse, a_out, a_lse, b_out, b_lse,
        num_heads,
        stride_om=out.stride(0), stride_oh=out.stride(1), stride_od=out.stride(2),
        stride_lh=lse.stride(0), stride_lm=lse.stride(1),
        stride_aom=a_out.stride(0), stride_aoh=a_out.stride(1), stride_aod=a_out.stride(2),
        stride_alh=a_lse.stride(0), stride_alm=a_lse.stride(1),
        stride_bom=b_out.stride(0), stride_boh=b_out.stride(1), stride_bod=b_out.stride(2),
        stride_blh=b_lse.stride(0), stride_blm=b_lse.stride(1),
        HEAD_DIM=head_dim, BLOCK_H=block_h,
        num_warps=4,
    )
    return out, lse


def merge_attn_states(
    parts: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax over the union of disjoint key sets from per-part (out, lse).

    parts: list of (out [num_q, num_heads, head_dim], lse [num_heads, num_q] float32).
    Returns (out [num_q, num_heads, head_dim] in parts[0]'s out dtype, lse [num_heads, num_q] float32).
    """
    if not parts:
        raise ValueError("merge_attn_states needs at least one part.")
    if len(parts) == 1:
        return parts[0]
    out_dtype = parts[0][0].dtype
    merged = parts[0]
    for i, part in enumerate(parts[1:], start=2):
        # intermediate results stay float32 so a chain rounds to out_dtype once
        merged = _merge_two(merged, part, out_dtype if i == len(parts) else torch.float32)
    return merged


__all__ = ["merge_attn_states"]
