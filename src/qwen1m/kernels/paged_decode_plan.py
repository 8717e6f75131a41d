"""Launch plan of the paged decode kernels (``qwen1m.kernels.paged_decode``): how many split-K
pieces a range is cut into, the tile configuration, and the checks of every input. Host-side only:
nothing here reads device tensors, so a launch planned from it stays CUDA-graph capturable."""

from __future__ import annotations

import functools

import torch
import triton

_SUPPORTED_Q_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FP8_DTYPES = (torch.float8_e4m3fn,)

# Split choice (num_splits=None). Programs resident per SM for this kernel: a [64, 128] bf16 K and V
# tile per stage is 32 KiB, so several programs fit in the H200's 228 KiB of shared memory per SM and
# their loads overlap; aiming at this many programs per SM keeps every SM streaming.
_PROGRAMS_PER_SM = 4
# A piece shorter than this is mostly fixed cost (query load, workspace write, reduction read).
_MIN_TOKENS_PER_SPLIT = 256
# Upper bound on the pieces of a row (R ranges * splits), so the workspace stays small (pieces *
# head_dim floats per row) and the reduce covers a row in at most two sweeps of BLOCK_S 256.
_MAX_PIECES = 512
# The reduce kernel's [BLOCK_S, BLOCK_D] float32 tile: at most this many elements, i.e. 32 registers
# per thread with its 4 warps (a [128, 128] tile would need 128).
_REDUCE_TILE_ELEMS = 4096
_REDUCE_MAX_BLOCK_S = 256
_REDUCE_MIN_BLOCK_D = 16


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(batch: int, num_kv_heads: int, max_len: int, device: torch.device, num_ranges: int = 1) -> int:
    """Splits per range: enough that each range's batch * num_kv_heads * num_splits programs alone
    fill the GPU (about _PROGRAMS_PER_SM per SM), so a launch of R ranges has R times that many.

        splits = max(1, min(cdiv(_PROGRAMS_PER_SM * sms, batch * num_kv_heads),
                            cdiv(max_len, _MIN_TOKENS_PER_SPLIT * num_ranges),
                            _MAX_PIECES // num_ranges))

    Why per range and not per launch: measured on the H200 (benchmarks/bench_decode_ranges.py,
    1M keys in DCA's three ranges, batch 1, 4 kv heads, CUDA-graph timing), 44 splits per range
    (132 pieces, what filling the GPU once would give) took 0.73 ms, 88 took 0.53 ms and 132 took
    0.49 ms, the time of one range over the same keys with 132 pieces (0.46 ms); one range holding
    every key with two empty ranges beside it ran at 0.46 ms with 132 pieces. The engine launches
    more than one range only past one DCA chunk (254K keys for Qwen2.5-7B-1M: it keeps the non-empty
    ranges only), where pieces of thousands of keys have no fixed cost to speak of.

    max_len: an upper bound on the keys a sequence attends to (the wrapper uses max_blocks_per_seq *
    block_size, known without a device sync, so the launch stays CUDA-graph friendly). The kernel
    cuts the concatenated tiles of a sequence's R ranges into R * splits equal pieces, and R ranges
    (disjoint, as DCA's) hold at most max_len keys together, hence the second bound: pieces shorter
    than _MIN_TOKENS_PER_SPLIT are not worth their fixed cost. Example, H200 (132 SMs), batch 1,
    4 kv heads: 128 splits at 32K keys, 132 at 128K or 1M keys and any R <= 3 (396 pieces at R = 3).
    """
    if num_ranges < 1:
        raise ValueError(f"choose_num_splits: num_ranges must be >= 1, got {num_ranges}.")
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    want = triton.cdiv(_PROGRAMS_PER_SM * sms, max(1, batch * num_kv_heads))
    useful = triton.cdiv(max(1, max_len), _MIN_TOKENS_PER_SPLIT * num_ranges)
    return max(1, min(want, useful, _MAX_PIECES // num_ranges))


def reduce_config(pieces: int, head_dim: int) -> dict[str, int]:
    """BLOCK_S / BLOCK_D / num_warps of the reduce kernel, which merges `pieces` partial rows.

    At batch 1 the reduce has few rows (28 at Qwen2.5-7B) and is latency-bound: the pieces of a row
    are covered in as few dependent iterations as possible (BLOCK_S up to _REDUCE_MAX_BLOCK_S: one
    iteration up to 256 pieces, two for the 396 of a three-range launch at batch 1), and head_dim is
    cut into slices of BLOCK_D, one program each, so that the [BLOCK_S, BLOCK_D] float32 tile stays
    within _REDUCE_TILE_ELEMS (registers of 4 warps) and more SMs pull the workspace in parallel
    (28 rows -> 224 programs at 129+ pieces).
    """
    block_s = min(triton.next_power_of_2(max(1, pieces)), _REDUCE_MAX_BLOCK_S)
    block_d = min(head_dim, max(_REDUCE_MIN_BLOCK_D, _REDUCE_TILE_ELEMS // block_s))
    return dict(BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4)


def default_config(head_dim: int, cache_dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """BLOCK_N / num_warps / num_stages. Interpreter: 16-key tiles so tiny tests cross tiles and blocks.

    CUDA: 64-key tiles (one production block) at head_dim <= 128, 4 warps, 3 stages: a K and a V tile
    of 16 KiB each per stage in bf16 (96 KiB of shared memory at most; compiled for sm_90 by triton
    3.6 the kernel takes 38.9 KB, 94-96 registers, so registers rather than shared memory bound the
    programs per SM); float32 caches halve the tile
    and use 2 stages. A first guess, not yet measured: benchmarks/bench_decode.py sweeps the
    alternatives on the H200 (omit --quick).
    """
    if device.type != "cuda":
        return dict(BLOCK_N=16, num_warps=4, num_stages=1)
    block_n = 64 if head_dim <= 128 else 32
    if cache_dtype == torch.float32:
        return dict(BLOCK_N=block_n // 2 if head_dim > 64 else block_n, num_warps=4, num_stages=2)
    return dict(BLOCK_N=block_n, num_warps=4, num_stages=3)


def check_inputs(q, k_cache, v_cache, block_tables, kv_start, kv_end, k_scale, v_scale) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "paged_decode_attention expects q [batch, num_heads, head_dim] and k_cache, v_cache "
            f"[num_blocks, block_size, num_kv_heads, head_dim] of equal shape, got q {tuple(q.shape)}, "
            f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}."
        )
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"paged_decode_attention: q head_dim {head_dim} differs from the cache's {cache_head_dim}.")
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"paged_decode_attention supports head_dim a power of two in [16, 256], got {head_dim}.")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"paged_decode_attention needs a power-of-two block_size, got {block_size}.")
    if num_heads % num_kv_heads:
        raise ValueError(
            f"paged_decode_attention: num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}."
        )
    if q.dtype not in _SUPPORTED_Q_DTYPES:
        raise ValueError(f"paged_decode_attention supports q in float16/bfloat16/float32, got {q.dtype}.")
    fp8 = k_cache.dtype in _FP8_DTYPES
    if v_cache.dtype != k_cache.dtype or not (fp8 or k_cache.dtype == q.dtype):
        raise ValueError(
            f"paged_decode_attention: k_cache / v_cache must both be q's dtype {q.dtype} or float8_e4m3fn, "
            f"got {k_cache.dtype} and {v_cache.dtype}."
        )
    if (k_scale is None) != (v_scale is None) or (k_scale is not None and not fp8):
        raise ValueError("paged_decode_attention: k_scale and v_scale go together, and only with a float8 cache.")
    if k_scale is not None:
        want = tuple(k_cache.shape[:3])
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if tuple(s.shape) != want or s.dtype != torch.float32:
                raise ValueError(
                    f"paged_decode_attention: {name} must be float32 {want} "
                    f"[num_blocks, block_size, num_kv_heads], got {s.dtype} {tuple(s.shape)}."
                )
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.dtype != torch.int32:
        raise ValueError(
            f"paged_decode_attention: block_tables must be int32 [batch={batch}, max_blocks_per_seq], "
            f"got {block_tables.dtype} {tuple(block_tables.shape)}."
        )
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        if tuple(t.shape) != (batch,) or t.dtype != torch.int32:
            raise ValueError(
                f"paged_decode_attention: {name} must be int32 [batch={batch}], got {t.dtype} {tuple(t.shape)}."
            )


def check_multi_inputs(q, kv_start, kv_end) -> None:
    """The range dimension of paged_decode_attention_multi; the rest is check_inputs on range 0."""
    if q.dim() != 4 or q.shape[0] < 1:
        raise ValueError(
            "paged_decode_attention_multi expects q [num_ranges >= 1, batch, num_heads, head_dim], "
            f"got {tuple(q.shape)}."
        )
    want = tuple(q.shape[:2])
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        if tuple(t.shape) != want or t.dtype != torch.int32:
            raise ValueError(
                f"paged_decode_attention_multi: {name} must be int32 [num_ranges, batch] = {want}, "
                f"got {t.dtype} {tuple(t.shape)}."
            )
