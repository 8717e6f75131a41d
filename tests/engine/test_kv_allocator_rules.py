"""KVAllocator's rules, as scripts of calls with the block ids each must give (no model, no LLM).

From ``engine/kv_allocator.py`` and ``cache/prefix_cache.py``: a sequence gets its known tokens'
blocks at admission and one more each time it fills its last, the block right after its last when
that one is free; with prefix caching its prompt's longest cached prefix comes first (never the block
of its last prompt token), the prompt blocks it computes are registered, and when it ends they stay
idle (counted as available) until an allocation evicts them, least recently released first, the tail
of a prefix before its head. An allocation keeps the run after a reused prefix by evicting the old
request's idle tail there; a growing sequence does not evict for that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from qwen1m.cache.paged_kv import PagedKVCache
from qwen1m.cache.prefix_cache import LOW_PRECISION_SCALE_TOLERANCE
from qwen1m.engine.kv_allocator import KVAllocator, scale_tolerance
from qwen1m.engine.sequence import Sequence
from qwen1m.sampling_params import SamplingParams

BLOCK = 4
DOC = list(range(1, 65))  # prompts that start alike share a prefix
ALT = list(range(101, 165))
NEW = list(range(201, 265))


# ---- the script's steps ----------------------------------------------------------------------------
@dataclass
class Alloc:
    name: str
    prompt: list[int]
    blocks: list[int] | None  # its blocks afterwards; None: allocate returns False
    cached: int = 0  # prompt tokens it took from the prefix cache
    prompt_logprobs: bool = False


@dataclass
class Compute:  # the sequence computes all its tokens; its full prompt blocks are registered
    name: str


@dataclass
class Grow:
    name: str
    num_tokens: int
    blocks: list[int] | None  # its blocks afterwards; None: grow returns False


@dataclass
class Release:
    name: str


@dataclass
class State:
    free: list[int]  # the pool's free block ids
    idle: list[int] = field(default_factory=list)  # idle prefix-cache blocks, first evicted first
    users: dict[int, int] = field(default_factory=dict)  # registered block -> sequences using it
    registered: int | None = None  # registered blocks (idle included); None: users + idle
    hits: int | None = None  # prompt tokens the GPU prefix cache has served (stats); None: not checked


def _run(kv: KVAllocator, script: list) -> None:
    seqs: dict[str, Sequence] = {}
    for i, step in enumerate(script):
        where = f"step {i}: {step}"
        if isinstance(step, Alloc):
            params = SamplingParams(prompt_logprobs=0 if step.prompt_logprobs else None)
            seq = seqs[step.name] = Sequence(step.name, 0, None, list(step.prompt), len(step.prompt), params,
                                             len(step.prompt) + 16)
            ok = kv.allocate(seq)
            assert ok == (step.blocks is not None), where
            assert (seq.cache.blocks if ok else None) == step.blocks, where
            if ok:
                assert seq.num_computed_tokens == seq.num_cached_tokens == step.cached, where
                assert seq.num_registered_blocks == step.cached // BLOCK, where
            else:
                assert seq.cache is None, where
        elif isinstance(step, Compute):
            seq = seqs[step.name]
            seq.num_computed_tokens = seq.num_tokens
            kv.register(seq)
        elif isinstance(step, Grow):
            seq = seqs[step.name]
            assert kv.grow(seq, step.num_tokens) == (step.blocks is not None), where
            if step.blocks is not None:
                assert seq.cache.blocks == step.blocks, where
        elif isinstance(step, Release):
            seq = seqs.pop(step.name)
            kv.release(seq)
            seq.cache = None
        else:
            assert kv.block_pool._free == step.free, where
            pc = kv.prefix_cache
            idle = list(pc._idle) if pc is not None else []
            users = dict(pc._users) if pc is not None else {}
            assert idle == step.idle, where
            assert users == step.users, where
            registered = len(step.users) + len(step.idle) if step.registered is None else step.registered
            assert (pc.num_registered if pc is not None else 0) == registered, where
            assert kv.num_available() == len(step.free) + len(step.idle), where
            if step.hits is not None:
                assert kv.stats().hit_tokens["gpu"] == step.hits, where
            # every block is free, idle or held by a live sequence, exactly once
            held = [b for s in seqs.values() if s.cache is not None for b in s.cache.blocks]
            assert sorted(step.free + step.idle + list(set(held))) == list(range(kv.block_pool.num_blocks)), where


def _allocator(num_blocks: int, prefix_caching: bool, key_scale=lambda n: 1.0) -> KVAllocator:
    cache = PagedKVCache(1, num_blocks, BLOCK, 1, 2, torch.float32, torch.device("cpu"))
    return KVAllocator(cache, torch.device("cpu"), key_scale, prefix_caching=prefix_caching)


PRIVATE = [  # without prefix caching, 8 blocks of 4 tokens
    pytest.param([Alloc("a", DOC[:9], [0, 1, 2]), Grow("a", 12, [0, 1, 2]), Grow("a", 13, [0, 1, 2, 3]),
                  State(free=[4, 5, 6, 7])],
                 id="the-prompts-blocks-at-admission-then-one-per-filled-block"),
    pytest.param([Alloc("a", DOC[:4], [0]), Alloc("b", ALT[:8], [1, 2]), Release("b"), Grow("a", 5, [0, 1]),
                  Alloc("c", NEW[:4], [2]), Grow("a", 9, [0, 1, 3]), State(free=[4, 5, 6, 7])],
                 id="growth-takes-the-block-right-after-when-free-else-the-first-free"),
    pytest.param([Alloc("a", DOC[:20], [0, 1, 2, 3, 4]), Alloc("b", ALT[:16], None), State(free=[5, 6, 7]),
                  Alloc("c", NEW[:12], [5, 6, 7]), Grow("a", 21, None), State(free=[])],
                 id="a-short-allocation-takes-nothing"),
    pytest.param([Alloc("a", DOC[:8], [0, 1]), Alloc("b", ALT[:8], [2, 3]), Release("a"),
                  Alloc("c", NEW[:12], [4, 5, 6]), Alloc("d", DOC[:8], [0, 1]), State(free=[7])],
                 id="released-blocks-return-to-the-pool-first-fit-run"),
    pytest.param([Alloc("a", DOC[:9], [0, 1, 2]), Compute("a"), Release("a"), Alloc("b", DOC[:9], [0, 1, 2]),
                  State(free=[3, 4, 5, 6, 7])],
                 id="without-prefix-caching-nothing-is-reused"),
]

PREFIX = [  # with prefix caching, 8 blocks of 4 tokens unless the row says otherwise
    pytest.param(8, [Alloc("a", DOC[:10], [0, 1, 2]), Compute("a"),
                     Alloc("b", DOC[:10], [0, 1, 3], cached=8), State(free=[4, 5, 6, 7], users={0: 2, 1: 2}),
                     Release("a"), State(free=[2, 4, 5, 6, 7], users={0: 1, 1: 1}),
                     Release("b"), State(free=[2, 3, 4, 5, 6, 7], idle=[1, 0])],
                 id="a-computed-prefix-is-shared-counted-then-idle-tail-first"),
    pytest.param(8, [Alloc("a", DOC[:13], [0, 1, 2, 3]), Compute("a"),
                     Alloc("b", DOC[:13], [0, 1, 2, 4], cached=12), Alloc("c", DOC[:6], [0, 5], cached=4),
                     State(free=[6, 7], users={0: 3, 1: 2, 2: 2}),
                     Release("b"), State(free=[4, 6, 7], users={0: 2, 1: 1, 2: 1}),
                     Release("a"), State(free=[3, 4, 6, 7], idle=[2, 1], users={0: 1}),
                     Release("c"), State(free=[3, 4, 5, 6, 7], idle=[2, 1, 0])],
                 id="refcounts-of-three-users"),
    # the whole prompt again: its last block holds its last token, whose logits are the first output
    pytest.param(8, [Alloc("a", DOC[:8], [0, 1]), Compute("a"), Release("a"),
                     State(free=[2, 3, 4, 5, 6, 7], idle=[1, 0]),
                     Alloc("b", DOC[:8], [0, 1], cached=4), State(free=[2, 3, 4, 5, 6, 7], users={0: 1})],
                 id="the-last-prompt-tokens-block-is-recomputed-and-the-idle-tail-gives-way-to-the-run"),
    pytest.param(8, [Alloc("a", DOC[:9], [0, 1, 2]), Compute("a"), Release("a"),
                     Alloc("b", DOC[:9], [2, 3, 4], prompt_logprobs=True),
                     State(free=[5, 6, 7], idle=[1, 0])],
                 id="a-prompt-that-wants-its-logprobs-reuses-nothing"),
    pytest.param(8, [Alloc("a", DOC[:9], [0, 1, 2]), Compute("a"), Alloc("b", ALT[:9], [3, 4, 5]), Compute("b"),
                     Release("a"), Release("b"), State(free=[2, 5, 6, 7], idle=[1, 0, 4, 3]),
                     Alloc("c", NEW[:20], [1, 2, 5, 6, 7]), State(free=[], idle=[0, 4, 3]),
                     Alloc("d", DOC[:9], [0, 3, 4], cached=4), State(free=[], users={0: 1})],
                 id="idle-blocks-are-evicted-least-recently-released-first"),
    pytest.param(5, [Alloc("b", ALT[:4], [0]), Alloc("a", DOC[:8], [1, 2]), Compute("a"), Release("a"),
                     State(free=[3, 4], idle=[2, 1]),
                     Grow("b", 5, [0, 3]), Grow("b", 9, [0, 3, 4]), State(free=[], idle=[2, 1]),
                     Grow("b", 13, [0, 3, 4, 2]), State(free=[], idle=[1]),
                     Grow("b", 17, [0, 3, 4, 2, 1]), Grow("b", 21, None)],
                 id="growth-evicts-idle-blocks-only-when-the-pool-is-empty"),
    pytest.param(8, [Alloc("a", DOC[:9], [0, 1, 2]), Compute("a"), Release("a"),
                     Alloc("b", ALT[:24], [2, 3, 4, 5, 6, 7]), State(free=[], idle=[1, 0]),
                     Alloc("c", DOC[:13], None), State(free=[], idle=[1, 0], hits=0),
                     Alloc("c2", DOC[:13], None), State(free=[], idle=[1, 0], hits=0),
                     Release("b"), Alloc("c3", DOC[:13], [0, 1, 2, 3], cached=8), State(free=[4, 5, 6, 7],
                                                                                      users={0: 1, 1: 1}, hits=8)],
                 id="a-failed-allocation-gives-its-matched-prefix-back-and-served-nothing"),
    # admitted together, both compute the same prefix; the second's copies stay private
    pytest.param(8, [Alloc("a", DOC[:9], [0, 1, 2]), Alloc("b", DOC[:9], [3, 4, 5]), Compute("a"), Compute("b"),
                     State(free=[6, 7], users={0: 1, 1: 1}),
                     Release("b"), State(free=[3, 4, 5, 6, 7], users={0: 1, 1: 1}),
                     Release("a"), State(free=[2, 3, 4, 5, 6, 7], idle=[1, 0])],
                 id="a-prefix-computed-twice-at-once-is-registered-once"),
]


@pytest.mark.parametrize("script", PRIVATE)
def test_private_blocks(script):
    _run(_allocator(8, prefix_caching=False), script)


@pytest.mark.parametrize("num_blocks, script", PREFIX)
def test_prefix_caching(num_blocks, script):
    _run(_allocator(num_blocks, prefix_caching=True), script)


@pytest.mark.parametrize("later_len, cached", [
    pytest.param(9, 8, id="the-same-key-scale-reuses"),
    pytest.param(13, 0, id="another-key-scale-reuses-nothing-in-a-float32-cache"),
])
def test_reuse_needs_the_same_key_scale(later_len, cached):
    """With DCA a prompt's keys carry m(prompt length); here m is 1 below 12 tokens and 1.01 above."""
    kv = _allocator(8, prefix_caching=True, key_scale=lambda n: 1.0 if n < 12 else 1.01)
    _run(kv, [Alloc("a", DOC[:9], [0, 1, 2]), Compute("a"), Release("a"),
              Alloc("b", DOC[:later_len], [0, 1, 2] if cached else [2, 3, 4, 5], cached=cached)])
    assert kv.stats().hit_tokens["gpu"] == cached


