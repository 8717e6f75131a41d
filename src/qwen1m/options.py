"""``EngineConfig`` options that are resolved against the checkpoint (``engine.builder.build_spec``):
the sparse config and the KV block size. Checks that need no checkpoint live in ``EngineConfig``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from qwen1m.config import DCAConfig
from qwen1m.errors import ConfigError
from qwen1m.sparse_config import SparseConfig, load_sparse_config

DEFAULT_BLOCK_SIZE = 64  # KV block size in tokens, halved until it divides the DCA chunk length


def sparse_option(option, folder: Path, cfg, dca: DCAConfig | None, threshold: int | None,
                  dense_above: float | None = None) -> SparseConfig | None:
    """LLM(sparse_attention_config=...): "auto" (the folder's file if present), a path, a SparseConfig,
    or None/False; the threshold comes from the option, else from the DCA config keys (design §1.2);
    dense_above overrides ``SparseConfig.dense_above_density``."""
    if option is None or option is False:
        return None
    overrides = {}
    if dense_above is not None:
        overrides["dense_above_density"] = dense_above
    if threshold is not None:
        overrides["threshold"] = threshold
    elif dca is not None and dca.sparse_attention_threshold is not None:
        overrides["threshold"] = dca.sparse_attention_threshold
    if dca is not None and dca.sparse_attention_last_q is not None:
        overrides["last_q"] = dca.sparse_attention_last_q
    if isinstance(option, SparseConfig):
        sparse = replace(option, **overrides) if overrides else option
    else:
        path = folder / "sparse_attention_config.json" if option == "auto" else Path(option)
        if option == "auto" and not path.is_file():
            return None
        sparse = load_sparse_config(path, cfg.num_hidden_layers, cfg.num_attention_heads, **overrides)
    if sparse.num_layers != cfg.num_hidden_layers or any(len(v) != cfg.num_attention_heads
                                                         for v in sparse.vertical_sizes):
        raise ConfigError(
            f"the sparse config has {sparse.num_layers} layers x {len(sparse.vertical_sizes[0])} heads but the model "
            f"has {cfg.num_hidden_layers} x {cfg.num_attention_heads}."
        )
    return sparse


def block_size_option(block_size: int | None, dca: DCAConfig | None) -> int:
    """DCA regions start at multiples of chunk_len, so chunk_len must be a whole number of blocks."""
    fit = DEFAULT_BLOCK_SIZE
    while dca is not None and dca.chunk_len % fit:
        fit //= 2
    if block_size is None:
        return fit
    if dca is not None and dca.chunk_len % block_size:
        raise ConfigError(
            f"The DCA chunk length chunk_size - local_size = {dca.chunk_len} is not a multiple of "
            f"block_size={block_size}; use a block_size that divides it, e.g. {fit}."
        )
    return block_size
