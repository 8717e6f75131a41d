"""The scheduler's rules, one table row per situation, on a fake block pool (no model, no LLM).

The rules under test, from ``engine/scheduler.py``'s docstring:
  * a step hands out at most ``max_num_batched_tokens`` tokens: one to every decoding sequence first,
    then the rest to running sequences with tokens to compute, then to waiting ones, in arrival order;
  * a sequence that cannot grow preempts the newest running sequence (blocks released, queued first,
    recomputed from scratch); a step that preempts admits nothing; a sequence alone that still cannot
    grow fails;
  * admission is first come, first served, except that a head whose prompt does not fit now lets later
    prompts that fit go first, at most ``OVERTAKE_LIMIT`` times, looking ``OVERTAKE_LOOKAHEAD`` deep;
    a prompt that could never fit fails at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from qwen1m.engine.scheduler import OVERTAKE_LIMIT, OVERTAKE_LOOKAHEAD, Scheduler
from qwen1m.engine.sequence import Sequence, SequenceStatus
from qwen1m.errors import RequestError
from qwen1m.sampling_params import SamplingParams

BLOCK = 4  # tokens per block of the fake pool


def _blocks(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK)


class FakeBlocks:
    """The scheduler's callbacks over ``num_blocks`` blocks of BLOCK tokens: a sequence holds a count
    of blocks, as ``KVAllocator`` would (its prompt at admission, one more each time it fills its last)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.held: dict[str, int] = {}
        self.released: list[str] = []

    @property
    def free(self) -> int:
        return self.num_blocks - sum(self.held.values())

    def hold(self, seq: Sequence, n: int) -> None:
        self.held[_name(seq)] = n
        seq.cache = self  # anything not None: the scheduler only asks whether a sequence holds blocks

    def allocate(self, seq: Sequence) -> bool:
        if _blocks(seq.num_tokens) > self.free:
            return False
        self.hold(seq, _blocks(seq.num_tokens))
        return True

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = _blocks(num_tokens) - self.held[_name(seq)]
        if need > self.free:
            return False
        self.held[_name(seq)] += max(need, 0)
        return True

    def release(self, seq: Sequence) -> None:
        del self.held[_name(seq)]
        self.released.append(_name(seq))

    def fits(self, num_tokens: int) -> bool:
        return _blocks(num_tokens) <= self.num_blocks


def _name(seq: Sequence) -> str:
    return seq.request_id if seq.index == 0 else f"{seq.request_id}/{seq.index}"


def _seq(name: str, prompt: int, generated: int = 0) -> Sequence:
    tokens = list(range(1, prompt + generated + 1))
    return Sequence(name, 0, None, tokens, prompt, SamplingParams(), prompt + 100)


# A running or waiting sequence in a table row: (kind, name, numbers). Built fresh for each test.
def D(name: str, computed: int) -> tuple:
    """Decoding: its prompt of ``computed`` tokens computed and one sampled token not yet; it holds
    blocks for its computed tokens, so it needs a new block when ``computed`` is a multiple of BLOCK."""
    return ("decode", name, computed)


def P(name: str, prompt: int, computed: int, blocks: int | None = None) -> tuple:
    """Prefilling: ``computed`` of its ``prompt`` tokens done; it holds its prompt's blocks (or ``blocks``)."""
    return ("prefill", name, prompt, computed, blocks)


def W(name: str, prompt: int, overtaken: int = 0) -> tuple:
    """Waiting, with nothing computed; ``overtaken``: later sequences already admitted before it."""
    return ("wait", name, prompt, overtaken)


@dataclass
class Step:
    budget: int  # max_num_batched_tokens
    num_blocks: int
    running: list[tuple]
    waiting: list[tuple] = field(default_factory=list)
    max_num_seqs: int = 16
    # expected
    scheduled: list[tuple[str, int]] = field(default_factory=list)  # (name, tokens), in the output's order
    now_running: list[str] | None = None  # None: the running names before the step plus the admitted
    now_waiting: list[str] | None = None  # None: the waiting names before the step minus the admitted
    released: list[str] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=dict)  # name -> tokens its error names
    overtaken: dict[str, int] = field(default_factory=dict)  # name -> num_overtaken after the step


