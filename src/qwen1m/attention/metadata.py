"""Per-step attention state, built by the runner and passed into ``model.forward`` (no module state).

A step processes a flat run of ``num_tokens`` new tokens that may belong to several sequences;
each sequence's tokens are contiguous in that run.

``decode_inputs`` builds the device inputs of the rows that decode in one batch (block tables, cache
slots, key ranges, YaRN factors) from the sequences' slices. It lives here, below the engine and
``parallel``, because both build a step's metadata: the engine's ``ModelRunner`` and every
tensor-parallel worker (from the slices the driver broadcasts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen1m.cache.paged_kv import SequenceBlocks
from qwen1m.config import DCAConfig


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
class DecodeInputs:
    """Device tensors of one decode batch, built once per step and read by every layer (or static
    buffers that a CUDA graph replays with)."""

    rows: torch.Tensor  # [B] int64: the decoding rows in the step's token dimension
    tables: torch.Tensor  # [B, max_blocks] int32: block tables, zero-padded
    slots: torch.Tensor  # [B] int64: flat cache row of each new token
    bounds: torch.Tensor  # [2, R, B] int32: start / end of each of the R key regions (1 dense, 3 DCA)
    scale: torch.Tensor  # [B, 1, 1]: YaRN factor m multiplying q and the new k (ones without DCA)

    @property
    def ranges(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per key region: (start [B], end [B]) views of ``bounds``."""
        return [(self.bounds[0, r], self.bounds[1, r]) for r in range(self.bounds.shape[1])]


@dataclass(slots=True)
class AttentionMetadata:
    positions: torch.Tensor  # [num_tokens] int64: absolute position of each new token
    seqs: list[SequenceSlice]  # in token order; slices tile [0, num_tokens)
    # The inputs of the rows the backend decodes in one batch (``AttentionBackend.decode_batch``),
    # built before the forward and read by every layer; None when no row decodes in a batch.
    decode: DecodeInputs | None = None


def decode_inputs(seqs: list[SequenceSlice], device: torch.device, dtype: torch.dtype,
                  dca: DCAConfig | None) -> DecodeInputs:
    """The decode batch ``seqs`` (one new token each) on ``device``: dense, one key range [0, L) per
    sequence and no temperature; DCA, up to three key ranges (design §2.4) and the YaRN factor of each
    sequence's length (design §2.5). dtype: the model's (the factor multiplies q and k)."""
    if dca is None:
        ends = torch.tensor([s.num_total for s in seqs], dtype=torch.int32)
        bounds, scale = torch.stack([torch.zeros_like(ends), ends])[:, None], None
    else:
        bounds, scale = _dca_decode_ranges(seqs, dca.chunk_len), [dca.yarn_scale(s.scale_len) for s in seqs]
    tables, slots = _tables_and_slots(seqs)
    rows = torch.tensor([s.query_start for s in seqs])
    to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    m = torch.ones(len(seqs), dtype=dtype) if scale is None else torch.tensor(scale, dtype=dtype)
    return DecodeInputs(to(rows), to(tables), to(slots), to(bounds.contiguous()), to(m)[:, None, None])


def _tables_and_slots(seqs: list[SequenceSlice]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s.cache.blocks) for s in seqs)
    tables = torch.zeros(len(seqs), width, dtype=torch.int32)
    for i, s in enumerate(seqs):
        tables[i, : len(s.cache.blocks)] = s.cache.block_table_cpu
    slots = torch.tensor([s.cache.slot(s.num_cached) for s in seqs], dtype=torch.int64)
    return tables, slots


def _dca_decode_ranges(seqs: list[SequenceSlice], s: int) -> torch.Tensor:
    """Design §2.4 for each sequence of length L (new token included), n = (L - 1) // s:
    intra [n s, L), succ [(n - 1) s, n s) if n >= 1, inter [0, (n - 1) s) if n >= 2 (else empty).
    Returns int32 [2 (start, end), R regions (intra, succ, inter), B] on the host, R = 1 + the largest
    n (at most 3): ranges that are empty for every sequence of the batch are left out, so that the
    decode kernel is launched with fewer ranges and decode_prep computes fewer query rotations (with
    Qwen2.5-7B-1M every context up to 253,952 tokens has only intra; there a three-range launch took
    0.0259 ms per layer at 32K where one range took 0.0230 ms, CUDA-graph timing,
    benchmarks/results/decode_ranges_2026-11-29.json)."""
    rows, top = [], 0
    for seq in seqs:
        length = seq.num_total
        n = (length - 1) // s
        top = max(top, n)
        succ = ((n - 1) * s, n * s) if n >= 1 else (0, 0)
        inter = (0, (n - 1) * s) if n >= 2 else (0, 0)
        rows.append((n * s, succ[0], inter[0], length, succ[1], inter[1]))  # starts, then ends
    return torch.tensor(rows, dtype=torch.int32).t().reshape(2, 3, len(seqs))[:, :min(3, top + 1)]
