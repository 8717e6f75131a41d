"""Host-memory and disk tiers under the GPU prefix cache: a long document is prefilled once.

    GPU blocks (prefix_cache.py) ──registered: copied (side stream)──> host slots (pinned, LRU)
          ^                                                              |       ^
          └────────── a prompt's next blocks, loaded ────────────────────┘       |
                                                     request ends: writer thread v  read (checked)
                                                                           disk files (disk_tier.py)

Write-through: a block entering the GPU prefix cache is copied to a host slot at once, on a side
CUDA stream that waits for the step that computed it (a 32K-token chunk's 512 blocks move at PCIe
speed while the next chunk computes), so evicting it from the GPU later costs nothing: it is already
a tier down. The main stream waits for that copy's event before it overwrites the block. When the
request ends, its blocks go to the disk writer, which reads them from their host slots (pinned until
written); a host slot evicted before it reached the disk is copied for the writer first. So the
host tier is also the disk tier's staging area: with only a disk folder it gets ``DEFAULT_STAGING_GB``.

Lookup: after the GPU prefix cache's longest match, a prompt's next blocks are looked up in host
memory, then on disk (a disk block is read into a host slot, then copied up); the first miss ends
the prefix. Each entry keeps the key scale it was made with (YaRN temperature m): reuse follows the
GPU cache's rule, m within ``scale_tolerance`` (``prefix_cache.py``).

Threads: everything here runs on the engine's thread except the disk writer (``disk_tier.py``) and
the reads of a batch's disk blocks, which a small pool runs in parallel while the engine waits.

Tensor parallelism: this object decides on the driver (rank 0); ``peers`` (``parallel/tier_sync.py``)
replays every byte move it makes (copies down and up, disk reads, writes) on the other ranks, each
on its own KV shard, host buffer and disk namespace. None on one process.
"""

from __future__ import annotations

import logging
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwen1m.cache.disk_tier import DiskTier, WriteItem
from qwen1m.cache.host_tier import BlockLayout, HostTier
from qwen1m.cache.paged_kv import PagedKVCache

logger = logging.getLogger(__name__)

TIERS = ("gpu", "host", "disk")
DEFAULT_STAGING_GB = 2.0  # host tier size when only a disk folder is given (its write staging)
STAGING_BYTES = 256 << 20  # GPU memory one batch of block copies goes through (not in the memory plan)
READ_THREADS = 8  # parallel disk block reads (each reads and checksums one file)
MAX_HOST_SLOTS = 1 << 18  # 16M tokens of 64-token blocks: a bound on the slot bookkeeping for tiny models


@dataclass(slots=True)
class TierStats:
    """Cumulative counters for /metrics: prompt tokens each tier served, bytes copied into the GPU
    from each tier (read) and into each tier (written)."""

    hit_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    read_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    written_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    corrupt_files: int = 0
    dropped_blocks: int = 0  # blocks that could not go a tier down (no free slot, a full write queue)


