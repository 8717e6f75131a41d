"""Per-step attention state, built by the runner and passed into ``model.forward`` (no module state).

A step processes a flat run of ``num_tokens`` new tokens that may belong to several sequences;
each sequence's tokens are contiguous in that run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from qwen1m.cache.paged_kv import SequenceBlocks


@dataclass(slots=True)
class SequenceSlice:
    """One sequence's part of a step."""

    query_start: int  # offset of this sequence's new tokens in the step's token dimension
    num_query: int  # new tokens of this sequence in this step (1 for decode)
    num_cached: int  # tokens already in the KV cache before this step (= position of the first new token)
    scale_len: int  # length L for the YaRN temperature: max(prompt_len, num_cached + num_query) (design §2.5)
    cache: SequenceBlocks  # where this sequence's keys and values live
    prompt_len: int = 0  # the request's prompt length (sparse prefill applies to long prompts only)

    @property
    def num_total(self) -> int:
        return self.num_cached + self.num_query


@dataclass(slots=True)
class AttentionMetadata:
    positions: torch.Tensor  # [num_tokens] int64: absolute position of each new token
    seqs: list[SequenceSlice]  # in token order; slices tile [0, num_tokens)
    # Tensors derived from this step's metadata once and reused by every layer (block tables of the
    # decoding sequences, their cache slots and key ranges); filled lazily by the attention backend.
    derived: dict[str, Any] = field(default_factory=dict)
