"""BlockPool's and PrefixCache's rules as table rows with exact block ids.

BlockPool (``cache/block_pool.py``): n blocks, the first free run long enough (first fit, not best
fit), else the n lowest free ids; nothing taken when fewer than n are free.
PrefixCache (``cache/prefix_cache.py``): a registered block is counted by the sequences that use it
(registering counts the one that computed it, each ``match`` one more, each ``release`` one less); at
zero it turns idle, the last block of a released prefix first; ``evict`` takes idle blocks least
recently released first and removes their keys, telling ``on_evict``. (Tail-first order inside one
release and the key-scale tolerance are covered in tests/engine/test_prefix_cache.py.)
"""

from __future__ import annotations

import pytest

from qwen1m.cache.block_pool import BlockPool
from qwen1m.cache.prefix_cache import PrefixCache


def _pool(num_blocks: int, free: list[int]) -> BlockPool:
    """A pool of num_blocks whose free blocks are exactly ``free``."""
    pool = BlockPool(num_blocks)
    pool.allocate(num_blocks)
    pool.free(free)
    return pool


@pytest.mark.parametrize("free, n, blocks", [
    pytest.param([0, 1, 4, 5, 6, 7, 8, 10, 11, 12], 3, [4, 5, 6], id="the-first-run-long-enough-not-the-tightest"),
    pytest.param([0, 2, 3, 4], 3, [2, 3, 4], id="a-run-at-the-end"),
    pytest.param([1, 2, 3, 5, 6, 7], 3, [1, 2, 3], id="two-runs-the-first"),
    pytest.param([0, 2, 4, 6], 3, [0, 2, 4], id="no-run-the-lowest-ids"),
    pytest.param([0, 1, 3, 4], 3, [0, 1, 3], id="runs-too-short-the-lowest-ids"),
    pytest.param([3, 9], 2, [3, 9], id="every-free-block"),
    pytest.param([3, 9], 3, None, id="one-short-takes-nothing"),
    pytest.param([], 1, None, id="an-empty-pool"),
    pytest.param([5], 0, [], id="zero-blocks"),
])
def test_allocate(free, n, blocks):
    pool = _pool(16, free)
    assert pool.allocate(n) == blocks
    left = [b for b in free if b not in (blocks or [])]
    assert pool.num_free == len(left) and pool.count_free(0, 16) == len(left)
    assert pool.allocate(len(left)) == left  # what remains is exactly the rest, in order


# ---- PrefixCache: scripts of calls with what each returns -------------------------------------------
A = PrefixCache(4).keys(list(range(1, 17)), 4)  # a prompt's chained block keys
B = PrefixCache(4).keys(list(range(101, 117)), 4)  # another prompt's


def register(block, key, scale=1.0, ok=True):
    return ("register", block, key, scale, ok)


def match(keys, blocks, scale=1.0):
    return ("match", keys, scale, blocks)


def release(blocks, private):
    return ("release", blocks, private)


def evict(n, blocks):
    return ("evict", n, blocks)


def evict_blocks(blocks):
    return ("evict_blocks", blocks)


def state(idle, users):
    """idle: idle blocks, first evicted first; users: registered block -> sequences using it."""
    return ("state", idle, users)


SCRIPTS = [
    pytest.param([register(0, A[0]), register(1, A[1]), register(5, B[0]), register(6, B[1]),
                  release([0, 1], []), release([5, 6], []), state([1, 0, 6, 5], {}),
                  evict(3, [1, 0, 6]), state([5], {})],
                 id="idle-blocks-leave-least-recently-released-first"),
    pytest.param([register(0, A[0]), register(5, B[0]), release([0], []), release([5], []),
                  match([A[0]], [0]), state([5], {0: 1}), release([0], []), state([5, 0], {}),
                  evict(1, [5])],
                 id="a-reused-idle-block-is-the-most-recent-again"),
    pytest.param([register(0, A[0]), state([], {0: 1}), match(A[:1], [0]), match(A[:1], [0]), state([], {0: 3}),
                  release([0], []), release([0], []), state([], {0: 1}), release([0], []), state([0], {})],
                 id="each-match-is-one-more-user-each-release-one-less"),
    pytest.param([register(0, A[0]), register(1, A[1]), release([0, 1], []), evict(5, [1, 0]), state([], {}),
                  evict(1, [])],
                 id="evict-takes-at-most-the-idle-blocks"),
    pytest.param([register(0, A[0]), release([0], []), evict(1, [0]), match(A[:1], []),
                  register(7, A[0]), match(A[:1], [7])],
                 id="an-evicted-prefix-is-gone-and-can-be-registered-again"),
    pytest.param([register(0, A[0]), register(2, A[2]), match(A[:3], [0]), state([], {0: 2, 2: 1})],
                 id="a-match-stops-at-the-first-missing-block"),
    pytest.param([register(0, A[0], 1.0), register(1, A[1], 1.01), match(A[:2], [0], 1.0),
                  match(A[:2], [], 1.01)],
                 id="a-match-stops-at-a-block-of-another-key-scale"),
    pytest.param([register(0, A[0]), register(0, B[0], ok=False), register(3, A[0], ok=False), match(B[:1], []),
                  state([], {0: 1})],
                 id="one-block-one-key"),
    pytest.param([register(0, A[0]), register(1, A[1]), release([7, 0, 1, 8], [7, 8]), state([1, 0], {})],
                 id="release-returns-the-private-blocks-in-order"),
    pytest.param([register(0, A[0]), register(1, A[1]), register(2, A[2]), release([0, 1, 2], []),
                  evict_blocks([0, 2]), state([1], {}), match(A[:1], [])],
                 id="evict-blocks-takes-the-named-idle-blocks"),
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_prefix_cache(script):
    cache = PrefixCache(block_size=4, scale_tolerance=1e-3)
    told = []
    cache.on_evict = told.append
    evicted = []
    for i, (op, *args) in enumerate(script):
        where = f"call {i}: {op}{tuple(args)}"
        if op == "register":
            block, key, scale, ok = args
            assert cache.register(block, key, scale) is ok, where
        elif op == "match":
            keys, scale, blocks = args
            assert cache.match(keys, scale) == blocks, where
        elif op == "release":
            blocks, private = args
            assert cache.release(blocks) == private, where
        elif op == "evict":
            n, blocks = args
            assert cache.evict(n) == blocks, where
            evicted += blocks
        elif op == "evict_blocks":
            (blocks,) = args
            cache.evict_blocks(blocks)
            evicted += blocks
        else:
            idle, users = args
            assert list(cache._idle) == idle and cache.num_idle == len(idle), where
            assert cache._users == users, where
            assert all(cache.is_idle(b) for b in idle) and not any(cache.is_idle(b) for b in users), where
            assert cache.num_registered == len(idle) + len(users), where
    # on_evict heard of every evicted block, once, in eviction order, with the key it was registered under
    assert [b for call in told for b, _, _ in call] == evicted
    assert all(call for call in told)  # never called with nothing
    registered = {}
    for op, *args in script:
        if op == "register" and args[3]:
            registered.setdefault(args[0], []).append(args[1])
    for call in told:
        for block, key, scale in call:
            assert key in registered[block] and scale in (1.0, 1.01)
