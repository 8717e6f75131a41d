"""Prefix-cache tiers under tensor parallelism: the driver decides, every rank moves its own shard.

Each rank holds its share of the KV heads, so each rank keeps its own host slots and its own disk
files (the cache identity names the rank: one folder per rank). The driver's ``KVTiers`` alone keeps
the bookkeeping (lookup, LRU, which key is in which slot, what is on disk) and logs every byte move
it makes, with the block ids, slots and keys it chose:

    down(blocks, slots)      GPU blocks -> host slots          demote(key, slot, scale)  a copy to write
    up(blocks, slots)        host slots -> GPU blocks          persist(key, scale, slot) write from a slot
    fence()                  main stream waits for copies down flush()                   writers drained (*)
    read(keys, slots, scale) files -> host slots (*)

The log rides along with the next step's broadcast (``runtime.StepMsg.tier_ops``), so a worker
replays it after the step before and ahead of the step after, the order the driver ran it in. An op
marked (*) needs the workers' answer now: the driver sends the log at once (a ``TierMsg``), and the
ranks meet in an all-reduce after it. For a read that is one flag per block (not read sound, corrupt),
summed over the ranks: a block missing or corrupt on any rank is missing on all of them, so no rank
attends over a block another rank failed to load, and the driver forgets it was on disk so that its
recomputed copy is written again.

A worker's writer may lag behind the driver's: the driver reuses a slot, or reads a file, once its
own write of it is done. So a worker waits for its writer before it copies into a slot its writer
still reads, and before it reads files while writes are queued (else a file not yet written there
would be a miss, and the block recomputed on every rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from qwen1m.cache.disk_tier import WriteItem
from qwen1m.errors import Qwen1mError


@dataclass(slots=True)
class TierMsg:
    """Tier ops sent on their own, between steps (a read or a flush waits for the workers' answer)."""

    tier_ops: list = field(default_factory=list)


def _flags(results: list[tuple[str, float]], device: torch.device) -> torch.Tensor:
    """[2, n] int64: per block, 1 where this rank did not read it sound, 1 where its file was corrupt."""
    return torch.tensor([[status != "hit" for status, _ in results],
                         [status == "corrupt" for status, _ in results]], dtype=torch.int64, device=device)


class TierPeers:
    """The driver's side: the op log the workers replay, and the collectives that answer it."""

    def __init__(self, broadcaster, device: torch.device) -> None:
        self.broadcaster = broadcaster  # runtime.StepBroadcaster: it sends the log with each step
        self.device = device
        self.ops: list[tuple] = []
        self.corrupt_files = 0  # the other ranks' corrupt files, learnt from the reads' flags

    def log(self, *op) -> None:
        self.ops.append(op)

    def take(self) -> list[tuple]:
        ops, self.ops = self.ops, []
        return ops

    def send(self) -> None:
        """The log now, not with the next step."""
        self.broadcaster.send(TierMsg(self.take()))

    def agree(self, results: list[tuple[str, float]]) -> list[tuple[str, float]]:
        """The driver's read results, each a hit only where every rank read its shard sound."""
        flags = self.broadcaster.all_reduce(_flags(results, self.device)).tolist()
        self.corrupt_files += sum(flags[1]) - sum(status == "corrupt" for status, _ in results)
        return [r if not missing else ("corrupt" if corrupt else "miss", 0.0)
                for r, missing, corrupt in zip(results, flags[0], flags[1])]

    def flush(self) -> None:
        """Every rank's queued writes are on disk when this returns."""
        self.log("flush")
        self.send()
        self.broadcaster.all_reduce(torch.zeros(1, dtype=torch.int64, device=self.device))


def share_tiers(tiers, broadcaster, options: dict) -> None:
    """Make the driver's ``tiers`` drive a replica on every worker; ``options``: build_tiers' arguments
    (the disk settings are rank 0's: each worker puts its own rank in)."""
    peers = TierPeers(broadcaster, tiers.device)
    tiers.peers = peers
    broadcaster.tiers = peers
    peers.log("setup", {**options, "host_slots": tiers.host.pool.num_blocks})
    peers.send()  # the workers build theirs now: their host memory is taken, and their log lines come, at start


class TierReplica:
    """A worker's side: its own ``KVTiers`` (host slots, disk namespace), driven by the driver's log."""

    def __init__(self, kv_cache, device: torch.device) -> None:
        self.kv_cache = kv_cache
        self.device = device
        self.tiers = None  # built by the "setup" op: the driver has no tiers until it sends one

    def replay(self, ops: list[tuple]) -> None:
        for name, *args in ops:
            getattr(self, f"_{name}")(*args)

    def close(self) -> None:
        """Finish this rank's queued writes (the process then leaves without the interpreter's teardown)."""
        if self.tiers is not None and self.tiers.disk is not None:
            self.tiers.disk.close()

    # ---- the ops ----------------------------------------------------------------------------------
    def _setup(self, options: dict) -> None:
        from qwen1m.cache.kv_tiers import build_tiers

        options = dict(options)
        slots = options.pop("host_slots")
        if options["settings"] is not None:  # this rank's own files
            options["settings"] = {**options["settings"], "tensor_parallel_rank": dist.get_rank()}
        tolerance = options.pop("scale_tolerance")
        self.tiers = build_tiers(self.kv_cache, tolerance, **options)
        if self.tiers.host.pool.num_blocks != slots:
            raise Qwen1mError(f"tensor-parallel rank {dist.get_rank()} has {self.tiers.host.pool.num_blocks} "
                              f"host slots where the driver has {slots}.")

    def _down(self, blocks: list[int], slots: list[int]) -> None:
        self._reuse(slots)
        self.tiers.copy_down(blocks, slots)

    def _up(self, blocks: list[int], slots: list[int]) -> None:
        self.tiers.copy_up(blocks, slots)

    def _fence(self) -> None:
        self.tiers.fence()

    def _demote(self, key: bytes, slot: int, scale: float) -> None:
        self.tiers.host.settle(slot)
        self.tiers.submit([self.tiers.private_copy(key, slot, scale)])

    def _persist(self, key: bytes, scale: float, slot: int) -> None:
        host = self.tiers.host
        host.pin(slot)  # until this rank's writer is done with it (``_reuse`` waits for that)
        self.tiers.submit([WriteItem(key, scale, host.data[slot],
                                     host.scales[slot] if host.scales is not None else None,
                                     slot, host.busy.get(slot))])

    def _read(self, keys: list[bytes], slots: list[int], scale: float) -> None:
        self._reuse(slots)
        if self.tiers.disk.writing():  # the driver reads a block once its own write of it is done; ours may lag
            self.tiers.disk.flush()
        results = self.tiers.read_files(keys, slots, scale)
        dist.all_reduce(_flags(results, self.device))  # the driver sums every rank's flags

    def _flush(self) -> None:
        self.tiers.flush()
        dist.all_reduce(torch.zeros(1, dtype=torch.int64, device=self.device))

    def _reuse(self, slots: list[int]) -> None:
        """Before new bytes go into ``slots``: their earlier GPU copies are done, and this rank's writer
        has written what it was reading from them."""
        tiers = self.tiers
        tiers.drain()
        if tiers.disk is not None and any(slot in tiers.host.pins for slot in slots):
            tiers.disk.flush()
            tiers.drain()
        for slot in slots:
            tiers.host.settle(slot)