@pytest.mark.parametrize("dtype, fp8, tolerance", [
    pytest.param(torch.float32, False, 0.0, id="float32-exact"),
    pytest.param(torch.bfloat16, False, LOW_PRECISION_SCALE_TOLERANCE, id="bfloat16"),
    pytest.param(torch.float32, True, LOW_PRECISION_SCALE_TOLERANCE, id="fp8"),
])
def test_scale_tolerance(dtype, fp8, tolerance):
    assert LOW_PRECISION_SCALE_TOLERANCE == 2.0**-10
    assert scale_tolerance(PagedKVCache(1, 1, BLOCK, 1, 2, dtype, torch.device("cpu"), fp8=fp8)) == tolerance


@pytest.mark.parametrize("num_reserved, num_tokens, fits", [
    pytest.param(0, 32, True, id="the-whole-cache"),
    pytest.param(0, 33, False, id="one-token-over"),
    pytest.param(1, 32, False, id="the-cuda-graph-pad-block-is-not-for-sequences"),
    pytest.param(1, 28, True, id="all-but-the-pad-block"),
])
def test_fits_an_empty_cache(num_reserved, num_tokens, fits):
    """``fits`` asks about an otherwise empty cache: what is allocated now does not matter."""
    kv = _allocator(8, prefix_caching=False)
    kv.num_reserved = num_reserved
    held = Sequence("x", 0, None, DOC[:28], 28, SamplingParams(), 32)
    assert kv.allocate(held)
    assert kv.fits(num_tokens) is fits


@pytest.mark.parametrize("extra, can", [
    pytest.param(3, True, id="no-new-block"),
    pytest.param(4, True, id="one-new-block-each-two-free"),
    pytest.param(8, False, id="two-new-blocks-each-two-free"),
])
def test_can_grow_counts_every_sequences_new_blocks(extra, can):
    kv = _allocator(6, prefix_caching=False)
    seqs = [Sequence(n, 0, None, DOC[:5], 5, SamplingParams(), 32) for n in "ab"]
    for seq in seqs:
        assert kv.allocate(seq)
        seq.num_computed_tokens = 5
        assert kv.grow(seq, 8)  # room up to 8 tokens: blocks [0, 1] and [2, 3]
    assert kv.block_pool.num_free == 2
    assert kv.can_grow(seqs, extra) is can