def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(index in slots, first slot, length) of each run of consecutive slot ids."""
    runs, i = [], 0
    while i < len(slots):
        j = i + 1
        while j < len(slots) and slots[j] == slots[j - 1] + 1:
            j += 1
        runs.append((i, slots[i], j - i))
        i = j
    return runs


class KVTiers:
    def __init__(self, kv_cache: PagedKVCache, host_bytes: int, disk: DiskTier | None, scale_tolerance: float):
        self.layout = BlockLayout(kv_cache)
        self.device = kv_cache.k[0].device
        self.cuda = self.device.type == "cuda"
        self.host = HostTier(self.layout, min(MAX_HOST_SLOTS, max(1, host_bytes // self.layout.nbytes)), pin=self.cuda)
        self.disk = disk
        self.tolerance = scale_tolerance
        self.stats = TierStats()
        self.block_size = kv_cache.block_size
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._batch = max(1, STAGING_BYTES // self.layout.nbytes)  # blocks per copy batch
        self._staging: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the side stream's
        self._last_copy: torch.cuda.Event | None = None  # the latest copy down, on the side stream
        self._on_disk: dict[bytes, float] = {}  # keys known written (or read) here, with their key scale
        self._writing: set[bytes] = set()  # keys queued for the writer
        self._demoted: list[WriteItem] = []  # host entries evicted before they reached the disk
        self._readers: ThreadPoolExecutor | None = None  # disk reads, made on first use
        self.peers = None  # parallel.tier_sync.TierPeers under tensor parallelism: the other ranks
        if disk is not None:  # queued writes finish before the interpreter exits
            self._finalizer = weakref.finalize(self, disk.close)

    # ---- the allocator's calls --------------------------------------------------------------------
    def offload(self, blocks: list[int], keys: list[bytes], scale: float) -> None:
        """Copy freshly registered GPU blocks to host slots (write-through), unless already there."""
        self.drain()
        todo = [(b, k) for b, k in zip(blocks, keys) if self.host.get(k, scale, self.tolerance) is None]
        if todo:
            slots = self.host.take(len(todo), self._demote)
            self.stats.dropped_blocks += len(todo) - len(slots)
            todo = todo[:len(slots)]
            for (_, key), slot in zip(todo, slots):
                self.host.put(key, slot, scale)
            self.copy_down([b for b, _ in todo], slots)
            self.stats.written_bytes["host"] += len(slots) * self.layout.nbytes
        self._submit_demoted()

    def before_gpu_evict(self, evicted: list[tuple[int, bytes, float]]) -> None:
        """GPU blocks (block, key, key scale) leave the prefix cache: each goes a tier down if the
        host lacks it, and the main stream waits for the copies before it overwrites them."""
        self.drain()
        by_scale: dict[float, list[tuple[int, bytes]]] = {}
        for block, key, scale in evicted:
            if self.host.get(key, scale, self.tolerance, touch=False) is None:
                by_scale.setdefault(scale, []).append((block, key))
        for scale, items in by_scale.items():
            self.offload([b for b, _ in items], [k for _, k in items], scale)
        if self.peers is not None:
            self.peers.log("fence")
        self.fence()

    def fence(self) -> None:
        """The main stream waits for the copies down so far (before it overwrites their blocks)."""
        if self._last_copy is not None:
            torch.cuda.current_stream(self.device).wait_event(self._last_copy)

    def load(self, keys: list[bytes], blocks: list[int], scale: float) -> list[str]:
        """Fill GPU ``blocks`` with the blocks of ``keys`` from host memory or disk, as far as the
        leading ones are found; returns the tier each loaded block came from ("host" / "disk")."""
        self.drain()
        sources: list[str] = []
        done = False
        while not done and len(sources) < min(len(keys), len(blocks)):
            # a batch at a time: disk reads land in host slots, held until their copy up is enqueued
            # (a document larger than the host tier streams through it)
            start = len(sources)
            batch = keys[start:min(len(keys), len(blocks), start + self._batch)]
            slots, from_disk = self._find_batch(batch, scale)  # pinned: held until their copy up is enqueued
            sources += ["disk" if d else "host" for d in from_disk]
            done = len(slots) < len(batch)
            try:
                self.copy_up(blocks[start:start + len(slots)], slots)
            finally:
                for slot in slots:
                    self.host.unpin(slot)
            done = done or not slots
        for source in sources:
            self.stats.hit_tokens[source] += self.block_size
            self.stats.read_bytes[source] += self.layout.nbytes
        self._submit_demoted()
        return sources

    def persist(self, keys: list[bytes]) -> None:
        """A request ended: queue its blocks that are in host memory but not on disk for the writer."""
        self.drain()
        if self.disk is None or not self.disk.enabled:
            return
        items = []
        for key in keys:
            entry = self.host.entries.get(key)
            if entry is None or key in self._writing or self._known(key, entry[1]):
                continue
            slot, scale = entry
            self.host.pin(slot)  # the writer reads the slot: it stays until written
            if self.peers is not None:
                self.peers.log("persist", key, scale, slot)
            items.append(WriteItem(key, scale, self.host.data[slot],
                                   self.host.scales[slot] if self.host.scales is not None else None,
                                   slot, self.host.busy.get(slot)))
            self._writing.add(key)
        self.submit(items)

    def flush(self) -> None:
        """Wait for every queued disk write (tests, benchmarks, before a restart)."""
        self._submit_demoted()
        if self.disk is not None:
            self.disk.flush()
        self.drain()
        if self.peers is not None:  # and the other ranks' writers
            self.peers.flush()

    def snapshot(self) -> TierStats:
        """The counters, the disk writer's included (bytes: this rank's shard; corrupt files: every rank's)."""
        if self.disk is not None:
            self.stats.written_bytes["disk"] = self.disk.written_bytes
            self.stats.corrupt_files = self.disk.corrupt_files + (self.peers.corrupt_files if self.peers else 0)
        return self.stats

    # ---- internals --------------------------------------------------------------------------------
    def _known(self, key: bytes, scale: float) -> bool:
        on_disk = self._on_disk.get(key)
        return on_disk is not None and abs(on_disk / scale - 1.0) <= self.tolerance

    def _demote(self, key: bytes, slot: int, scale: float) -> None:
        """A host entry is evicted: if the disk lacks it, the writer gets a copy of its bytes."""
        if self.disk is None or not self.disk.enabled or key in self._writing or self._known(key, scale):
            return
        if self.peers is not None:
            self.peers.log("demote", key, slot, scale)
        self._demoted.append(self.private_copy(key, slot, scale))
        self._writing.add(key)

    def private_copy(self, key: bytes, slot: int, scale: float) -> WriteItem:
        """A write of a slot's bytes that no longer needs the slot (it is about to be reused)."""
        scales = self.host.scales[slot].clone() if self.host.scales is not None else None
        return WriteItem(key, scale, self.host.data[slot].clone(), scales, None)

    def _submit_demoted(self) -> None:
        items, self._demoted = self._demoted, []
        self.submit(items)

    def submit(self, items: list[WriteItem]) -> None:
        if items and not self.disk.submit(items):  # queue full or tier off: dropped, not waited for
            self.stats.dropped_blocks += len(items)
            for item in items:
                self._writing.discard(item.key)
                if item.slot is not None:
                    self.host.unpin(item.slot)

    def drain(self) -> None:
        """Take the writer's finished items: unpin their slots, note what is on disk now."""
        if self.disk is None:
            return
        for slot, key, scale, ok in self.disk.take_done():
            if slot is not None:
                self.host.unpin(slot)
            self._writing.discard(key)
            if ok:
                self._on_disk[key] = scale
            else:  # a failed write, or the size cap evicted the file
                self._on_disk.pop(key, None)

    def _find_batch(self, keys: list[bytes], scale: float) -> tuple[list[int], list[bool]]:
        """Host slots (pinned) holding the leading blocks of ``keys`` that some tier has, and for each
        whether it came from disk. Host hits are pinned first (a disk read's slot must not evict
        them); the disk blocks among the rest are read in parallel (file reads and zlib's crc32
        release the GIL: one thread read ~1 GB/s, a fraction of an NVMe disk's rate)."""
        found = [self.host.get(key, scale, self.tolerance) for key in keys]
        for slot in found:
            if slot is not None:
                self.host.pin(slot)
        wanted = [i for i, slot in enumerate(found) if slot is None]
        for i, slot in zip(wanted, self._read_disk([keys[i] for i in wanted], scale)):
            found[i] = slot
        lead = next((i for i, slot in enumerate(found) if slot is None), len(found))
        for slot in found[lead:]:
            if slot is not None:
                self.host.unpin(slot)
        disk = set(wanted)
        return found[:lead], [i in disk for i in range(lead)]

    def _read_disk(self, keys: list[bytes], scale: float) -> list[int | None]:
        """Read the leading ``keys`` found on disk into host slots, in parallel; a pinned slot per
        block read sound, None from the first block that is missing or bad on."""
        out: list[int | None] = [None] * len(keys)
        if self.disk is None or not self.disk.enabled:
            return out
        present = []
        for key in keys:
            if not self.disk.path(key).is_file():
                break
            present.append(key)
        slots = self.host.take(len(present), self._demote)
        present = present[:len(slots)]
        if not present:
            return out
        if self.peers is not None:  # the other ranks read their files of these keys meanwhile
            self.peers.log("read", present, slots, scale)
            self.peers.send()
        results = self.read_files(present, slots, scale)
        if self.peers is not None:  # a block counts only where every rank read its shard sound
            results = self.peers.agree(results)
        sound = True
        for i, (key, slot, (status, found)) in enumerate(zip(present, slots, results)):
            if status != "hit":
                self.host.release(slot)
                self._on_disk.pop(key, None)  # deleted (corrupt) or missing on some rank: write it again
                sound = False
                continue
            self.host.put(key, slot, found)  # a sound block past a bad one still joins the host tier
            self._on_disk[key] = found
            if sound:
                self.host.pin(slot)
                out[i] = slot
        return out

    def read_files(self, keys: list[bytes], slots: list[int], scale: float) -> list[tuple[str, float]]:
        """Read each key's file into its host slot, in parallel: DiskTier.read's (status, key scale)."""
        if self._readers is None:
            self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="qwen1m-kv-reader")
        scales = self.host.scales

        def read(job: tuple[bytes, int]) -> tuple[str, float]:
            key, slot = job
            return self.disk.read(key, scale, self.tolerance, self.host.data[slot],
                                  scales[slot] if scales is not None else None)

        return list(self._readers.map(read, zip(keys, slots)))

    def copy_down(self, blocks: list[int], slots: list[int]) -> None:
        """GPU blocks -> host slots. CUDA: on the side stream, after the work enqueued so far; the
        slots' event says when their bytes have landed."""
        if not slots:
            return
        if self.peers is not None:
            self.peers.log("down", blocks, slots)
        host = self.host
        if not self.cuda:
            n, idx = len(blocks), torch.tensor(blocks)
            data = torch.empty((n,) + self.layout.shape, dtype=self.layout.dtype)
            scales = torch.empty((n,) + self.layout.scale_shape) if host.scales is not None else None
            self.layout.gather(idx, data, scales)
            host.data[torch.tensor(slots)] = data
            if scales is not None:
                host.scales[torch.tensor(slots)] = scales
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            if self._staging is None:  # reused batch after batch: the stream orders its reuse
                self._staging = (torch.empty((self._batch,) + self.layout.shape, dtype=self.layout.dtype,
                                             device=self.device),
                                 torch.empty((self._batch,) + self.layout.scale_shape, device=self.device)
                                 if host.scales is not None else None)
            data, scales = self._staging
            for i in range(0, len(blocks), self._batch):
                batch, batch_slots = blocks[i:i + self._batch], slots[i:i + self._batch]
                n = len(batch)
                idx = torch.tensor(batch).to(self.device, non_blocking=True)
                self.layout.gather(idx, data[:n], scales[:n] if scales is not None else None)
                for j, first, k in _runs(batch_slots):  # bytes: n * layout.nbytes over PCIe
                    host.data[first:first + k].copy_(data[j:j + k], non_blocking=True)
                    if scales is not None:
                        host.scales[first:first + k].copy_(scales[j:j + k], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        for slot in slots:
            host.busy[slot] = event
        self._last_copy = event

    def copy_up(self, blocks: list[int], slots: list[int]) -> None:
        """Host slots -> GPU blocks, on the current stream (the step that reads them follows it)."""
        if not slots:
            return
        if self.peers is not None:
            self.peers.log("up", blocks, slots)
        host = self.host
        if not self.cuda:
            idx = torch.tensor(slots)
            self.layout.scatter(torch.tensor(blocks), host.data[idx],
                                host.scales[idx] if host.scales is not None else None)
            return
        main = torch.cuda.current_stream(self.device)
        for slot in slots:
            event = host.busy.get(slot)
            if event is not None:
                main.wait_event(event)  # a copy down into this slot is still on its way
        for i in range(0, len(blocks), self._batch):
            batch, batch_slots = blocks[i:i + self._batch], slots[i:i + self._batch]
            runs = _runs(batch_slots)
            data = torch.cat([host.data[s:s + k].to(self.device, non_blocking=True) for _, s, k in runs])
            scales = (torch.cat([host.scales[s:s + k].to(self.device, non_blocking=True) for _, s, k in runs])
                      if host.scales is not None else None)
            self.layout.scatter(torch.tensor(batch).to(self.device, non_blocking=True), data, scales)
        event = torch.cuda.Event()
        event.record(main)
        for slot in slots:
            host.busy[slot] = event  # the host must not overwrite them before this copy has read them


def build_tiers(kv_cache: PagedKVCache, scale_tolerance: float, *, cpu_offload_gb: float | None,
                prefix_cache_dir: str | Path | None, prefix_cache_max_gb: float | None,
                settings: dict | None) -> KVTiers | None:
    """The tiers LLM(cpu_offload_gb=..., prefix_cache_dir=...) asks for; None when neither is set."""
    if not cpu_offload_gb and prefix_cache_dir is None:
        return None
    disk = None
    layout = BlockLayout(kv_cache)
    if prefix_cache_dir is not None:
        max_bytes = int(prefix_cache_max_gb * 2**30) if prefix_cache_max_gb else None
        disk = DiskTier(prefix_cache_dir, settings, max_bytes, layout.shape, layout.dtype, layout.scale_shape)
    gb = cpu_offload_gb if cpu_offload_gb else DEFAULT_STAGING_GB
    tiers = KVTiers(kv_cache, int(gb * 2**30), disk, scale_tolerance)
    logger.info("prefix cache tiers: host %.2f GB (%d blocks of %d bytes)%s", gb, tiers.host.pool.num_blocks,
                layout.nbytes, f", disk {disk.namespace}" if disk is not None else "")
    return tiers
