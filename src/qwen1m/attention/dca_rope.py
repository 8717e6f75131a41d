"""Rotations and YaRN temperature feeding ``dca_attention`` (design §2.2 position maps, design §2.5 scaling).

Kept apart from ``dca.py`` so the attention math there stays free of RoPE: it only sees rotated tensors.
"""

from __future__ import annotations

import math

import torch

from qwen1m.config import DCAConfig
from qwen1m.rope import RotaryEmbedding, dca_positions


def needed_rotations(num_total: int, dca: DCAConfig) -> int:
    """How many of the query rotations (intra, succ, inter) a step whose last token is at position
    num_total - 1 reads: a query in DCA chunk n = p // s attends the successive chunk if n >= 1 and
    older chunks if n >= 2 (design §2.3). Below one chunk (every prompt under ~254K tokens for the 1M
    models) the succ and inter copies would be computed for nothing."""
    return 1 + min(2, max(0, num_total - 1) // dca.chunk_len)


def rotate_for_dca(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    rotary: RotaryEmbedding,
    dca: DCAConfig,
    scale_len: int,
    num_rotations: int = 3,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, float]:
    """Rotate one step's new tokens for DCA and apply the YaRN attention temperature.

    q: [num_tokens, num_heads, head_dim]; k: [num_tokens, num_kv_heads, head_dim]; positions:
    [num_tokens] absolute token positions p. scale_len: L_req = max(prompt_len, current length), the
    length whose m = dca.yarn_scale(L_req) this step uses (every prompt chunk uses the prompt length,
    a decode step its current length; design §2.5). num_rotations: the first 1, 2 or 3 of the query
    rotations to compute (``needed_rotations``); the others come back as None.
    Returns q_intra, q_succ, q_inter (q rotated at p', min(p'+s, c), c), k_rot (k rotated at p' and
    multiplied by m; the caller writes it to its cache) and softmax_scale = m / sqrt(head_dim), so
    logits are scaled by m^2 as in vLLM.
    """
    if num_rotations not in (1, 2, 3):
        raise ValueError(f"rotate_for_dca: num_rotations must be 1, 2 or 3, got {num_rotations}.")
    pos = dca_positions(positions, dca)
    m = dca.yarn_scale(scale_len)
    k_rot = rotary.rotate(k, pos.key)
    if m != 1.0:
        k_rot = k_rot * m  # scaled once when written: a cached key keeps the m of its own step
    q_intra = rotary.rotate(q, pos.intra)
    q_succ = rotary.rotate(q, pos.succ) if num_rotations >= 2 else None
    q_inter = rotary.rotate(q, pos.inter) if num_rotations >= 3 else None
    return q_intra, q_succ, q_inter, k_rot, m / math.sqrt(q.shape[-1])


def rotate_critical(
    q: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, dca: DCAConfig, num_rotations: int = 3
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """q_succ_critical (p' + s) and q_inter_critical (p' + c): continuous positions used only to
    *select* sparse critical tokens in the successive and older chunks (design §3.4); None where
    num_rotations (as in ``rotate_for_dca``) says that region is never read."""
    pos = dca_positions(positions, dca)
    succ = rotary.rotate(q, pos.succ_critical) if num_rotations >= 2 else None
    inter = rotary.rotate(q, pos.inter_critical) if num_rotations >= 3 else None
    return succ, inter
