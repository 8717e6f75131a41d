"""Paged KV cache: block pool, contiguous vs scattered layouts, FP8 round trip."""

from __future__ import annotations

import pytest
import torch

from qwen1m.cache.block_pool import BlockPool
from qwen1m.cache.paged_kv import PagedKVCache, SequenceBlocks, dequantize_fp8, quantize_fp8


def test_block_pool_prefers_contiguous_runs_and_reuses_freed_blocks():
    pool = BlockPool(10)
    a = pool.allocate(3)
    b = pool.allocate(2)
    assert a == [0, 1, 2] and b == [3, 4]
    pool.free(a)
    assert pool.allocate(4) == [5, 6, 7, 8]  # first run long enough
    scattered = pool.allocate(4)  # free: 0,1,2,9 -> no run of 4
    assert sorted(scattered) == [0, 1, 2, 9]
    assert pool.allocate(1) is None and pool.num_free == 0


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("blocks", [[2, 3, 4], [4, 0, 2]])  # contiguous (views) and scattered (gathers)
def test_write_then_view_returns_what_was_written(fp8, blocks):
    torch.manual_seed(0)
    cache = PagedKVCache(2, 5, 4, 2, 8, torch.float32, torch.device("cpu"), fp8=fp8)
    seq = SequenceBlocks(cache, blocks, torch.device("cpu"))
    assert (seq.first_block is not None) == (blocks == [2, 3, 4])
    k, v = torch.randn(11, 2, 8) * 3, torch.randn(11, 2, 8)
    seq.write(1, 0, k[:5], v[:5])  # writes that straddle blocks, in pieces
    seq.write(1, 5, k[5:6], v[5:6])
    seq.write(1, 6, k[6:], v[6:])
    kk, vv = seq.view(1, 11)
    tol = 0.07 if fp8 else 0.0  # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of the row max
    assert torch.allclose(kk, k, atol=tol * k.abs().max().item())
    assert torch.allclose(vv, v, atol=tol * v.abs().max().item())
    with pytest.raises(RuntimeError, match="KV cache overflow"):
        seq.write(1, 10, k[:3], v[:3])


def test_fp8_quantization_error_is_bounded_per_head():
    x = torch.randn(64, 4, 128) * torch.tensor([0.01, 1.0, 30.0, 500.0])[None, :, None]  # very different heads
    q, scale = quantize_fp8(x)
    assert q.dtype == torch.uint8 and scale.shape == (64, 4)
    back = dequantize_fp8(q, scale, torch.float32)
    rel = (back - x).abs().amax(-1) / x.abs().amax(-1)
    assert rel.max().item() <= 2 ** -4 + 1e-6  # half an e4m3 ulp at the top of the range


def test_block_pool_free_merges_unsorted_runs():
    """free() of blocks in any order keeps the free list sorted, so runs are found again."""
    pool = BlockPool(64)
    a, b, c = pool.allocate(20), pool.allocate(20), pool.allocate(20)
    pool.free(list(reversed(b)))
    pool.free([c[5], c[0], c[19]] + c[6:19] + c[1:5])
    assert pool._free == sorted(pool._free) and pool.num_free == 4 + 40
    assert pool.allocate(40) == b + c  # one contiguous run again: 20..59
    pool.free(a)  # free: 0..19 and 60..63, no run of 24: the first 24 free ids
    assert pool.allocate(24) == a + [60, 61, 62, 63] and pool.num_free == 0