def _build(row: Step) -> tuple[Scheduler, FakeBlocks, dict[str, Sequence]]:
    pool = FakeBlocks(row.num_blocks)
    sched = Scheduler(row.budget, row.max_num_seqs, pool.allocate, pool.release, grow=pool.grow, fits=pool.fits)
    seqs = {}
    for spec in row.running:
        if spec[0] == "decode":
            _, name, computed = spec
            seq = _seq(name, computed, generated=1)
            seq.num_computed_tokens = computed
            pool.hold(seq, _blocks(computed))
        else:
            _, name, prompt, computed, blocks = spec
            seq = _seq(name, prompt)
            seq.num_computed_tokens = computed
            pool.hold(seq, _blocks(prompt) if blocks is None else blocks)
        seq.status = SequenceStatus.RUNNING
        sched.running.append(seq)
        seqs[name] = seq
    for _, name, prompt, overtaken in row.waiting:
        seq = _seq(name, prompt)
        seq.num_overtaken = overtaken
        sched.add(seq)
        seqs[name] = seq
    assert pool.free >= 0, "the row holds more blocks than its pool has"
    return sched, pool, seqs


def _bigs(n: int) -> list[tuple]:
    """n waiting prompts that fit an empty cache (8 blocks) but not the 4 free blocks of the rows below."""
    return [W(f"big{i}", 24) for i in range(n)]


