"""Qwen2 / Qwen3 (dense) causal LM. Module names are the checkpoint keys (design §1.1).

Two entry points share the same weights:
- ``forward(input_ids, meta)``: the engine path. Tokens of one step are flat ([num_tokens]); the
  attention backend (dense or DCA, chosen from the config) rotates, caches and attends. Only the
  hidden states are returned; ``compute_logits`` projects the rows that need them (the last token of
  each sequence for generation), so a prefill chunk never materialises [num_tokens, vocab].
- ``forward_train(input_ids)``: batched [B, T], plain causal RoPE via torch SDPA, no cache; used by
  the training recipe.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qwen1m.attention.backend import AttentionBackend, make_backend
from qwen1m.attention.metadata import AttentionMetadata
from qwen1m.config import DCAConfig, ModelConfig
from qwen1m.model.layers import MLP, RMSNorm, fuse_linears
from qwen1m.model.wiring import ModelWiring
from qwen1m.rope import RotaryEmbedding
from qwen1m.sparse_config import SparseConfig


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:  # Qwen3: per-head RMSNorm on q and k, before RoPE
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.qkv_weight: torch.Tensor | None = None  # set by fuse_projections
        self.qkv_bias: torch.Tensor | None = None

    def fuse_projections(self) -> None:
        """q, k and v in one matrix: one GEMM (one GEMV in decode) instead of three."""
        self.qkv_weight, self.qkv_bias = fuse_linears([self.q_proj, self.k_proj, self.v_proj])

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [..., hidden] -> q [..., num_heads, head_dim], k, v [..., num_kv_heads, head_dim]
        (with fused projections: strided views of one output, nothing copied)."""
        lead = x.shape[:-1]
        if self.qkv_weight is not None:
            q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).split(
                [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                 self.num_kv_heads * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(*lead, self.num_heads, self.head_dim)
        k = k.view(*lead, self.num_kv_heads, self.head_dim)
        v = v.view(*lead, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        q, k, v = self._qkv(x)  # x: [num_tokens, hidden]
        out = backend(self.layer_idx, q, k, v, meta)
        return self.o_proj(out.reshape(x.shape[0], -1))

    def forward_train(self, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q, k, v = self._qkv(x)  # [B, T, heads, head_dim]
        cos, sin = rotary.cos_sin(torch.arange(seqlen, device=x.device), q.dtype)  # [T, 1, head_dim]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        group = self.num_heads // self.num_kv_heads
        # SDPA wants [B, heads, T, head_dim]; the GQA expand is a training-only cost at short lengths.
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(self.head_dim))
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seqlen, -1))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata,
                backend: AttentionBackend, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embeddings for layer 0, with residual None);
        residual: the stream before it. Returns (this layer's MLP output, the stream before it): each
        residual add is fused into the norm that follows it (RMSNorm.forward)."""
        # Under tensor parallelism o_proj and down_proj hold a slice of their input features, so each
        # rank's output is a partial sum that ``reduce`` (an all-reduce) completes.
        h, residual = (self.input_layernorm(x), x) if residual is None else self.input_layernorm(x, residual)
        attn = self.self_attn(h, meta, backend)
        h, residual = self.post_attention_layernorm(attn if reduce is None else reduce(attn), residual)
        mlp = self.mlp(h)
        return (mlp if reduce is None else reduce(mlp)), residual

    def forward_train(self, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        x = x + self.self_attn.forward_train(self.input_layernorm(x), rotary)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    """Serves both ``Qwen2ForCausalLM`` and ``Qwen3ForCausalLM`` checkpoints (dense)."""

    def __init__(self, cfg: ModelConfig, dca: DCAConfig | None = None, sparse: SparseConfig | None = None,
                 wiring: ModelWiring | None = None):
        super().__init__()
        wiring = wiring if wiring is not None else ModelWiring()
        self.config = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding.from_config(cfg)
        self.dca = dca if dca is not None else cfg.dca
        self.backend = make_backend(cfg, self.rotary, self.dca, sparse, kernels=wiring.kernels,
                                    telemetry=wiring.telemetry, probe=wiring.probe)
        # Tensor parallelism (qwen1m.parallel): an all-reduce over the ranks, and on the driver a hook
        # that broadcasts each step to the other ranks. Both None on one device.
        self.all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = wiring.all_reduce
        self.before_forward: Callable[[torch.Tensor, AttentionMetadata], None] | None = wiring.before_forward

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids: [num_tokens] -> final-norm hidden states [num_tokens, hidden]."""
        if self.before_forward is not None:  # tensor parallel driver: send the step to the other ranks
            self.before_forward(input_ids, meta)
        x, residual = self.model.embed_tokens(input_ids), None
        for layer in self.model.layers:
            x, residual = layer(x, residual, meta, self.backend, self.all_reduce)
        return self.model.norm(x, residual)[0]

    def fuse_projections(self) -> None:
        """After loading, for inference: q/k/v and gate/up as single matrices (see fuse_linears)."""
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, hidden] -> logits [n, vocab] in float32."""
        return self.lm_head(hidden).float()

    def forward_train(self, input_ids: torch.Tensor, gradient_checkpointing: bool = False) -> torch.Tensor:
        """input_ids: [B, T] -> logits [B, T, vocab] (positions 0..T-1, causal, no cache)."""
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            if gradient_checkpointing and self.training:
                x = checkpoint(layer.forward_train, x, self.rotary, use_reentrant=False)
            else:
                x = layer.forward_train(x, self.rotary)
        return self.lm_head(self.model.norm(x))
