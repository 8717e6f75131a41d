"""What one tensor-parallel rank holds.

Each rank builds the ordinary model from a *rank-local* config (heads, kv heads and the MLP width
divided by the world size), so module names and the attention code stay unchanged; the loader
then reads only the rank's slice of each checkpoint tensor:

    q_proj, k_proj, v_proj (weight, bias), gate_proj, up_proj   column parallel: rows split (dim 0)
    o_proj, down_proj                                            row parallel: columns split (dim 1),
                                                                 outputs all-reduced by the model
    embeddings, norms, lm_head                                   replicated

Head h of rank r is global head r * num_heads_local + h, so q heads and their kv heads stay together
(rank r holds kv heads [r * kv_local, (r + 1) * kv_local) and exactly the q heads that read them).

It lives in model/ because it names the model's checkpoint tensors: the loader, the engine's
``build_rank`` and parallel/ all import it from here, so engine/ never imports parallel/.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from qwen1m.config import ModelConfig
from qwen1m.errors import ConfigError
from qwen1m.sparse_config import SparseConfig

_COLUMN = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
           "gate_proj.weight", "up_proj.weight")
_ROW = ("o_proj.weight", "down_proj.weight")


@dataclass(frozen=True, slots=True)
class TPShard:
    rank: int
    size: int

    def split_dim(self, name: str) -> int | None:
        """The dimension of checkpoint tensor ``name`` this rank holds a slice of (None: replicated)."""
        if self.size == 1:
            return None
        if name.endswith(_COLUMN):
            return 0
        if name.endswith(_ROW):
            return 1
        return None

    def bounds(self, full: int) -> tuple[int, int]:
        part = full // self.size
        return self.rank * part, (self.rank + 1) * part


def check_divisible(cfg: ModelConfig, size: int) -> None:
    for name, value in (("num_key_value_heads", cfg.num_key_value_heads),
                        ("num_attention_heads", cfg.num_attention_heads),
                        ("intermediate_size", cfg.intermediate_size)):
        if value % size:
            raise ConfigError(
                f"tensor_parallel_size={size} does not divide the model's {name}={value}; "
                f"use a size that divides {cfg.num_key_value_heads} (the KV heads)."
            )


def local_config(cfg: ModelConfig, size: int) -> ModelConfig:
    """The config of one rank's slice of the model (same for every rank)."""
    check_divisible(cfg, size)
    if size == 1:
        return cfg
    return replace(cfg, num_attention_heads=cfg.num_attention_heads // size,
                   num_key_value_heads=cfg.num_key_value_heads // size,
                   intermediate_size=cfg.intermediate_size // size)


def local_sparse(sparse: SparseConfig | None, shard: TPShard) -> SparseConfig | None:
    """The per-head budgets of this rank's heads."""
    if sparse is None or shard.size == 1:
        return sparse
    num_heads = len(sparse.vertical_sizes[0])
    lo, hi = shard.bounds(num_heads)
    return replace(sparse, vertical_sizes=tuple(row[lo:hi] for row in sparse.vertical_sizes),
                   slash_sizes=tuple(row[lo:hi] for row in sparse.slash_sizes),
                   scores=tuple(row[lo:hi] for row in sparse.scores))
