"""The scheduler's one rule (vLLM v1): there is no prefill or decode phase.

Each sequence has ``num_tokens`` (prompt + generated) and ``num_computed_tokens`` (already in its KV
cache). A step hands out at most ``max_num_batched_tokens`` tokens: first one token to every
running sequence that is decoding (so a long prefill never starves them), then the rest of the
budget to sequences that still have prompt tokens to compute, in arrival order. Chunked prefill
falls out of the budget; continuous batching falls out of re-running the rule every step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from qwen1m.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_tokens: int  # tokens of this sequence computed in this step


class Scheduler:
    def __init__(
        self,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        allocate: Callable[[Sequence], bool],
        release: Callable[[Sequence], None],
        before_first_chunk: Callable[[Sequence], None] | None = None,
    ):
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        # A sequence reserves KV blocks for its whole length (prompt + max new tokens) when it starts
        # running, so a running sequence never waits for memory and nothing is ever preempted;
        # when the pool is short, new requests wait in the queue (FIFO) instead.
        self.allocate = allocate
        self.release = release
        # called when a sequence with nothing computed is about to get its first tokens (prefix
        # caching looks for a cached prefix again there: it may have appeared since admission)
        self.before_first_chunk = before_first_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSequence]:
        budget = self.max_num_batched_tokens
        while self.waiting and len(self.running) < self.max_num_seqs:
            if not self.allocate(self.waiting[0]):
                break
            seq = self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        decoding = [s for s in self.running if s.num_uncomputed == 1 and s.num_computed_tokens >= s.num_prompt_tokens]
        prefilling = [s for s in self.running if s not in decoding and s.num_uncomputed > 0]
        scheduled = []
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if self.before_first_chunk is not None and seq.num_computed_tokens == 0:
                self.before_first_chunk(seq)
            n = min(seq.num_uncomputed, budget)
            scheduled.append(ScheduledSequence(seq, n))
            budget -= n
        # the runner wants each sequence's tokens contiguous and in a stable order
        order = {id(s): i for i, s in enumerate(self.running)}
        scheduled.sort(key=lambda x: order[id(x.seq)])
        return scheduled

    def finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        if seq.cache is not None:
            self.release(seq)
            seq.cache = None
        if seq in self.running:
            self.running.remove(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        aborted = [s for s in list(self.waiting) + self.running if s.request_id == request_id]
        for seq in aborted:
            if seq in self.waiting:
                self.waiting.remove(seq)
            self.finish(seq)
            seq.finish_reason = "abort"
        return aborted
