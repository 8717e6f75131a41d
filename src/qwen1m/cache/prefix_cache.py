"""Prefix caching: a prompt's full KV blocks outlive its request, keyed by their content, so that a
later prompt starting with the same tokens (another question about the same long document, the next
turn of a conversation) reuses them instead of computing them again.

Keys. Block i of a prompt is keyed by SHA-256 chained over the token ids of blocks 0..i: a block's
keys and values depend on every earlier token, so its key names the whole prefix up to its end.

Key scale. With DCA the prefill writes each prompt key multiplied by the YaRN attention temperature
m = yarn_scale(L) of the prompt length L (design §2.5; ``AttentionBackend.key_scale``), so the blocks
of a prompt of length L1 hold keys scaled by m(L1), where a new prompt of length L2 would write
m(L2). A block is reused only if m(L1) / m(L2) - 1 is within ``scale_tolerance``: 0 for a float32
cache (reuse is then exact), 2^-10 for 16-bit and FP8 caches (a quarter of bfloat16's relative
spacing: a reused key is closer to the recomputed one than that key's own rounding). Below the
training length m = 1 and any two prompts qualify; after a 1M-token document, m changes by 2^-10
only when the prompt length changes by ~1%, i.e. ~10K tokens of question.

A block's life: private (one sequence's, as without prefix caching) -> registered once its prompt
tokens are computed (in the table, counted by the sequences that use it) -> idle when none does
(kept; least recently used first out) -> evicted back to the pool when an allocation needs it.
Only full prompt blocks are registered; a block whose content another block already registered
stays private. With host-memory and disk tiers (``kv_tiers.py``) an evicted block stays a tier down,
under the same key and key-scale rule.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

# 16-bit and FP8 caches: a quarter of bfloat16's relative spacing (2^-8)
LOW_PRECISION_SCALE_TOLERANCE = 2.0**-10


class PrefixCache:
    def __init__(self, block_size: int, scale_tolerance: float = 0.0):
        self.block_size = block_size
        self.scale_tolerance = scale_tolerance
        self._by_key: dict[bytes, int] = {}  # prefix key -> block
        self._entry: dict[int, tuple[bytes, float]] = {}  # registered block -> (key, key scale)
        self._users: dict[int, int] = {}  # registered block -> sequences using it (> 0)
        self._idle: OrderedDict[int, None] = OrderedDict()  # registered, unused; least recent first
        # called with [(block, key, key scale)] before evicted blocks return to the pool: the host and
        # disk tiers (kv_tiers.py) keep them a tier down
        self.on_evict: Callable[[list[tuple[int, bytes, float]]], None] | None = None

    @property
    def num_idle(self) -> int:
        """Registered blocks no sequence uses: free memory that still holds a reusable prefix."""
        return len(self._idle)

    @property
    def num_registered(self) -> int:
        return len(self._entry)

    def keys(self, token_ids: list[int], num_blocks: int) -> list[bytes]:
        """The chained keys of the first ``num_blocks`` full blocks of ``token_ids``."""
        bs, out, h = self.block_size, [], b""
        ids = np.asarray(token_ids[:num_blocks * bs], dtype=np.int64)
        for i in range(num_blocks):
            h = hashlib.sha256(h + ids[i * bs:(i + 1) * bs].tobytes()).digest()
            out.append(h)
        return out

    def match(self, keys: list[bytes], scale: float) -> list[int]:
        """The blocks of the longest cached prefix of ``keys`` whose key scale is within tolerance of
        ``scale``; the caller now uses them (``release`` them when done)."""
        blocks = []
        for key in keys:
            block = self._by_key.get(key)
            if block is None or abs(self._entry[block][1] / scale - 1.0) > self.scale_tolerance:
                break
            blocks.append(block)
        for block in blocks:
            self._users[block] = self._users.get(block, 0) + 1
            self._idle.pop(block, None)
        return blocks

    def register(self, block: int, key: bytes, scale: float) -> bool:
        """Enter a block whose prompt tokens are computed, used by the sequence that computed it.
        False (the block stays private) when another block already holds this prefix."""
        if key in self._by_key or block in self._entry:
            return False
        self._by_key[key] = block
        self._entry[block] = (key, scale)
        self._users[block] = 1
        return True

    def release(self, blocks: list[int]) -> list[int]:
        """A sequence is done with ``blocks``: registered ones nobody else uses turn idle (the last
        block of a prefix first, so that eviction takes prefixes from their tails and a shorter
        shared head stays longest); returns the private ones, for the pool."""
        private = []
        for block in reversed(blocks):
            users = self._users.get(block)
            if users is None:
                if block in self._entry:
                    raise RuntimeError(f"prefix cache: block {block} released more often than used")
                private.append(block)
            elif users > 1:
                self._users[block] = users - 1
            else:
                del self._users[block]
                self._idle[block] = None
        private.reverse()
        return private

    def is_idle(self, block: int) -> bool:
        return block in self._idle

    def evict_blocks(self, blocks: list[int]) -> None:
        """Evict these idle blocks (out of the table; the caller frees them)."""
        evicted = []
        for block in blocks:
            del self._idle[block]
            key, scale = self._entry.pop(block)
            del self._by_key[key]
            evicted.append((block, key, scale))
        if self.on_evict is not None and evicted:
            self.on_evict(evicted)

    def evict(self, n: int) -> list[int]:
        """Up to n idle blocks, least recently released first, out of the table (for the pool)."""
        out, evicted = [], []
        while self._idle and len(out) < n:
            block, _ = self._idle.popitem(last=False)
            key, scale = self._entry.pop(block)
            del self._by_key[key]
            out.append(block)
            evicted.append((block, key, scale))
        if self.on_evict is not None and evicted:
            self.on_evict(evicted)
        return out
