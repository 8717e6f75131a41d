"""FP8 (e4m3) attention for prefill: ``attention_dtype="fp8"`` (design §5, "FP8 attention").

Queries, keys and values are quantised per (token, head) with one float32 scale each, the format of
the FP8 KV cache (``cache/paged_kv.py``), so a cache in FP8 is read as it is stored and a 16-bit
cache is quantised once per layer and step. Both products of attention then run on FP8 tensor cores
(``kernels.flash_attn_fp8``); the scores, the softmax and the LSE stay float32, so DCA's
LSE merge is unchanged. Decode is not affected (it reads the cache with the paged decode kernel).

``fp8_attend`` has ``reference.attend``'s contract and takes k / v either as 16-bit tensors or as
``Fp8Tensor`` (already quantised). Where no kernel runs (a CPU without ``TRITON_INTERPRET=1``) it
emulates the kernel in float32 (``emulate``): the inputs' rounding exactly, and P's rounding to e4m3
with each key's V scale over its tile's largest, as the kernel does, but relative to the row's final
maximum instead of the running one (so not bit-equal: the same rounding at shifted points).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from qwen1m.attention.kernel_choice import KERNEL_BUILD_ERRORS
from qwen1m.attention.reference import attend
from qwen1m.cache.paged_kv import FP8_DTYPE, dequantize_fp8, quantize_fp8

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Fp8Tensor:
    """e4m3 values [n, heads, head_dim] and their float32 scales [n, heads]: the true tensor is
    ``values.float() * scale[..., None]``. Indexing the first dim indexes both (DCA slices key ranges)."""

    values: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def __getitem__(self, index) -> Fp8Tensor:
        return Fp8Tensor(self.values[index], self.scale[index])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8(self.values, self.scale, dtype)


def quantize(x: torch.Tensor, token_minor: bool = False) -> Fp8Tensor:
    """x [n, heads, head_dim] -> per-(token, head) e4m3 (scale = amax / 448, as the FP8 KV cache).
    token_minor: the values stored [heads, head_dim, n] (viewed as [n, heads, head_dim]), the layout
    Hopper's FP8 MMA reads the B operand of P.V from; V is quantised so when it is 16-bit."""
    n, heads, head_dim = x.shape
    if n <= _QUANTISE_ROWS:
        values, scale = quantize_fp8(x)
        values = values.view(FP8_DTYPE)
        return Fp8Tensor(_token_minor(values) if token_minor else values, scale)
    # in pieces: quantize_fp8 makes float32 temporaries of its input (2 GiB for a 1M-token layer's K)
    if token_minor:
        store = torch.empty(heads, head_dim, n, dtype=FP8_DTYPE, device=x.device)
        values = store.permute(2, 0, 1)
    else:
        values = torch.empty(n, heads, head_dim, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(n, heads, dtype=torch.float32, device=x.device)
    for start in range(0, n, _QUANTISE_ROWS):
        part, part_scale = quantize_fp8(x[start:start + _QUANTISE_ROWS])
        values[start:start + part.shape[0]] = part.view(FP8_DTYPE)
        scale[start:start + part.shape[0]] = part_scale
    return Fp8Tensor(values, scale)


_QUANTISE_ROWS = 65536  # tokens per piece: float32 temporaries of 65536 x 4 kv heads x 128 = 128 MiB


def _token_minor(values: torch.Tensor) -> torch.Tensor:
    return values.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def _as_fp8(x: torch.Tensor | Fp8Tensor) -> Fp8Tensor:
    return x if isinstance(x, Fp8Tensor) else quantize(x)


EMULATED_TILE = 128  # the GPU kernel's BLOCK_N for head_dim <= 128 (kernels.flash_attn_fp8._fp8_config; a test checks)
P_SCALE = 256.0  # kernels.fp8_tile.P_SCALE (a test checks they agree)


def emulate(q: Fp8Tensor, k: Fp8Tensor, v: Fp8Tensor, *, softmax_scale: float, causal: bool,
            tile: int = EMULATED_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 kernel's arithmetic in float32 PyTorch (module docstring): out float32, lse."""
    num_kv = k.shape[0]
    v_sc = v.scale.float().t()  # [num_kv_heads, num_kv]
    pad = (-num_kv) % tile
    tiles = torch.nn.functional.pad(v_sc, (0, pad)).view(v_sc.shape[0], -1, tile).amax(-1)
    c = tiles.repeat_interleave(tile, dim=1)[:, :num_kv].clamp_min(1e-30) / P_SCALE
    w = (v_sc / c)[:, None, None, :]  # P' = P * w <= P_SCALE

    def round_probs(probs: torch.Tensor) -> torch.Tensor:
        return (probs * w).to(FP8_DTYPE).float() / w

    return attend(q.dequantize(), k.dequantize(), v.dequantize(), softmax_scale=softmax_scale, causal=causal,
                  round_probs=round_probs)


def _kernel_runs(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def fp8_attend(q: torch.Tensor, k: torch.Tensor | Fp8Tensor, v: torch.Tensor | Fp8Tensor, *,
               softmax_scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.attend`` with q, k, v in e4m3 (module docstring); out in q's dtype."""
    qq, kq = quantize(q), _as_fp8(k)
    vq = v if isinstance(v, Fp8Tensor) else quantize(v, token_minor=q.is_cuda)
    if not _kernel_runs(q.device):
        out, lse = emulate(qq, kq, vq, softmax_scale=softmax_scale, causal=causal)
        return out.to(q.dtype), lse
    from qwen1m.kernels.flash_attn_fp8 import flash_attn_fp8

    out_dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16

    def run(vv: Fp8Tensor):
        return flash_attn_fp8(qq.values, kq.values, vv.values, qq.scale, kq.scale, vv.scale,
                              softmax_scale=softmax_scale, causal=causal, out_dtype=out_dtype)

    try:
        return run(vq)
    except KERNEL_BUILD_ERRORS as e:
        if vq.values.stride(0) == 1:
            raise
        # an FP8 cache's V is head_dim-minor; should this Triton not build P.V from that layout,
        # a token-minor copy of V (one byte per value, no dequantisation) serves instead
        global _V_COPY_WARNED
        if not _V_COPY_WARNED:
            log.warning("FP8 attention: V as the FP8 cache stores it cannot be read here (%s: %s); "
                        "V is copied token-minor per call instead", type(e).__name__, e)
            _V_COPY_WARNED = True
        return run(Fp8Tensor(_token_minor(vq.values), vq.scale))


_V_COPY_WARNED = False


__all__ = ["Fp8Tensor", "emulate", "fp8_attend", "quantize"]
