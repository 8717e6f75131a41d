"""Build one rank's model and KV cache from a picklable spec (the driver and every TP worker use it).

``build_spec`` makes the spec from an ``EngineConfig`` and the checkpoint's config.json."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from qwen1m.attention.kernel_choice import KernelChoice
from qwen1m.cache.paged_kv import PagedKVCache
from qwen1m.cache.planner import MemoryPlan, check_fits, plan_memory
from qwen1m.config import ModelConfig, load_model_config
from qwen1m.engine_config import EngineConfig
from qwen1m.errors import ConfigError
from qwen1m.model.loader import load_model, resolve_dtype
from qwen1m.model.qwen2 import Qwen2ForCausalLM
from qwen1m.model.shard import TPShard, check_divisible, local_config, local_sparse
from qwen1m.model.wiring import ModelWiring
from qwen1m.options import block_size_option, sparse_option
from qwen1m.sparse_config import SparseConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BuildSpec:
    """Everything a rank needs to build its part of the engine (pickled to the worker processes):
    the options of an ``EngineConfig`` resolved against the checkpoint (``build_spec``)."""

    folder: Path
    config: ModelConfig  # the whole model's config, DCA resolved
    sparse: SparseConfig | None
    dtype: torch.dtype
    load_format: str  # "safetensors" or "dummy"
    fp8: bool
    block_size: int
    max_model_len: int
    explicit_len: bool  # max_model_len given by the user (refuse) or defaulted (lower to what fits)
    max_num_batched_tokens: int
    max_num_seqs: int
    gpu_memory_utilization: float
    kv_cache_memory: int | None
    tensor_parallel_size: int = 1
    attention_fp8: bool = False  # attention_dtype="fp8": dense prefill attention in e4m3


def build_spec(engine: EngineConfig, folder: Path, device: torch.device) -> BuildSpec:
    """Resolve ``engine``'s options against the checkpoint in ``folder``: DCA and sparse configs, dtype,
    block size and max_model_len, with the checks that need the model's config."""
    cfg = load_model_config(folder)
    dca = cfg.dca if engine.dca == "auto" else (engine.dca or None)
    explicit_len = engine.max_model_len is not None
    max_model_len = engine.max_model_len if explicit_len else cfg.max_position_embeddings
    if dca is not None and max_model_len > cfg.max_position_embeddings:
        raise ConfigError(
            f"max_model_len={max_model_len} exceeds max_position_embeddings={cfg.max_position_embeddings} "
            f"in {folder / 'config.json'}; DCA is only defined up to that length."
        )
    dtype = resolve_dtype(engine.dtype, cfg, device)
    sparse = sparse_option(engine.sparse_attention_config, folder, cfg, dca, engine.sparse_threshold,
                           engine.sparse_dense_above)
    check_divisible(cfg, engine.tensor_parallel_size)
    return BuildSpec(
        folder=folder, config=replace(cfg, dca=dca), sparse=sparse, dtype=dtype,
        load_format="dummy" if engine.load_format == "dummy" else "safetensors",
        fp8=engine.kv_cache_dtype == "fp8", block_size=block_size_option(engine.block_size, dca),
        max_model_len=max_model_len, explicit_len=explicit_len,
        max_num_batched_tokens=engine.max_num_batched_tokens, max_num_seqs=engine.max_num_seqs,
        gpu_memory_utilization=engine.gpu_memory_utilization, kv_cache_memory=engine.kv_cache_memory,
        tensor_parallel_size=engine.tensor_parallel_size, attention_fp8=engine.attention_dtype == "fp8",
    )


@dataclass(slots=True)
class RankParts:
    model: Qwen2ForCausalLM
    kv_cache: PagedKVCache
    plan: MemoryPlan
    max_model_len: int


def build_rank(spec: BuildSpec, shard: TPShard, device: torch.device, share: int = 1,
               wiring: ModelWiring | None = None) -> RankParts:
    """Load this rank's weights, plan memory and allocate the KV cache.

    With several ranks this is collective: the number of KV blocks is the minimum over the ranks, so
    every rank holds the same blocks and the driver's block tables are valid everywhere. ``share``:
    how many ranks (this one included) run on this device; each plans for its share of the memory.
    ``wiring``: what the model is built with (tensor-parallel collectives, kernels, reports).
    """
    cfg = local_config(spec.config, shard.size)
    sparse = local_sparse(spec.sparse, shard)
    if spec.attention_fp8:
        wiring = wiring if wiring is not None else ModelWiring()
        kernels = wiring.kernels if wiring.kernels is not None else KernelChoice()
        wiring = replace(wiring, kernels=replace(kernels, prefill_fp8=True))
    model = load_model(spec.folder, cfg, spec.dtype, device, load_format=spec.load_format, dca=cfg.dca,
                       sparse=sparse, shard=shard, wiring=wiring)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if shard.size > 1:  # every rank's weights are in place before any rank measures free memory
        import torch.distributed as dist

        dist.barrier()
    plan = plan_memory(cfg, dtype=spec.dtype, device=device, weight_bytes=weight_bytes, fp8=spec.fp8,
                       block_size=spec.block_size, max_model_len=spec.max_model_len,
                       max_num_batched_tokens=spec.max_num_batched_tokens, max_num_seqs=spec.max_num_seqs,
                       gpu_memory_utilization=spec.gpu_memory_utilization, kv_cache_memory=spec.kv_cache_memory,
                       share=share, sparse=sparse)
    if shard.size > 1:
        blocks = torch.tensor([plan.num_blocks], dtype=torch.int64, device=device)
        dist.all_reduce(blocks, op=dist.ReduceOp.MIN)
        plan = replace(plan, num_blocks=int(blocks.item()))
    logger.info("rank %d/%d %s", shard.rank, shard.size, plan)
    max_model_len = check_fits(plan, spec.max_model_len, spec.explicit_len)
    kv_cache = PagedKVCache(cfg.num_hidden_layers, plan.num_blocks, spec.block_size, cfg.num_key_value_heads,
                            cfg.head_dim, spec.dtype, device, fp8=spec.fp8)
    return RankParts(model, kv_cache, plan, max_model_len)