STEPS = [
    # ---- decodes first, then the budget -------------------------------------------------------------
    pytest.param(Step(budget=3, num_blocks=100, running=[P("a", 20, 4), D("b", 5), D("c", 6)],
                      scheduled=[("a", 1), ("b", 1), ("c", 1)]),
                 id="decodes-get-one-token-first-prefill-the-rest"),
    pytest.param(Step(budget=2, num_blocks=100, running=[P("a", 20, 4), D("b", 5), D("c", 6)],
                      scheduled=[("b", 1), ("c", 1)]),
                 id="decodes-that-use-the-whole-budget-leave-the-older-prefill-nothing"),
    pytest.param(Step(budget=10, num_blocks=100, running=[P("a", 20, 4), D("b", 5)],
                      scheduled=[("a", 9), ("b", 1)]),
                 id="a-prefill-chunk-is-what-the-decodes-leave"),
    pytest.param(Step(budget=1, num_blocks=100, running=[P("a", 10, 9), D("b", 5)],
                      scheduled=[("b", 1)]),
                 id="a-prompts-last-token-is-prefill-not-decode"),
    pytest.param(Step(budget=10, num_blocks=100, running=[P("a", 8, 2), P("b", 20, 0)],
                      scheduled=[("a", 6), ("b", 4)]),
                 id="prefills-in-admission-order"),
    pytest.param(Step(budget=10, num_blocks=100, running=[D("a", 5)], waiting=[W("w1", 5), W("w2", 8)],
                      scheduled=[("a", 1), ("w1", 5), ("w2", 4)]),
                 id="waiting-prompts-get-the-rest-in-arrival-order"),
    pytest.param(Step(budget=1, num_blocks=100, running=[D("a", 5)], waiting=[W("w1", 5)],
                      scheduled=[("a", 1)]),
                 id="no-budget-left-admits-nothing"),
    pytest.param(Step(budget=100, num_blocks=100, max_num_seqs=2, running=[D("a", 5)],
                      waiting=[W("w1", 3), W("w2", 3)], scheduled=[("a", 1), ("w1", 3)]),
                 id="max-num-seqs-caps-admission"),
    # ---- admission when blocks are short: FIFO, overtaking, never-fits ----------------------------------
    # 8 blocks; "a" holds 4 (computed 15, growing to 16 in its block), so 4 are free
    pytest.param(Step(budget=100, num_blocks=8, running=[P("a", 16, 15)], waiting=[W("w1", 8), W("w2", 8)],
                      scheduled=[("a", 1), ("w1", 8), ("w2", 8)]),
                 id="first-come-first-served-while-blocks-last"),
    pytest.param(Step(budget=100, num_blocks=8, running=[P("a", 16, 15)],
                      waiting=[W("big", 20), W("s1", 4), W("s2", 8), W("s3", 4)],
                      scheduled=[("a", 1), ("s1", 4), ("s2", 8), ("s3", 4)], overtaken={"big": 3}),
                 id="smaller-prompts-that-fit-overtake-a-head-that-does-not"),
    pytest.param(Step(budget=100, num_blocks=8, running=[P("a", 16, 15)],
                      waiting=[W("big", 20), W("big2", 24), W("s1", 4)],
                      scheduled=[("a", 1), ("s1", 4)], overtaken={"big": 1, "big2": 0}),
                 id="a-later-prompt-that-does-not-fit-either-is-passed-over"),
    pytest.param(Step(budget=100, num_blocks=8, running=[P("a", 16, 15)],
                      waiting=[W("big", 20, overtaken=OVERTAKE_LIMIT - 1), W("s1", 4), W("s2", 4)],
                      scheduled=[("a", 1), ("s1", 4)], overtaken={"big": OVERTAKE_LIMIT}),
                 id="the-last-overtake-allowed"),
    pytest.param(Step(budget=100, num_blocks=8, running=[P("a", 16, 15)],
                      waiting=[W("big", 20, overtaken=OVERTAKE_LIMIT), W("s1", 4)],
                      scheduled=[("a", 1)], overtaken={"big": OVERTAKE_LIMIT}),
                 id="after-64-overtakes-everyone-waits-for-the-head"),
    pytest.param(Step(budget=100, num_blocks=8, running=[P("a", 16, 15)],
                      waiting=[W("big", 20)] + _bigs(OVERTAKE_LOOKAHEAD - 1) + [W("s1", 4)],
                      scheduled=[("a", 1), ("s1", 4)], overtaken={"big": 1}),
                 id="an-overtaker-32-places-down-is-seen"),
    pytest.param(Step(budget=100, num_blocks=8, running=[P("a", 16, 15)],
                      waiting=[W("big", 20)] + _bigs(OVERTAKE_LOOKAHEAD) + [W("s1", 4)],
                      scheduled=[("a", 1)], overtaken={"big": 0}),
                 id="an-overtaker-33-places-down-is-not"),
    pytest.param(Step(budget=100, num_blocks=8, running=[], waiting=[W("huge", 33), W("s1", 4)],
                      scheduled=[("s1", 4)], now_waiting=[], failed={"huge": 33}),
                 id="a-prompt-that-can-never-fit-fails-and-the-next-starts"),
    # ---- preemption: the newest running sequence goes -----------------------------------------------
    pytest.param(Step(budget=10, num_blocks=4, running=[D("a", 8), D("b", 6)], waiting=[W("w", 1)],
                      scheduled=[("a", 1)], now_running=["a"], now_waiting=["b", "w"], released=["b"]),
                 id="an-older-decode-preempts-the-newest-and-nothing-is-admitted"),
    pytest.param(Step(budget=10, num_blocks=4, running=[D("a", 6), D("b", 8)],
                      scheduled=[("a", 1)], now_running=["a"], now_waiting=["b"], released=["b"]),
                 id="the-newest-preempts-itself"),
    pytest.param(Step(budget=10, num_blocks=5, running=[D("a", 8), D("b", 8), D("c", 3)],
                      scheduled=[("a", 1)], now_running=["a"], now_waiting=["b", "c"], released=["c", "b"]),
                 id="two-preemptions-queue-oldest-first"),
    # "b" was given its token before "a" (decodes first) and is then preempted for "a": its token
    # goes back to the budget and reaches "c"
    pytest.param(Step(budget=6, num_blocks=8, running=[P("a", 12, 4, blocks=1), P("c", 20, 0), D("b", 5)],
                      scheduled=[("a", 5), ("c", 1)], now_running=["a", "c"], now_waiting=["b"], released=["b"]),
                 id="a-preempted-sequence-gives-its-tokens-back"),
    pytest.param(Step(budget=10, num_blocks=2, running=[D("a", 8)], waiting=[W("w", 4)],
                      scheduled=[("w", 4)], now_running=["w"], now_waiting=[], released=["a"], failed={"a": 9}),
                 id="alone-and-still-short-fails-and-frees-its-blocks"),
]


