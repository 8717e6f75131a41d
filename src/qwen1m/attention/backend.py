"""Attention backends: one signature, chosen once per model from the config.

A backend receives the *unrotated* q, k, v of a step (RoPE is position-dependent and DCA needs
three query rotations, so rotation belongs to the attention algorithm), writes the step's keys
and values into each sequence's cache and returns the attention output.

    q: [num_tokens, num_heads, head_dim]   k, v: [num_tokens, num_kv_heads, head_dim]
    -> out: [num_tokens, num_heads, head_dim]

``DenseBackend`` is plain causal RoPE attention; ``DCABackend`` is Dual Chunk Attention with the
YaRN temperature (spec section 2). The attention arithmetic itself (``attend_fn``) is picked per
device by ``qwen1m.attention.ops``: the pure-PyTorch reference on CPU, kernels on GPU.
"""

from __future__ import annotations

import math

import torch

from qwen1m.attention.metadata import AttentionMetadata, SequenceSlice
from qwen1m.config import DCAConfig, ModelConfig
from qwen1m.model.rope import RotaryEmbedding


def _default_attend_fn(device: torch.device):
    try:
        from qwen1m.attention.ops import get_attend_fn
    except ImportError:  # ops module absent: the reference is always correct
        from qwen1m.attention.reference import attend

        return attend
    return get_attend_fn(device)


class AttentionBackend:
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        self.cfg = cfg
        self.rotary = rotary
        self._attend_fns: dict[torch.device, object] = {}

    def attend_fn(self, device: torch.device):
        if device not in self._attend_fns:
            self._attend_fns[device] = _default_attend_fn(device)
        return self._attend_fns[device]

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        for seq in meta.seqs:
            rows = slice(seq.query_start, seq.query_start + seq.num_query)
            out[rows] = self.forward_sequence(layer, q[rows], k[rows], v[rows], meta.positions[rows], seq)
        return out

    def forward_sequence(self, layer, q, k, v, positions, seq: SequenceSlice) -> torch.Tensor:
        raise NotImplementedError


class DenseBackend(AttentionBackend):
    """Causal attention with RoPE at the true positions."""

    def forward_sequence(self, layer, q, k, v, positions, seq):
        seq.cache.write(layer, seq.num_cached, self.rotary.rotate(k, positions), v)
        keys, values = seq.cache.view(layer, seq.num_total)
        q = self.rotary.rotate(q, positions)
        out, _ = self.attend_fn(q.device)(
            q, keys, values, softmax_scale=1.0 / math.sqrt(q.shape[-1]), causal=True
        )
        return out


class DCABackend(AttentionBackend):
    """Dual Chunk Attention (spec 2.2-2.5); equals DenseBackend while the sequence fits one chunk."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, dca: DCAConfig):
        super().__init__(cfg, rotary)
        self.dca = dca

    def forward_sequence(self, layer, q, k, v, positions, seq):
        from qwen1m.attention.dca import dca_attention
        from qwen1m.attention.dca_rope import rotate_for_dca

        q_intra, q_succ, q_inter, k_rot, scale = rotate_for_dca(
            q, k, positions, self.rotary, self.dca, seq.scale_len
        )
        seq.cache.write(layer, seq.num_cached, k_rot, v)
        keys, values = seq.cache.view(layer, seq.num_total)
        out, _ = dca_attention(
            q_intra, q_succ, q_inter, keys, values,
            begin=seq.num_cached, dca=self.dca, softmax_scale=scale, attend_fn=self.attend_fn(q.device),
        )
        return out


def make_backend(cfg: ModelConfig, rotary: RotaryEmbedding, dca: DCAConfig | None) -> AttentionBackend:
    """The registry: DCA when the checkpoint or the user asks for it, dense otherwise."""
    return DCABackend(cfg, rotary, dca) if dca is not None else DenseBackend(cfg, rotary)
