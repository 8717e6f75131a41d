"""Rotations and YaRN temperature feeding ``dca_attention`` (spec 2.2 position maps, spec 2.5 scaling).

Kept apart from ``dca.py`` so the attention math there stays free of RoPE: it only sees rotated tensors.
"""

from __future__ import annotations

import math

import torch

from qwen1m.config import DCAConfig
from qwen1m.model.rope import RotaryEmbedding, dca_positions


def rotate_for_dca(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    rotary: RotaryEmbedding,
    dca: DCAConfig,
    scale_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Rotate one step's new tokens for DCA and apply the YaRN attention temperature.

    q: [num_tokens, num_heads, head_dim]; k: [num_tokens, num_kv_heads, head_dim]; positions:
    [num_tokens] absolute token positions p. scale_len: L_req = max(prompt_len, current length), the
    length whose m = dca.yarn_scale(L_req) this step uses (every prompt chunk uses the prompt length,
    a decode step its current length; spec 2.5).
    Returns q_intra, q_succ, q_inter (q rotated at p', min(p'+s, c), c), k_rot (k rotated at p' and
    multiplied by m; the caller writes it to its cache) and softmax_scale = m / sqrt(head_dim), so
    logits are scaled by m^2 as in vLLM.
    """
    pos = dca_positions(positions, dca)
    m = dca.yarn_scale(scale_len)
    k_rot = rotary.rotate(k, pos.key)
    if m != 1.0:
        k_rot = k_rot * m  # scaled once when written: a cached key keeps the m of its own step
    q_intra = rotary.rotate(q, pos.intra)
    q_succ = rotary.rotate(q, pos.succ)
    q_inter = rotary.rotate(q, pos.inter)
    return q_intra, q_succ, q_inter, k_rot, m / math.sqrt(q.shape[-1])


def rotate_critical(
    q: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, dca: DCAConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """q_succ_critical (p' + s) and q_inter_critical (p' + c): continuous positions used only to
    *select* sparse critical tokens in the successive and older chunks (spec 3.4)."""
    pos = dca_positions(positions, dca)
    return rotary.rotate(q, pos.succ_critical), rotary.rotate(q, pos.inter_critical)
