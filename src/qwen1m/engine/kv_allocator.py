"""Which KV blocks a sequence gets: the engine's side of ``BlockPool`` and ``PrefixCache``.

A sequence gets blocks for its known tokens when it is admitted and one more each time it fills its
last (``grow``); the scheduler preempts when a sequence cannot grow. With prefix caching its prompt's
longest cached prefix comes first, already computed; the blocks it computes itself enter the cache
as they fill, and when it ends they stay there idle until an allocation needs the memory
(``cache/prefix_cache.py``). With host-memory and disk tiers under it (``cache/kv_tiers.py``), a
prompt's blocks after its GPU-cached prefix are looked up there too and loaded into its own blocks;
registered blocks are copied down as they fill, written to disk when their request ends, and a block
evicted from the GPU is already a tier down.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qwen1m.cache.block_pool import BlockPool
from qwen1m.cache.kv_tiers import KVTiers, TierStats
from qwen1m.cache.paged_kv import PagedKVCache, SequenceBlocks
from qwen1m.cache.prefix_cache import LOW_PRECISION_SCALE_TOLERANCE, PrefixCache
from qwen1m.engine.sequence import Sequence


class KVAllocator:
    def __init__(self, kv_cache: PagedKVCache, device: torch.device, key_scale: Callable[[int], float],
                 prefix_caching: bool = False, tiers: KVTiers | None = None):
        """key_scale: prompt length -> the factor prefill writes that prompt's keys with
        (``AttentionBackend.key_scale``); cached blocks are reused only where it agrees. tiers: host
        memory and disk under the prefix cache (they turn it on)."""
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.block_size
        self.key_scale = key_scale
        self.block_pool = BlockPool(kv_cache.num_blocks)
        self.num_reserved = 0  # blocks taken out of the pool for good (the CUDA graphs' pad block)
        self.prefix_cache = None
        self.tiers = tiers
        self._stats = TierStats()  # GPU hits without tiers (with them, the tiers' counters)
        if prefix_caching or tiers is not None:
            self.prefix_cache = PrefixCache(self.block_size, scale_tolerance(kv_cache))
            if tiers is not None:
                self.prefix_cache.on_evict = tiers.before_gpu_evict

    def stats(self) -> TierStats:
        """Prompt tokens and bytes each prefix-cache tier served (/metrics)."""
        return self.tiers.snapshot() if self.tiers is not None else self._stats

    def num_available(self) -> int:
        """Free blocks, counting idle prefix-cache blocks (an allocation evicts them when it needs them)."""
        return self.block_pool.num_free + (self.prefix_cache.num_idle if self.prefix_cache is not None else 0)

    def take(self, n: int, after: int | None = None, evict_for_run: bool = True) -> list[int] | None:
        """n free blocks, preferably the run that starts at block ``after`` (the blocks right after a
        reused prefix, free again once the request that computed it has ended: the sequence's keys
        then stay one strided view, no gather); idle prefix-cache blocks are evicted when short."""
        blocks = None
        if after is not None:
            if self.prefix_cache is not None and evict_for_run:  # the old request's idle tail right after the prefix
                # (its last prompt block, with the old question in it) gives way to keep the run
                idle = [b for b in range(after, min(after + n, self.block_pool.num_blocks))
                        if self.prefix_cache.is_idle(b)]
                if idle and self.block_pool.count_free(after, after + n) + len(idle) == n:
                    self.prefix_cache.evict_blocks(idle)
                    self.block_pool.free(idle)
            blocks = self.block_pool.allocate_run(after, n)
        if blocks is None:
            blocks = self.block_pool.allocate(n)
        if blocks is None and self.prefix_cache is not None and n <= self.num_available():
            self.block_pool.free(self.prefix_cache.evict(n - self.block_pool.num_free))
            blocks = self.block_pool.allocate(n)
        return blocks

    def reserve(self, num_tokens: int) -> SequenceBlocks | None:
        """Private blocks for num_tokens tokens (no prefix cache involved), or None when short."""
        blocks = self.take(-(-num_tokens // self.block_size))
        return None if blocks is None else SequenceBlocks(self.kv_cache, blocks, self.device)

    def free(self, cache: SequenceBlocks) -> None:
        """Give back what ``reserve`` gave."""
        self.block_pool.free(cache.blocks)

    def fits(self, num_tokens: int) -> bool:
        """Whether one sequence of num_tokens tokens fits in the cache with nothing else in it."""
        return self._blocks_for(num_tokens) <= self.block_pool.num_blocks - self.num_reserved

    def allocate(self, seq: Sequence) -> bool:
        """Blocks for a sequence's known tokens (its prompt, or prompt and output when it is recomputed
        after a preemption), its prompt's cached prefix first; False when short."""
        shared = self._match(seq) if self.prefix_cache is not None else []
        own = self.take(self._blocks_for(seq.num_tokens) - len(shared), shared[-1] + 1 if shared else None)
        if own is None:
            if shared:
                self.block_pool.free(self.prefix_cache.release(shared))
            return False
        loaded = 0
        if self.tiers is not None:  # the blocks after the GPU's prefix, from host memory or disk
            scale = self.key_scale(seq.num_prompt_tokens)
            keys = seq.block_keys[len(shared):(seq.num_prompt_tokens - 1) // self.block_size]
            loaded = len(self.tiers.load(keys, own, scale))
            for block, key in zip(own[:loaded], keys):
                self.prefix_cache.register(block, key, scale)  # False: held by another block, stays private
        self._assign(seq, shared, own, loaded)
        return True

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Room for ``num_tokens`` tokens in a running sequence's blocks; False when no block is free.
        The new block is the one right after its last when free (keys stay one view); idle
        prefix-cache blocks are not evicted just for that."""
        need = self._blocks_for(num_tokens) - len(seq.cache.blocks)
        if need <= 0:
            return True
        blocks = self.take(need, seq.cache.blocks[-1] + 1 if seq.cache.blocks else None, evict_for_run=False)
        if blocks is None:
            return False
        seq.cache.extend(blocks)
        return True

    def can_grow(self, seqs: list[Sequence], extra: int) -> bool:
        """Whether every sequence can get room for ``extra`` more tokens without a preemption."""
        need = sum(max(0, self._blocks_for(s.num_tokens + extra) - len(s.cache.blocks)) for s in seqs)
        return need <= self.num_available()

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_again(self, seq: Sequence) -> None:
        """A prompt admitted beside the one that computes its prefix (several questions about one
        document in one ``generate`` call) found nothing cached at admission; when its first chunk is
        due, what the other has computed since is. Its own leading blocks, not written yet, go back
        to the pool in exchange (its keys are then gathered, not one view)."""
        if self.prefix_cache is None or seq.num_computed_tokens or seq.cache is None:
            return
        shared = self._match(seq)
        if shared:
            own = seq.cache.blocks
            self.block_pool.free(own[:len(shared)])  # private and unwritten: nothing computed yet
            self._assign(seq, shared, own[len(shared):])


    def register(self, seq: Sequence) -> None:
        """Enter the prompt blocks the sequence has computed so far into the prefix cache (called
        once their writes are enqueued: any later step that reads them follows on the stream)."""
        if self.prefix_cache is None or seq.block_keys is None:
            return
        done = min(seq.num_computed_tokens, seq.num_prompt_tokens) // self.block_size
        if done > seq.num_registered_blocks:
            scale = self.key_scale(seq.num_prompt_tokens)
            new = [i for i in range(seq.num_registered_blocks, done)
                   if self.prefix_cache.register(seq.cache.blocks[i], seq.block_keys[i], scale)]
            seq.num_registered_blocks = done
            if self.tiers is not None and new:  # write-through: a tier down at once (its copy overlaps)
                self.tiers.offload([seq.cache.blocks[i] for i in new], [seq.block_keys[i] for i in new], scale)

    def release(self, seq: Sequence) -> None:
        blocks = seq.cache.blocks
        if self.tiers is not None and seq.block_keys is not None:  # its full prompt blocks, to disk
            self.tiers.persist(seq.block_keys[:seq.num_registered_blocks])
        if self.prefix_cache is not None:
            blocks = self.prefix_cache.release(blocks)
        self.block_pool.free(blocks)

    def _match(self, seq: Sequence) -> list[int]:
        """The blocks of the prompt's longest cached prefix, now used by seq; never the block of the
        last prompt token (its logits are the first output). A prompt whose logprobs are asked for
        computes every position (cached blocks have no logits)."""
        if seq.params.prompt_logprobs is not None:
            return []
        if seq.block_keys is None:
            seq.block_keys = self.prefix_cache.keys(seq.token_ids, seq.num_prompt_tokens // self.block_size)
        reusable = (seq.num_prompt_tokens - 1) // self.block_size
        return self.prefix_cache.match(seq.block_keys[:reusable], self.key_scale(seq.num_prompt_tokens))

    def _assign(self, seq: Sequence, shared: list[int], own: list[int], loaded: int = 0) -> None:
        """loaded: how many of ``own``'s leading blocks came from a lower tier (computed already)."""
        # counted here, once the sequence has its blocks: a prompt whose allocation fails is matched
        # again at every attempt while it waits, and was served nothing
        self.stats().hit_tokens["gpu"] += len(shared) * self.block_size
        seq.cache = SequenceBlocks(self.kv_cache, shared + own, self.device)
        seq.num_computed_tokens = seq.num_cached_tokens = (len(shared) + loaded) * self.block_size
        seq.num_registered_blocks = len(shared) + loaded


def scale_tolerance(kv_cache: PagedKVCache) -> float:
    """How far the key scales (YaRN m) of a cached block and a new prompt may differ (prefix_cache.py)."""
    exact = kv_cache.dtype == torch.float32 and not kv_cache.fp8
    return 0.0 if exact else LOW_PRECISION_SCALE_TOLERANCE
