"""A worker's tier replica on its own (no process group): the replay of the driver's ops."""

from __future__ import annotations

import time

import torch

import qwen1m.cache.disk_tier as disk_tier
from qwen1m.cache.kv_tiers import build_tiers
from qwen1m.cache.paged_kv import PagedKVCache
from qwen1m.parallel.tier_sync import TierReplica

KEY = bytes(range(32))


def _replica(folder) -> TierReplica:
    cache = PagedKVCache(2, 4, 4, 1, 8, torch.float32, torch.device("cpu"))
    for layer in range(2):
        cache.k[layer].copy_(torch.arange(cache.k[layer].numel(), dtype=torch.float32).view_as(cache.k[layer]))
        cache.v[layer].copy_(-cache.k[layer])
    replica = TierReplica(cache, torch.device("cpu"))
    # what the "setup" op builds, without the rank lookup (no process group here)
    replica.tiers = build_tiers(cache, 0.0, cpu_offload_gb=4 * 2048 / 2**30, prefix_cache_dir=folder,
                                prefix_cache_max_gb=None, settings={"tensor_parallel_rank": 1})
    return replica


def test_a_slot_this_ranks_writer_still_reads_is_not_overwritten(tmp_path, monkeypatch):
    """The driver reuses a slot once its own write of it is done; this rank's writer may lag: the
    replay of a copy into that slot waits for it, so the file holds the bytes persisted."""
    write = disk_tier.DiskTier._write

    def slow_write(self, item):  # widens the race the wait closes
        time.sleep(0.3)
        return write(self, item)

    monkeypatch.setattr(disk_tier.DiskTier, "_write", slow_write)
    replica = _replica(tmp_path)
    tiers = replica.tiers
    replica.replay([("down", [0], [0]), ("persist", KEY, 1.0, 0), ("down", [1], [0])])
    tiers.disk.flush()
    block = torch.empty((1,) + tiers.layout.shape)
    assert tiers.disk.read(KEY, 1.0, 0.0, block[0], None) == ("hit", 1.0)
    want = torch.empty_like(block)
    tiers.layout.gather(torch.tensor([0]), want, None)
    assert torch.equal(block, want)  # block 0, not block 1 copied into the slot afterwards
    replica.replay([("up", [2], [0])])
    assert torch.equal(replica.kv_cache.k[0][2], replica.kv_cache.k[0][1])  # the slot now holds block 1
    replica.close()
