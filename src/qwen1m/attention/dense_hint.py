"""Which layers of a long prefill can skip the sparse path: the device's dense decisions, read a step later.

The batched sparse path (``sparse_batched``) decides on the device, per (piece, DCA region) problem,
whether a region is dense enough to attend with every key, so a layer makes no host sync. Its dense
regions then run in ``flash_attn_problems``; the estimate and index were made for nothing, and on an
H100/H200 our dense kernel is ~15% slower than the cuDNN kernel that dense DCA uses. Where a model's
attention has no sparse structure (random weights, or early layers at 128K) every region of every
step is dense, and the sparse path ends up slower than dense.

So each batched call leaves its decisions here: copied to pinned host memory without blocking, with
an event. At the next prefill step of the same sequence the layer reads them (the event finished a
whole step ago, so nothing waits in practice). If every region was dense, that step runs plain dense
DCA instead, with no estimate at all, until the sequence's keys exceed ``growth`` times the keys the
decision was made at; then the sparse path runs again and decides anew. Budgets are fixed numbers of
keys, so density only falls as keys grow: a hint errs toward dense, which is exact and never slower
than dense. A sequence is known by its first KV block (stable across its steps and across tensor
parallel ranks); a hint from another sequence, or from a later position, is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen1m.attention.metadata import SequenceSlice


@dataclass(slots=True)
class _Decision:
    first_block: int | None  # the sequence it was made for
    num_total: int  # keys of the step that made it
    num_problems: int
    host: torch.Tensor  # int32 dense flags of that step's problems (pinned on CUDA), first num_problems
    done: torch.cuda.Event | None  # when the copy to ``host`` has finished (None: on the CPU, done)


class DenseHints:
    """Per layer, the last batched sparse step's dense decisions (one backend's, all sequences)."""

    def __init__(self, growth: float) -> None:
        self.growth = growth
        self._last: dict[int, _Decision] = {}
        self._buffers: dict[int, torch.Tensor] = {}  # per layer: reused host memory (pinning is slow)

    def all_dense(self, layer: int, seq: SequenceSlice) -> bool:
        """Whether this step of ``seq`` may run dense without measuring: the same sequence's previous
        measurement found every region dense, and its keys have not grown past ``growth`` times since."""
        d = self._last.get(layer)
        if (not self.growth or d is None or d.first_block != seq.cache.first_block
                or seq.num_cached < d.num_total or seq.num_total > self.growth * d.num_total):
            return False
        if d.done is not None:
            d.done.synchronize()  # recorded a step ago: finished long since
        return bool(d.num_problems) and bool(d.host[: d.num_problems].all())

    def record(self, layer: int, seq: SequenceSlice, dense: torch.Tensor) -> None:
        """Keep this step's decisions (int32 [P] on the device), copied without blocking."""
        if not self.growth:
            return
        n = dense.numel()
        buf = self._buffers.get(layer)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 64), dtype=dense.dtype, pin_memory=dense.is_cuda)
            self._buffers[layer] = buf
        buf[:n].copy_(dense, non_blocking=dense.is_cuda)
        done = None
        if dense.is_cuda:
            done = torch.cuda.Event()
            done.record()
        self._last[layer] = _Decision(seq.cache.first_block, seq.num_total, n, buf, done)