@pytest.mark.parametrize("row", STEPS)
def test_one_step(row: Step):
    sched, pool, seqs = _build(row)
    before_running = [s.request_id for s in sched.running]
    before_waiting = [s.request_id for s in sched.waiting]
    out = sched.schedule()

    assert [(s.seq.request_id, s.num_tokens) for s in out] == row.scheduled
    admitted = [name for name, _ in row.scheduled if name in before_waiting]
    want_running = row.now_running if row.now_running is not None else before_running + admitted
    want_waiting = row.now_waiting if row.now_waiting is not None else [n for n in before_waiting if n not in admitted]
    assert [s.request_id for s in sched.running] == want_running
    assert [s.request_id for s in sched.waiting] == want_waiting
    assert pool.released == row.released
    assert sched.num_preemptions == sum(n not in row.failed for n in row.released)
    assert sum(pool.held.values()) <= pool.num_blocks
    for name in want_running:
        assert seqs[name].status is SequenceStatus.RUNNING and name in pool.held
    for name in want_waiting:  # preempted ones start again from nothing, without blocks
        seq = seqs[name]
        assert seq.status is SequenceStatus.WAITING and seq.cache is None and seq.num_computed_tokens == 0
        assert name not in pool.held
    failed = sched.take_failed()
    assert {s.request_id: s.status for s, _ in failed} == dict.fromkeys(row.failed, SequenceStatus.FINISHED)
    for seq, err in failed:
        assert isinstance(err, RequestError)
        assert f"cannot hold {row.failed[seq.request_id]} tokens for one sequence" in str(err)
    assert sched.take_failed() == []
    for name, n in row.overtaken.items():
        assert seqs[name].num_overtaken == n


@dataclass
class Run:
    budget: int
    num_blocks: int
    prompts: list[int]  # added in this order before the first step
    max_new: int
    steps: list[list[tuple[str, int]]]  # expected schedule of each step until all finish
    num_preemptions: int = 0


RUNS = [
    pytest.param(Run(budget=4, num_blocks=100, prompts=[10], max_new=2,
                     steps=[[("s0", 4)], [("s0", 4)], [("s0", 2)], [("s0", 1)]]),
                 id="chunked-prefill-falls-out-of-the-budget"),
    pytest.param(Run(budget=8, num_blocks=100, prompts=[3, 12], max_new=3,
                     steps=[[("s0", 3), ("s1", 5)], [("s0", 1), ("s1", 7)], [("s0", 1), ("s1", 1)], [("s1", 1)]]),
                 id="a-prefill-continues-beside-a-decode"),
    # 4 blocks of 4: both 6-token prompts fit; at 9 tokens "s0" needs a third block, "s1" (newest) is
    # preempted, and comes back once "s0" has ended as one 9-token prompt (6 + its 3 sampled tokens)
    pytest.param(Run(budget=16, num_blocks=4, prompts=[6, 6], max_new=4,
                     steps=[[("s0", 6), ("s1", 6)], [("s0", 1), ("s1", 1)], [("s0", 1), ("s1", 1)], [("s0", 1)],
                            [("s1", 9)]],
                     num_preemptions=1),
                 id="a-preempted-sequence-is-recomputed-with-its-output"),
]


@pytest.mark.parametrize("row", RUNS)
def test_steps_until_done(row: Run):
    """The engine's loop in miniature: computed tokens advance by what was scheduled; a sequence that
    has computed all its tokens samples one more, and ends after ``max_new``."""
    pool = FakeBlocks(row.num_blocks)
    sched = Scheduler(row.budget, 16, pool.allocate, pool.release, grow=pool.grow, fits=pool.fits)
    for i, n in enumerate(row.prompts):
        sched.add(_seq(f"s{i}", n))
    got = []
    while sched.has_unfinished():
        assert len(got) < 2 * len(row.steps), "no progress"
        out = sched.schedule()
        got.append([(s.seq.request_id, s.num_tokens) for s in out])
        for item in out:
            seq = item.seq
            seq.num_computed_tokens += item.num_tokens
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(0)
                if len(seq.output_token_ids) == row.max_new:
                    sched.finish(seq)
    assert got == row.steps
    assert sched.num_preemptions == row.num_preemptions
    assert pool.held == {}


