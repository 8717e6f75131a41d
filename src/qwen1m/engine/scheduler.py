"""The scheduler's one rule (vLLM v1): there is no prefill or decode phase.

Each sequence has ``num_tokens`` (prompt + generated) and ``num_computed_tokens`` (already in its KV
cache). A step hands out at most ``max_num_batched_tokens`` tokens: first one token to every
running sequence that is decoding (so a long prefill never starves them), then the rest of the
budget to running sequences that still have tokens to compute, then to waiting sequences, in
arrival order. Chunked prefill falls out of the budget; continuous batching falls out of re-running
the rule every step.

Memory. A sequence holds KV blocks for the tokens it has, not for its whole ``max_tokens``: it gets
its prompt's blocks when admitted and one more block each time it fills the last one. So a request
that may run to max_model_len (a chat without ``max_tokens``, ``n=6`` of them) costs only what it has
written, and a small request behind it is admitted as soon as its prompt fits. When a running
sequence needs a block and none is free, the newest running sequence is preempted: its blocks go
back to the pool and it returns to the front of the queue, to be recomputed (prompt and generated
tokens, as one longer prompt) when blocks are free again. The oldest sequence therefore always makes
progress. Recompute gives the same keys where DCA's YaRN temperature is 1 (no DCA, or lengths below
its training length: every CPU test); beyond it the recomputed keys carry the temperature of the
length at recompute, as a prompt of that length would (``SequenceSlice.scale_len``).

While a step preempts, it admits nothing (vLLM v1's rule: admitting would only feed the next
preemption). Admission is first come, first served, except that a prompt too large for the free
blocks lets smaller ones that fit go first, a bounded number of times (``OVERTAKE_LIMIT``).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from qwen1m.engine.sequence import Sequence, SequenceStatus
from qwen1m.errors import RequestError

# A waiting sequence whose prompt does not fit in the free blocks lets later ones that fit start
# first, at most this many times (then it waits at the head until blocks free up), looking this far
# down the queue: a 4-token request does not wait behind a 100K-token prompt, and the prompt still starts.
OVERTAKE_LIMIT = 64
OVERTAKE_LOOKAHEAD = 32


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
        *,
        grow: Callable[[Sequence, int], bool],
        fits: Callable[[int], bool],
    ):
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.allocate = allocate  # blocks for a sequence's known tokens, at admission; False when short
        self.grow = grow  # (seq, num_tokens): blocks for num_tokens tokens; False when short
        self.release = release
        self.fits = fits  # num_tokens -> whether an otherwise empty cache holds that many for one sequence
        # called when a sequence with nothing computed is about to get its first tokens (prefix
        # caching looks for a cached prefix again there: it may have appeared since admission)
        self.before_first_chunk = before_first_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the first to be preempted
        self.failed: list[tuple[Sequence, Exception]] = []  # sequences that can never fit, for the engine
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSequence]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted = False
        decoding = [s for s in self.running if s.num_uncomputed == 1 and s.num_computed_tokens >= s.num_prompt_tokens]
        prefilling = [s for s in self.running if s not in decoding and s.num_uncomputed > 0]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted for an older sequence just now
                continue
            if self.before_first_chunk is not None and seq.num_computed_tokens == 0:
                self.before_first_chunk(seq)
            n = min(seq.num_uncomputed, budget)
            while not self.grow(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:  # alone and still short: it can never fit
                    self._fail(seq, seq.num_computed_tokens + n)
                    break
                self._preempt(victim)
                preempted = True
                for i, item in enumerate(scheduled):
                    if item.seq is victim:
                        budget += item.num_tokens
                        del scheduled[i]
                        break
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                scheduled.append(ScheduledSequence(seq, n))
                budget -= n
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._admit_next()
            if seq is None:
                break
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            if n > 0:
                scheduled.append(ScheduledSequence(seq, n))
                budget -= n
        # the runner wants each sequence's tokens contiguous and in a stable order
        order = {id(s): i for i, s in enumerate(self.running)}
        scheduled.sort(key=lambda x: order[id(x.seq)])
        return scheduled

    def _admit_next(self) -> Sequence | None:
        """The next waiting sequence, its blocks allocated: the oldest, or when its prompt does not fit
        now a later one that does, unless the oldest has been overtaken OVERTAKE_LIMIT times already
        (then everyone waits for it, so a long prompt is never starved by a stream of short ones)."""
        while self.waiting and not self.fits(self.waiting[0].num_tokens):
            self._fail(self.waiting.popleft(), 0)
        if not self.waiting:
            return None
        head = self.waiting[0]
        if self.allocate(head):
            return self.waiting.popleft()
        if head.num_overtaken >= OVERTAKE_LIMIT:
            return None
        for seq in itertools.islice(self.waiting, 1, 1 + OVERTAKE_LOOKAHEAD):
            if self.fits(seq.num_tokens) and self.allocate(seq):
                head.num_overtaken += 1
                self.waiting.remove(seq)
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it first, to recompute all its tokens later."""
        self.running.remove(seq)
        if seq.cache is not None:
            self.release(seq)
            seq.cache = None
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _fail(self, seq: Sequence, num_tokens: int) -> None:
        """End a sequence that cannot fit however much is freed; the engine fails its request."""
        num_tokens = num_tokens or seq.num_tokens
        self.finish(seq)
        self.failed.append((seq, RequestError(
            f"The KV cache cannot hold {num_tokens} tokens for one sequence, even with nothing else running; "
            "lower max_tokens or give the server more KV cache memory.")))

    def take_failed(self) -> list[tuple[Sequence, Exception]]:
        failed, self.failed = self.failed, []
        return failed

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
