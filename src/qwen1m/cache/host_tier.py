"""The host-memory tier's storage: fixed slots of block copies (pinned on CUDA), least recently used
first out, and the one-tensor layout of a block that the tiers copy and the disk tier writes."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from qwen1m.cache.block_pool import BlockPool
from qwen1m.cache.paged_kv import PagedKVCache


class BlockLayout:
    """One KV block of every layer as one tensor: [num_layers, 2 (k, v), block_size, num_kv_heads,
    head_dim] in the cache's storage dtype, and under FP8 its scales [num_layers, 2, block_size,
    num_kv_heads] float32."""

    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self.num_layers = len(cache.k)
        self.shape = (self.num_layers, 2, cache.block_size, cache.num_kv_heads, cache.head_dim)
        self.dtype = cache.k[0].dtype
        self.scale_shape = self.shape[:-1] if cache.fp8 else None
        elem = torch.empty((), dtype=self.dtype).element_size()
        self.nbytes = elem * math.prod(self.shape) + (4 * math.prod(self.scale_shape) if cache.fp8 else 0)

    def gather(self, blocks: torch.Tensor, data: torch.Tensor, scales: torch.Tensor | None) -> None:
        """data[i] (, scales[i]) <- GPU block blocks[i]; blocks: [n] on the cache's device."""
        c = self.cache
        for layer in range(self.num_layers):
            data[:, layer, 0] = c.k[layer].index_select(0, blocks)
            data[:, layer, 1] = c.v[layer].index_select(0, blocks)
            if scales is not None:
                scales[:, layer, 0] = c.k_scale[layer].index_select(0, blocks)
                scales[:, layer, 1] = c.v_scale[layer].index_select(0, blocks)

    def scatter(self, blocks: torch.Tensor, data: torch.Tensor, scales: torch.Tensor | None) -> None:
        """GPU block blocks[i] <- data[i] (, scales[i]), tensors on the cache's device."""
        c = self.cache
        for layer in range(self.num_layers):
            c.k[layer].index_copy_(0, blocks, data[:, layer, 0])
            c.v[layer].index_copy_(0, blocks, data[:, layer, 1])
            if scales is not None:
                c.k_scale[layer].index_copy_(0, blocks, scales[:, layer, 0])
                c.v_scale[layer].index_copy_(0, blocks, scales[:, layer, 1])


class HostTier:
    """Fixed host slots holding block copies, keyed like the GPU cache, least recently used first out."""

    def __init__(self, layout: BlockLayout, num_slots: int, pin: bool):
        self.data = torch.empty((num_slots,) + layout.shape, dtype=layout.dtype, pin_memory=pin)
        self.scales = (torch.empty((num_slots,) + layout.scale_shape, dtype=torch.float32, pin_memory=pin)
                       if layout.scale_shape else None)
        self.pool = BlockPool(num_slots)
        self.entries: OrderedDict[bytes, tuple[int, float]] = OrderedDict()  # key -> (slot, scale); LRU first
        self.pins: dict[int, int] = {}  # slot -> holds (a pending disk write, a load in progress)
        self.busy: dict[int, torch.cuda.Event] = {}  # slot -> the last GPU copy into or out of it
        self._orphans: set[int] = set()  # pinned slots whose entry was replaced: freed when unpinned

    def get(self, key: bytes, scale: float, tolerance: float, touch: bool = True) -> int | None:
        entry = self.entries.get(key)
        if entry is None or abs(entry[1] / scale - 1.0) > tolerance:
            return None
        if touch:
            self.entries.move_to_end(key)
        return entry[0]

    def pin(self, slot: int) -> None:
        self.pins[slot] = self.pins.get(slot, 0) + 1

    def unpin(self, slot: int) -> None:
        if self.pins[slot] > 1:
            self.pins[slot] -= 1
            return
        del self.pins[slot]
        if slot in self._orphans:
            self._orphans.discard(slot)
            self.pool.free([slot])

    def settle(self, slot: int) -> None:
        """Before the host touches a slot's bytes: its GPU copies are done."""
        event = self.busy.pop(slot, None)
        if event is not None:
            event.synchronize()

    def take(self, n: int, demote) -> list[int]:
        """Up to n free slots (settled), evicting unpinned entries least recently used first;
        ``demote(key, slot, scale)`` sees each evicted entry before its slot is reused."""
        short = n - self.pool.num_free
        if short > 0:
            victims = []
            for key, (slot, scale) in self.entries.items():  # stops at the first ``short`` unpinned
                if len(victims) == short:
                    break
                if slot not in self.pins:
                    victims.append((key, slot, scale))
            for key, slot, scale in victims:
                del self.entries[key]
                self.settle(slot)
                demote(key, slot, scale)
            self.pool.free([slot for _, slot, _ in victims])
        slots = self.pool.allocate(min(n, self.pool.num_free)) or []
        for slot in slots:
            self.settle(slot)
        return slots

    def put(self, key: bytes, slot: int, scale: float) -> None:
        old = self.entries.get(key)
        self.entries[key] = (slot, scale)
        self.entries.move_to_end(key)
        if old is not None and old[0] != slot:  # the same prefix at another key scale: the new one wins
            self.release(old[0])

    def release(self, slot: int) -> None:
        """A slot no entry names any more goes back to the pool (once nothing holds it)."""
        if slot in self.pins:
            self._orphans.add(slot)
        else:
            self.pool.free([slot])
