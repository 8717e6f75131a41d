"""Memory planner: decide the KV cache size before allocating anything large.

    usable      = GPU total * gpu_memory_utilization      (CPU: the kv_cache_memory budget)
    kv_budget   = usable - memory already in use (our weights included) - peak activations of one step
    max tokens  = kv_budget // kv_bytes_per_token          (rounded down to whole blocks)

The peak activation estimate covers one step of ``max_num_batched_tokens`` tokens: the residual
stream and its norms, q/k/v (three DCA query rotations), the MLP's gate/up products, fp32 attention
partials, one layer's K/V gather (FP8 dequantisation or fragmented blocks) over ``max_model_len``
keys, and the sampled rows' logits; with a sparse config, also sparse prefill's workspace for a chunk
over ``max_model_len`` keys (``sparse_bytes``). It is deliberately generous (x1.25): running out of
memory in the middle of a 1M-token prefill loses minutes of work, refusing at start-up loses nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from qwen1m.cache.paged_kv import PagedKVCache
from qwen1m.config import ModelConfig
from qwen1m.errors import ConfigError
from qwen1m.sparse_config import SparseConfig

logger = logging.getLogger(__name__)

_GIB = 1 << 30
LOGITS_ROWS = 1024  # LLM.logits computes the lm_head in slices of this many rows
CPU_DEFAULT_FRACTION = 0.25  # default CPU KV budget: at most this share of physical memory ...
CPU_DEFAULT_SEQS = 8  # ... and at most this many full-length (max_model_len) sequences


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    device: str
    usable_bytes: int  # what the engine may use in total on the device
    weight_bytes: int
    activation_bytes: int  # peak of one engine step (estimate)
    kv_bytes_per_token: int
    block_size: int
    num_blocks: int
    kv_dtype: str

    @property
    def max_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def kv_bytes(self) -> int:
        return self.max_tokens * self.kv_bytes_per_token

    def __str__(self) -> str:
        return (f"memory plan on {self.device}: usable {self.usable_bytes / _GIB:.2f} GiB = weights "
                f"{self.weight_bytes / _GIB:.2f} GiB + activations <= {self.activation_bytes / _GIB:.2f} GiB + "
                f"KV cache {self.kv_bytes / _GIB:.2f} GiB ({self.kv_dtype}, {self.kv_bytes_per_token:,} bytes/token, "
                f"{self.num_blocks:,} blocks of {self.block_size}) -> {self.max_tokens:,} tokens fit")


def sparse_bytes(cfg: ModelConfig, sparse: SparseConfig | None, dtype: torch.dtype, num_tokens: int,
                 max_model_len: int) -> int:
    """Sparse prefill's memory in one step beyond dense prefill's: the two query rotations that only
    select (``dca_rope.rotate_critical``) and the batched path's workspace for num_tokens queries over
    max_model_len keys (``sparse_workspace.sparse_workspace_bytes``). 0 without a sparse config or when
    no prompt is longer than its threshold."""
    from qwen1m.cache.sparse_workspace import sparse_workspace_bytes

    if sparse is None or max_model_len <= sparse.threshold:
        return 0
    b = torch.empty((), dtype=dtype).element_size()
    budgets = [sparse.budgets(layer) for layer in range(sparse.num_layers)]
    chunk_len = cfg.dca.chunk_len if cfg.dca is not None else None
    critical = 2 * num_tokens * cfg.num_attention_heads * cfg.head_dim * b if chunk_len is not None else 0
    return critical + sparse_workspace_bytes(
        num_tokens, max_model_len, num_heads=cfg.num_attention_heads, head_dim=cfg.head_dim, element_size=b,
        max_vertical=max(max(v, default=0) for v, _ in budgets), max_slash=max(max(s, default=0) for _, s in budgets),
        cfg=sparse, chunk_len=chunk_len)


def activation_bytes(cfg: ModelConfig, dtype: torch.dtype, max_num_batched_tokens: int, max_model_len: int,
                     max_num_seqs: int, sparse: SparseConfig | None = None) -> int:
    b = torch.empty((), dtype=dtype).element_size()
    t = min(max_num_batched_tokens, max_model_len)  # a step never holds more tokens than one sequence
    h, q_dim, kv_dim = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    residual = 4 * t * h * b
    qkv = t * (4 * q_dim + 2 * kv_dim) * b  # q + three DCA rotations, k, v
    mlp = 3 * t * cfg.intermediate_size * b
    attn = 4 * t * q_dim * 4  # fp32 partial outputs of up to three regions + merged
    gather = 2 * max_model_len * kv_dim * b
    logits = max(max_num_seqs, LOGITS_ROWS) * cfg.vocab_size * 4
    sparse_ws = sparse_bytes(cfg, sparse, dtype, t, max_model_len)
    return int(1.25 * (residual + qkv + mlp + attn + gather + logits + sparse_ws))


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * _GIB


def plan_memory(
    cfg: ModelConfig,
    *,
    dtype: torch.dtype,
    device: torch.device,
    weight_bytes: int,
    fp8: bool,
    block_size: int,
    max_model_len: int,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    gpu_memory_utilization: float,
    kv_cache_memory: int | None,
    share: int = 1,
    sparse: SparseConfig | None = None,
) -> MemoryPlan:
    """Size the KV cache. ``kv_cache_memory`` (bytes) overrides the computed KV budget on any device.

    sparse: this rank's sparse prefill config, if any: its workspace is reserved with the activations.

    share: the number of processes planning on this GPU at once (tensor-parallel ranks placed on one
    device, ``parallel/placement.py``); each takes 1/share of what is left after everything already
    in use (all their weights: the ranks meet in a barrier first) and their activations.
    """
    per_token = PagedKVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                             dtype, fp8)
    act = activation_bytes(cfg, dtype, max_num_batched_tokens, max_model_len, max_num_seqs, sparse)
    if kv_cache_memory is not None:
        if kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be a positive number of bytes, got {kv_cache_memory}.")
        kv_budget = kv_cache_memory
        usable = weight_bytes + act + kv_budget
    elif device.type == "cuda":
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}.")
        torch.cuda.empty_cache()  # blocks cached by PyTorch but unused are free for the KV cache
        free, total = torch.cuda.mem_get_info(device)
        usable = int(total * gpu_memory_utilization)
        # what is already taken (our weights, loaded before planning, and anything else on the GPU,
        # e.g. another engine in this process) is not ours to give to the KV cache
        kv_budget = (usable - (total - free) - share * act) // share
        usable //= share
    else:  # CPU: enough for a few full-length sequences, at most a quarter of the machine's memory
        kv_budget = min(int(physical_memory() * CPU_DEFAULT_FRACTION),
                        max_model_len * min(max_num_seqs, CPU_DEFAULT_SEQS) * per_token)
        usable = weight_bytes + act + kv_budget
    num_blocks = max(0, kv_budget // (per_token * block_size))
    kv_name = "fp8_e4m3" if fp8 else str(dtype).removeprefix("torch.")
    return MemoryPlan(str(device), usable, weight_bytes, act, per_token, block_size, num_blocks, kv_name)


def check_fits(plan: MemoryPlan, max_model_len: int, explicit: bool, tensor_parallel_hint: bool = True) -> int:
    """The max_model_len to use: refused with one sentence if an explicit value does not fit;
    a default (from max_position_embeddings) is lowered to what fits, with a log line."""
    if plan.max_tokens >= max_model_len:
        return max_model_len
    if not explicit and plan.max_tokens >= 2:
        logger.warning("max_model_len lowered from %d to %d tokens: that is what fits in the KV cache (%s)",
                       max_model_len, plan.max_tokens, plan)
        return plan.max_tokens
    helps = "a smaller max_model_len"
    if plan.kv_dtype != "fp8_e4m3":
        helps += ", kv_cache_dtype='fp8' (half the KV bytes)"
    helps += ", a larger gpu_memory_utilization or kv_cache_memory" + (", or more GPUs" if tensor_parallel_hint else "")
    raise ConfigError(
        f"max_model_len={max_model_len:,} tokens needs {max_model_len * plan.kv_bytes_per_token / _GIB:.1f} GiB of "
        f"KV cache but only {plan.max_tokens:,} tokens ({plan.kv_bytes / _GIB:.1f} GiB) fit on {plan.device} after "
        f"{plan.weight_bytes / _GIB:.1f} GiB of weights and {plan.activation_bytes / _GIB:.1f} GiB of activations; "
        f"use {helps}."
    )