@dataclass
class Abort:
    request_id: str
    aborted: list[str]  # sequences returned, by name
    now_running: list[str]
    now_waiting: list[str]
    released: list[str]


ABORTS = [
    pytest.param(Abort("w", aborted=["w"], now_running=["r", "n"], now_waiting=["n/1"], released=[]),
                 id="a-waiting-request-leaves-the-queue"),
    pytest.param(Abort("r", aborted=["r"], now_running=["n"], now_waiting=["w", "n/1"], released=["r"]),
                 id="a-running-request-frees-its-blocks"),
    pytest.param(Abort("n", aborted=["n/1", "n"], now_running=["r"], now_waiting=["w"], released=["n"]),
                 id="every-completion-of-a-request-waiting-and-running"),
    pytest.param(Abort("unknown", aborted=[], now_running=["r", "n"], now_waiting=["w", "n/1"], released=[]),
                 id="an-unknown-request-changes-nothing"),
]


@pytest.mark.parametrize("row", ABORTS)
def test_abort(row: Abort):
    """Running "r" and "n" (completion 0), waiting "w" and "n/1" (completion 1 of "n")."""
    pool = FakeBlocks(100)
    sched = Scheduler(100, 16, pool.allocate, pool.release, grow=pool.grow, fits=pool.fits)
    seqs = {}
    for rid, index, running in (("r", 0, True), ("n", 0, True), ("w", 0, False), ("n", 1, False)):
        seq = Sequence(rid, index, None, [1, 2, 3], 3, SamplingParams(), 10)
        seqs[_name(seq)] = seq
        if running:
            assert pool.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            sched.running.append(seq)
        else:
            sched.add(seq)

    out = sched.abort(row.request_id)

    assert [_name(s) for s in out] == row.aborted
    assert [_name(s) for s in sched.running] == row.now_running
    assert [_name(s) for s in sched.waiting] == row.now_waiting
    assert pool.released == row.released
    assert sorted(pool.held) == sorted(row.now_running)
    for name in row.aborted:
        assert seqs[name].status is SequenceStatus.FINISHED and seqs[name].finish_reason == "abort"
        assert seqs[name].cache is None
    for name in set(seqs) - set(row.aborted):
        assert seqs[name].finish_reason is None and not seqs[name].is_finished


@pytest.mark.parametrize("running, waiting, called", [
    pytest.param([P("a", 10, 0), P("b", 10, 4)], [], ["a"], id="a-running-sequence-with-nothing-computed"),
    pytest.param([D("a", 5)], [W("w", 8)], [], id="not-a-sequence-admitted-in-this-step"),
    pytest.param([D("a", 5), P("b", 10, 0)], [], ["b"], id="not-a-decode"),
])
def test_before_first_chunk(running, waiting, called):
    """The hook (prefix caching looks again for a cached prefix there) sees a running sequence with
    nothing computed before its first chunk, and may give it computed tokens: the chunk is what is left.
    (Admission already gives every admitted sequence tokens, so in the engine today no running
    sequence has nothing computed; the hook is the scheduler's contract all the same.)"""
    sched, _, seqs = _build(Step(budget=100, num_blocks=100, running=running, waiting=waiting))
    seen = []

    def hook(seq: Sequence) -> None:
        seen.append(seq.request_id)
        seq.num_computed_tokens = 8  # a cached prefix of two blocks found

    sched.before_first_chunk = hook
    out = {s.seq.request_id: s.num_tokens for s in sched.schedule()}
    assert seen == called
    for name in called:
        assert out[name] == seqs[name].num_tokens - 8
