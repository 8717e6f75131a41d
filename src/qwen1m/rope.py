"""Rotary position embedding: plain RoPE, static YaRN / linear scaling, and DCA position maps.

A leaf module (it imports only ``qwen1m.config``): the model, the attention backends and the decode
kernel's reference all rotate with it, so none of them imports another for RoPE.

cos/sin are computed on the fly for the positions of a step (no table): a step touches at most a
prefill chunk of positions, and a 1M-row table would cost ~0.5 GB in float32. The arithmetic
(float32 ``position * inv_freq``, then cos/sin cast to the activation dtype) is the one transformers
uses, so logits match it bit for bit in float32.

DCA position maps (design §2.2, vLLM convention: clamp at c). With s = c - w and p' = p mod s:

    key            p'            (stored once, rotated, in the KV cache)
    q_intra        p'            same DCA chunk: true distances
    q_succ         min(p' + s, c)   previous chunk: exact inside the local window, clamped at c
    q_inter        c             older chunks: every key seen from the same, trained distance
    q_succ_crit    p' + s        sparse-pattern selection only (continuous positions)
    q_inter_crit   p' + c        sparse-pattern selection only
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qwen1m.config import DCAConfig, ModelConfig, RopeScaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF convention: the head dim is split in two halves, not interleaved pairs."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _yarn_inv_freq(base: float, dim: int, s: RopeScaling, max_pos: int) -> tuple[torch.Tensor, float]:
    """transformers' ``_compute_yarn_parameters``, reproduced so we depend on it only in tests."""
    factor = s.factor
    orig = s.original_max_position_embeddings or max_pos

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = get_mscale(factor, s.mscale) / get_mscale(factor, s.mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 where the frequency is high enough to extrapolate unchanged
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


class RotaryEmbedding(torch.nn.Module):
    """Applies RoPE at arbitrary integer positions; holds only ``inv_freq`` ([head_dim/2])."""

    def __init__(self, head_dim: int, base: float, scaling: RopeScaling | None = None, max_position: int = 0):
        super().__init__()
        self.head_dim = head_dim
        self.attention_scaling = 1.0
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        if scaling is None:
            inv_freq = 1.0 / (base**exponents)
        elif scaling.rope_type == "linear":
            inv_freq = 1.0 / (base**exponents) / scaling.factor
        else:
            inv_freq, self.attention_scaling = _yarn_inv_freq(base, head_dim, scaling, max_position)
        # A plain attribute, not a buffer: the loader builds modules on the meta device and this must
        # stay a real tensor; per-device copies are cached in ``_inv_freq_on``.
        self.inv_freq = inv_freq
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> RotaryEmbedding:
        return cls(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)

    def inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """inv_freq on ``device``, copied once (a decode graph captures the cached copy)."""
        inv_freq = self._inv_freq_on.get(device)
        if inv_freq is None:
            inv_freq = self._inv_freq_on[device] = self.inv_freq.to(device)
        return inv_freq

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [num_tokens] int -> cos, sin: [num_tokens, 1, head_dim] in ``dtype``."""
        inv_freq = self.inv_freq_on(positions.device)
        freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos[:, None, :], sin[:, None, :]

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, num_heads, head_dim]; positions: [num_tokens] -> rotated x (same shape, dtype)."""
        cos, sin = self.cos_sin(positions, x.dtype)
        return x * cos + rotate_half(x) * sin


@dataclass(frozen=True, slots=True)
class DCAPositions:
    """The RoPE position of each tensor under DCA for absolute positions ``p`` ([num_tokens] each)."""

    key: torch.Tensor
    intra: torch.Tensor
    succ: torch.Tensor
    inter: torch.Tensor
    succ_critical: torch.Tensor
    inter_critical: torch.Tensor


def dca_positions(p: torch.Tensor, dca: DCAConfig) -> DCAPositions:
    s, c = dca.chunk_len, dca.chunk_size
    r = p % s
    return DCAPositions(
        key=r,
        intra=r,
        succ=torch.clamp(r + s, max=c),
        inter=torch.full_like(r, min(2 * s - 1, c)),  # == c because w < s
        succ_critical=r + s,
        inter_critical=r + c,
    )
