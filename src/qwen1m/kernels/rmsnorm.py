"""RMSNorm, optionally fused with the residual add before it, in one launch.

    h   = x + residual                        (rounded to x's dtype, as a torch add would)
    out = weight * round(h / rms(h))          (rms in float32; transformers' Qwen2RMSNorm)

Why: in PyTorch this is ~8 kernels (cast, square, mean, add, rsqrt, multiply, cast, multiply) plus
the residual add, each a few microseconds even inside a CUDA graph, for a few KiB of data per decode
row; a decoder layer has two of them (and Qwen3 two more on q and k). One program normalises one row
of ``N`` features held in registers (N <= 16K covers hidden sizes of every Qwen2/3 dense model).

Numerics follow transformers step by step: the residual sum is rounded to the activation dtype
(a bf16 + bf16 torch add), the variance is the float32 mean of squares of that rounded sum, the
normalised value is rounded to the activation dtype and multiplied by the weight in float32, then
rounded to the output dtype (weight dtype x activation dtype, as torch promotes them). The sum of
squares is reduced in a different order than torch's, so float32 results can differ in the last bit.
Under ``TRITON_INTERPRET=1`` bfloat16 rounding is done by hand (the interpreter's casts truncate).

Oracle and CPU path: ``rms_norm_reference`` (the PyTorch maths of ``qwen1m.model.layers.RMSNorm``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qwen1m.kernels.rounding import round_to

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_MAX_N = 16384


@triton.jit
def _rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    eps, N,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    X_DTYPE: tl.constexpr, O_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    h = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=ok, other=0.0).to(tl.float32)
        h = round_to(h + r, X_DTYPE, MANUAL_BF16)
        tl.store(res_out_ptr + row * stride_ro + offs, h.to(res_out_ptr.dtype.element_ty), mask=ok)
    var = tl.sum(h * h, 0) / N
    normed = round_to(h * (1.0 / tl.sqrt(var + eps)), X_DTYPE, MANUAL_BF16)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = round_to(w * normed, O_DTYPE, MANUAL_BF16)
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x: [..., N] (rows may be strided, the last dim contiguous); weight: [N].

    Returns ``weight * normalise(x)``; with ``residual`` (x's shape and dtype) returns
    (``weight * normalise(x + residual)``, ``x + residual``), the new residual stream."""
    n = x.shape[-1]
    if x.dtype not in _TL_DTYPES or weight.dtype not in _TL_DTYPES or n > _MAX_N:
        raise ValueError(f"rms_norm supports float32/float16/bfloat16 and N <= {_MAX_N}, got x {x.dtype}, "
                         f"weight {weight.dtype}, N {n}.")
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    if residual is not None:
        res = residual.reshape(-1, n)
        if res.stride(-1) != 1:
            res = res.contiguous()
        res_out = torch.empty_like(rows)
    else:
        res = res_out = rows  # never read or written
    if rows.shape[0]:
        _rmsnorm_kernel[(rows.shape[0],)](
            rows, res, weight, out, res_out, float(eps), n,
            rows.stride(0), res.stride(0), out.stride(0), res_out.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
            X_DTYPE=_TL_DTYPES[x.dtype], O_DTYPE=_TL_DTYPES[out_dtype], MANUAL_BF16=interpret,
            num_warps=4 if n <= 4096 else 8,
        )
    out = out.view(*x.shape[:-1], n)
    return out if residual is None else (out, res_out.view(*x.shape[:-1], n))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm`` in PyTorch: transformers' Qwen2RMSNorm after an optional residual add."""
    h = x if residual is None else x + residual
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(h.dtype)
    return out if residual is None else (out, h)


__all__ = ["rms_norm", "rms_norm_reference"]
