"""Rounding inside Triton kernels that reproduce PyTorch's per-op rounding of 16-bit tensors.

A torch op on bf16 / fp16 tensors computes in float32 and rounds its result to the dtype; kernels
that must match it bit for bit (decode_prep, rmsnorm) keep values in float32 and round after each
step with ``round_to``. The Triton interpreter's float32 -> bfloat16 cast truncates instead of
rounding, so under ``TRITON_INTERPRET=1`` (MANUAL_BF16) the rounding is done on the bits.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """float32 x -> float32 holding x rounded to DTYPE, to nearest even (identity for float32)."""
    if DTYPE == tl.float32:
        y = x
    elif MANUAL_BF16 and DTYPE == tl.bfloat16:
        # the interpreter truncates float32 -> bfloat16: round the upper 16 bits to nearest even
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        y = bits.to(tl.float32, bitcast=True)
    else:
        y = x.to(DTYPE).to(tl.float32)
    return y
