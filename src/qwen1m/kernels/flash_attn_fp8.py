"""FP8 (e4m3) flash-attention forward: the dense kernel of ``kernels/flash_attn.py`` with ``FP8=True``.

Inputs are e4m3 with one float32 scale per (token, head), the FP8 KV cache's format, so a cache in FP8
is read as stored. Both products run on FP8 tensor cores (design §4.8):
- Q.K: the query row's scale joins softmax_scale (one factor per row), the key's scale multiplies its
  score column; scores, softmax and LSE stay float32.
- P.V: a per-token V scale cannot leave the sum over keys, so it is folded into P:
  P' = P * v_scale / c with c = the tile's largest V scale / P_SCALE (P' <= 256 < 448), rounded to e4m3.
  acc is kept in units of the tile's c; moving to the next tile multiplies it by alpha * c_old / c_new,
  the rescale the online softmax does anyway. out = acc * c / l. The products of a tile are promoted
  into the float32 acc once per tile (Hopper's FP8 MMA otherwise accumulates with fewer bits).
- Error: one e4m3 rounding per probability (2^-4 of p_j |v_j|, plus 2^-10 of c for subnormals), the
  bound ``tests/kernels/test_flash_attn_fp8.py`` asserts. Under the interpreter, whose float32 -> e4m3
  cast is wrong near powers of two (triton 3.9), P is rounded with explicit arithmetic.
"""

from __future__ import annotations

import torch

from qwen1m.kernels.flash_attn import _check_out, _launch
from qwen1m.kernels.fp8_tile import check_fp8_inputs


def _fp8_config(head_dim: int, device: torch.device) -> dict[str, int]:
    """Tiles for e4m3 inputs: one-byte K/V tiles take half the shared memory of 16-bit ones.
    Not measured yet on a GPU (benchmarks/bench_attention.py --fp8 sweeps them)."""
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    return dict(BLOCK_M=128, BLOCK_N=128 if head_dim <= 128 else 64, num_warps=8, num_stages=3)


def flash_attn_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_scale: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``flash_attn`` on e4m3 inputs with one float32 scale per (token, head): the true q is
    ``q.float() * q_scale[..., None]``, and likewise k, v (the FP8 KV cache's format, so its bytes
    are read in place). Both products run on FP8 tensor cores; P is quantised to e4m3 with each key's
    V scale folded in (module docstring). k_scale and v_scale must have equal strides.
    Returns out [num_q, num_heads, head_dim] in ``out_dtype`` and lse [num_heads, num_q] float32.
    """
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[2] != k.shape[2]:
        raise ValueError(f"flash_attn_fp8: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match.")
    check_fp8_inputs("flash_attn_fp8", q, k, v, (q_scale, k_scale, v_scale))
    num_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_heads % num_kv_heads or head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"flash_attn_fp8: {num_heads} query heads over {num_kv_heads} kv heads of head_dim "
                         f"{head_dim} (a power of two in [16, 256]) are not supported.")
    if out is None:
        out = torch.empty(num_q, num_heads, head_dim, dtype=out_dtype, device=q.device)
    if lse is None:
        lse = torch.empty(num_heads, num_q, dtype=torch.float32, device=q.device)
    _check_out(q, out, lse, out_dtype)
    config = config or _fp8_config(head_dim, q.device)
    _launch(q, k, v, out, lse, (q_scale, k_scale, v_scale), softmax_scale=softmax_scale, causal=causal,
            config=config)
    return out, lse


__all__ = ["flash_attn_fp8"]
