"""Vertical-slash block index in Triton (MInference's ``convert_vertical_slash_indexes``, design §3.3).

Same contract as ``qwen1m.attention.vertical_slash.build_vertical_slash_index`` (the oracle, whose module
docstring defines the covered key set): the counts and the valid entries of ``block_offset`` /
``column_index`` are exactly equal. Only the padding differs: slots past the counts are left undefined
(never written, ``torch.empty``) and the padded widths are host-known upper bounds instead of the exact
maxima, so the builder needs no device -> host synchronisation. Every consumer reads within the counts
(``sparse_attn`` masks by them, ``sparse_attend_gather`` and ``vertical_slash_mask`` mask by them).

Host side: per head, the slash offsets are clamped to [d_lo - 1, num_kv] (outside [d_lo, num_kv - 1]
they select nothing, and clamping keeps them invalid and the sort order intact; it also makes int32
safe) and sorted descending, i.e. by ascending key start; the verticals are clamped to [-1, num_kv]
and sorted ascending. Duplicates are not removed on the host: the kernel skips a repeated vertical,
and a repeated slash has the interval of its predecessor, so it joins that group and changes nothing.

Kernel: one program per ROWS (head, query block) pairs, flattened head-major; each pair is one row of
the 2-D tiles below (the GPU runs ROWS = 1: one program per pair; the interpreter, whose cost is per
operation, not per element, runs 16 per program).

* Slashes, in tiles of SLASH_TILE sorted entries. For query block [start, end), the interval of d is
  ``[max(A - d, 0), min(B - d, lim))`` with A = start + offset, B = end + offset. Since d is sorted
  descending, both ends are non-decreasing along the array, and the non-empty intervals are those with
  A - lim < d < B: one contiguous run of the array. Hence the largest end before entry k is the end of
  entry k - 1, and a group (chain with gaps < block_n) starts at k iff k - 1 is not a non-empty
  interval or lo_k - hi_{k-1} >= block_n, and ends at k iff the same holds for k + 1; its span is
  [lo of its first entry, hi of its last entry). Entries k - 1 and k + 1 are simply loaded again
  (shifted loads), so a tile needs no carry but the forward-filled group start (running max: group
  starts increase) and the number of blocks emitted so far.
* Dense blocks. Group g (start L_g, n_g = ceil((H_g - L_g) / block_n) blocks, first output slot s_g)
  writes block_offset[s_g + t] = L_g + t * block_n = c_g + (s_g + t) * block_n with c_g = L_g - s_g *
  block_n. c_g strictly increases with g (c_{g+1} - c_g = L_{g+1} - T_g > 0, see the docstring of
  vertical_slash), so each slot's value is (running max of c over the group-start slots up to it) +
  slot * block_n. Per slash tile, the slots of the groups that end in it, [S, S + sum n_g), are set to
  -1, each such group writes c_g at its first slot, and a chunked max-scan over the slots turns the
  markers into the offsets (barriers between the three steps: different threads touch the same slots).
* Columns, in tiles of COL_TILE sorted verticals: drop repeats, values outside [0, num_kv) and (causal)
  values > B - 1; a binary search over the block's written block_offset (ascending) finds the last
  dense block starting <= c, and c is dropped when it lies inside it. The kept ones are compacted with
  a cumsum.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qwen1m.sparse_index import BatchedVSIndex, VerticalSlashIndex, check_index_args
from qwen1m.transfer import host_to_device

SLASH_TILE, SLOT_TILE, COL_TILE = 256, 256, 256  # elements per vector step (GPU defaults)
ROWS = 1  # (head, query block) pairs per program on the GPU (not tuned)
_INTERPRET_ROWS = 16  # under TRITON_INTERPRET=1
_NUM_WARPS = 4  # not tuned


@triton.jit
def _max_fn(a, b):
    return tl.maximum(a, b)


# widths and counts change with every step: never specialised on (one compiled kernel for all steps)
@triton.jit(do_not_specialize=["ns", "nv", "num_blocks", "num_rows", "search_steps", "stride_dp", "stride_dh",
                               "stride_cp", "stride_ch", "stride_bcp", "stride_bch", "stride_bop", "stride_boh",
                               "stride_bom", "stride_ccp", "stride_cch", "stride_cip", "stride_cih", "stride_cim"])
def _vs_index_kernel(
    d_ptr, c_ptr, prob_ptr,
    block_count_ptr, block_offset_ptr, column_count_ptr, column_index_ptr,
    ns, nv, num_heads, num_blocks, num_rows, search_steps,
    stride_dp, stride_dh, stride_cp, stride_ch,
    stride_bcp, stride_bch, stride_bcm, stride_bop, stride_boh, stride_bom,
    stride_ccp, stride_cch, stride_ccm, stride_cip, stride_cih, stride_cim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
    SLASH_TILE: tl.constexpr, SLOT_TILE: tl.constexpr, COL_TILE: tl.constexpr, SCAN_2D: tl.constexpr,
):
    # the program's (problem, head, query block) triples, one per row, flattened problem- then head-major;
    # num_blocks is the widest problem's block count: rows past a problem's own count are idle.
    # Per problem (``prob_ptr``, int32 [P, 3]): num_q, num_kv, causal. Sizes are read, never
    # specialised on, so new region lengths do not compile new kernels.
    flat = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    flat = tl.where(flat < num_rows, flat, 0)
    problem = (flat // (num_blocks * num_heads)).to(tl.int64)
    head = ((flat // num_blocks) % num_heads).to(tl.int64)
    pid_m = flat % num_blocks
    num_q = tl.load(prob_ptr + problem * 3)
    num_kv = tl.load(prob_ptr + problem * 3 + 1)
    causal = tl.load(prob_ptr + problem * 3 + 2) != 0
    row_ok = (tl.program_id(0) * ROWS + tl.arange(0, ROWS) < num_rows) & (pid_m * BLOCK_M < num_q)
    offset = num_kv - num_q
    start = pid_m * BLOCK_M
    A = (start + offset)[:, None]  # [ROWS, 1]
    B = (tl.minimum(start + BLOCK_M, num_q) + offset)[:, None]
    num_kv_c = num_kv[:, None]
    # causal: the block's last visible key + 1, and later columns are invisible to the whole block
    lim = tl.where(causal[:, None], tl.minimum(tl.maximum(B, 0), num_kv_c), num_kv_c)
    col_hi = tl.where(causal[:, None], tl.minimum(B, num_kv_c), num_kv_c) - 1
    d_lo = tl.where(causal, 0, 1 - num_q)[:, None]

    d_rows = d_ptr + problem[:, None] * stride_dp + head[:, None] * stride_dh
    bo_rows = (block_offset_ptr + problem[:, None] * stride_bop + head[:, None] * stride_boh
               + pid_m.to(tl.int64)[:, None] * stride_bom)
    offs_s = tl.arange(0, SLASH_TILE)
    offs_p = tl.arange(0, SLOT_TILE)

    n_out = tl.zeros([ROWS], dtype=tl.int32)  # dense blocks written so far
    group_lo = tl.full([ROWS], -1, dtype=tl.int32)  # start of the group still open after the last tile
    for t0 in range(0, ns, SLASH_TILE):
        k = (t0 + offs_s)[None, :]  # [1, SLASH_TILE]
        d = tl.load(d_rows + k, mask=row_ok[:, None] & (k < ns), other=0)  # [ROWS, SLASH_TILE]
        d_prev = tl.load(d_rows + k - 1, mask=row_ok[:, None] & (k >= 1) & (k <= ns), other=0)
        d_next = tl.load(d_rows + k + 1, mask=row_ok[:, None] & (k + 1 < ns), other=0)
        # key intervals [lo, hi) of entries k, k - 1, k + 1 ([ROWS, SLASH_TILE]; written out, since
        # helper calls are slow when interpreted); ok: a valid offset with a non-empty interval
        lo = tl.maximum(A - d, 0)
        hi = tl.minimum(B - d, lim)
        ok = row_ok[:, None] & (k < ns) & (d >= d_lo) & (d < num_kv_c) & (lo < hi)
        hi_p = tl.minimum(B - d_prev, lim)
        ok_p = (k >= 1) & (k <= ns) & (d_prev >= d_lo) & (d_prev < num_kv_c) & (tl.maximum(A - d_prev, 0) < hi_p)
        lo_n = tl.maximum(A - d_next, 0)
        ok_n = (k + 1 < ns) & (d_next >= d_lo) & (d_next < num_kv_c) & (lo_n < tl.minimum(B - d_next, lim))
        is_start = ok & ((ok_p == 0) | (lo - hi_p >= BLOCK_N))
        is_end = ok & ((ok_n == 0) | (lo_n - hi >= BLOCK_N))
        start_lo = tl.where(is_start, lo, -1)
        # L_g forward filled: a running max, as group starts increase
        if SCAN_2D:  # tl.associative_scan is a Python loop per element when interpreted
            before = offs_s[None, :] <= offs_s[:, None]
            g_lo = tl.max(tl.where(before[None, :, :], start_lo[:, None, :], -1), 2)
        else:
            g_lo = tl.associative_scan(start_lo, 1, _max_fn)
        g_lo = tl.maximum(g_lo, group_lo[:, None])
        n_blk = tl.where(is_end, (hi - g_lo + BLOCK_N - 1) // BLOCK_N, 0)  # at the group's last entry
        slot = n_out[:, None] + tl.cumsum(n_blk, 1) - n_blk  # the group's first output slot
        n_tile = tl.sum(n_blk, 1)
        group_lo = tl.maximum(group_lo, tl.max(start_lo, 1))
        most = tl.max(n_tile, 0)
        if most > 0:
            # slots [n_out, stop) of each row: -1, then c_g at each group's first slot, then running max
            stop = (n_out + n_tile)[:, None]
            for p0 in range(0, most, SLOT_TILE):
                p = n_out[:, None] + p0 + offs_p[None, :]
                tl.store(bo_rows + p, tl.full([ROWS, SLOT_TILE], -1, dtype=tl.int32), mask=p < stop)
            tl.debug_barrier()
            tl.store(bo_rows + slot, g_lo - slot * BLOCK_N, mask=is_end)
            tl.debug_barrier()
            run = tl.full([ROWS], -1, dtype=tl.int32)
            for p0 in range(0, most, SLOT_TILE):
                p = n_out[:, None] + p0 + offs_p[None, :]
                in_range = p < stop
                c = tl.load(bo_rows + p, mask=in_range, other=-1)
                if SCAN_2D:
                    before = offs_p[None, :] <= offs_p[:, None]
                    c = tl.max(tl.where(before[None, :, :], c[:, None, :], -1), 2)
                else:
                    c = tl.associative_scan(c, 1, _max_fn)
                c = tl.maximum(c, run[:, None])
                tl.store(bo_rows + p, c + p * BLOCK_N, mask=in_range)
                run = tl.max(c, 1)
            n_out = n_out + n_tile
    tl.store(block_count_ptr + problem * stride_bcp + head * stride_bch + pid_m * stride_bcm, n_out, mask=row_ok)
    tl.debug_barrier()  # the binary search below reads block offsets that other threads wrote

    c_rows = c_ptr + problem[:, None] * stride_cp + head[:, None] * stride_ch
    ci_rows = (column_index_ptr + problem[:, None] * stride_cip + head[:, None] * stride_cih
               + pid_m.to(tl.int64)[:, None] * stride_cim)
    offs_c = tl.arange(0, COL_TILE)
    n_cols = tl.zeros([ROWS], dtype=tl.int32)
    for t0 in range(0, nv, COL_TILE):
        k = (t0 + offs_c)[None, :]  # [1, COL_TILE]
        col = tl.load(c_rows + k, mask=row_ok[:, None] & (k < nv), other=-1)  # [ROWS, COL_TILE]
        col_prev = tl.load(c_rows + k - 1, mask=row_ok[:, None] & (k >= 1) & (k <= nv), other=-1)
        keep = (row_ok[:, None] & (k < nv) & (col >= 0) & (col <= col_hi)
                & ((k == 0) | (col != col_prev)))  # [ROWS, COL_TILE]
        # pos = number of dense blocks starting at or before col (block_offset is ascending)
        pos = tl.zeros([ROWS, COL_TILE], dtype=tl.int32)
        for s in range(search_steps):
            cand = pos + (1 << (search_steps - 1 - s))
            probe = keep & (cand <= n_out[:, None])
            val = tl.load(bo_rows + cand - 1, mask=probe, other=0)
            pos = tl.where(probe & (val <= col), cand, pos)
        last = tl.load(bo_rows + pos - 1, mask=keep & (pos > 0), other=0)
        keep = keep & ((pos == 0) | (col >= last + BLOCK_N))
        kept = keep.to(tl.int32)
        dst = n_cols[:, None] + tl.cumsum(kept, 1) - kept
        tl.store(ci_rows + dst, col, mask=keep)
        n_cols = n_cols + tl.sum(kept, 1)
    tl.store(column_count_ptr + problem * stride_ccp + head * stride_cch + pid_m * stride_ccm, n_cols,
             mask=row_ok)


def index_widths(nv: int, ns: int, num_q: int, num_kv: int, *, causal: bool, block_m: int,
                 block_n: int) -> tuple[int, int]:
    """Host-known upper bounds on the dense blocks and the columns of any query block (both >= 1).

    Blocks: (a) they are disjoint, block_n apart, and start in [0, num_kv) (every block of group g
    starts below H_g <= num_kv), so at most ceil(num_kv / block_n). (b) At most M distinct slash
    offsets can select keys (M = min(ns, number of valid offsets)). Each interval has length
    hi - lo <= end - start <= bm = min(block_m, num_q), and an interval joins its group when it starts
    less than block_n past the previous end (ends are non-decreasing), so a group of m distinct offsets
    spans H - L <= (m - 1)(bm + block_n - 1) + bm = m K - (block_n - 1), K = bm + block_n - 1, and has
    n = ceil((H - L) / block_n) <= floor(m K / block_n) blocks; summed over the groups (floors are
    superadditive): <= floor(M K / block_n).
    Columns: the distinct verticals in [0, num_kv): <= min(nv, num_kv).
    """
    d_lo = 0 if causal else 1 - num_q
    distinct = min(ns, max(0, num_kv - d_lo))
    bm = max(1, min(block_m, num_q))
    max_blocks = min(-(-num_kv // block_n), distinct * (bm + block_n - 1) // block_n)
    return max(1, max_blocks), max(1, min(nv, num_kv))


def _check_args(v_idx, s_idx, num_q, num_kv, block_m, block_n):
    check_index_args("build_vertical_slash_index_triton", v_idx, s_idx, num_q, num_kv, block_m, block_n)
    if num_q + num_kv + 2 * (block_m + block_n) >= 1 << 31:
        raise ValueError(f"build_vertical_slash_index_triton computes in int32: num_q {num_q} + num_kv "
                         f"{num_kv} is too large.")


def build_vertical_slash_index_triton(
    v_idx: torch.Tensor,
    s_idx: torch.Tensor,
    num_q: int,
    num_kv: int,
    *,
    causal: bool,
    block_m: int,
    block_n: int,
) -> VerticalSlashIndex:
    """``build_vertical_slash_index`` as two small sorts and one Triton launch, without host syncs.

    Equal counts and valid entries; padding past the counts is undefined and the widths are the bounds
    of ``index_widths``. v_idx / s_idx on the device the kernel runs on (CUDA, or CPU under
    TRITON_INTERPRET=1).
    """
    return _build(v_idx, s_idx, num_q, num_kv, causal=causal, block_m=block_m, block_n=block_n)


def build_vertical_slash_index_batched(
    v_idx: torch.Tensor,
    s_idx: torch.Tensor,
    problems: list[tuple[int, int, bool]],
    *,
    block_m: int,
    block_n: int,
    sizes: torch.Tensor | None = None,
) -> BatchedVSIndex:
    """The indices of P problems (e.g. every DCA region of every piece of a prefill step) in one launch.

    v_idx: [P, num_heads, nv], s_idx: [P, num_heads, ns] (each problem's own coordinates, -1 padded);
    problems: (num_q, num_kv, causal) per problem, host ints; sizes: the same as a device int64 [P, 3]
    tensor if the caller has one (else copied here, asynchronously). Problem p's index equals
    ``build_vertical_slash_index_triton(v_idx[p], s_idx[p], *problems[p])`` (counts and valid entries);
    widths are the maxima of ``index_widths`` over the problems.
    """
    return _build_batched(v_idx, s_idx, problems, block_m=block_m, block_n=block_n, sizes=sizes)


def _build(v_idx, s_idx, num_q, num_kv, *, causal, block_m, block_n, tiles=(SLASH_TILE, SLOT_TILE, COL_TILE),
           rows: int | None = None, scan_2d: bool | None = None) -> VerticalSlashIndex:
    """The one-problem builder with its launch parameters exposed (tests: small tiles exercise the
    carries between tiles). Defaults: ROWS query blocks per program and tl.associative_scan on the GPU;
    interpreted, 16 rows and the [SLASH_TILE, SLASH_TILE] masked max for the running max (cheaper there)."""
    _check_args(v_idx, s_idx, num_q, num_kv, block_m, block_n)
    batched = _build_batched(v_idx[None], s_idx[None].to(v_idx.device), [(num_q, num_kv, causal)],
                             block_m=block_m, block_n=block_n, tiles=tiles, rows=rows, scan_2d=scan_2d)
    return batched.problem(0)


def _build_batched(v_idx, s_idx, problems, *, block_m, block_n, sizes=None,
                   tiles=(SLASH_TILE, SLOT_TILE, COL_TILE), rows=None, scan_2d=None) -> BatchedVSIndex:
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    rows = rows or (_INTERPRET_ROWS if interpret else ROWS)
    scan_2d = interpret if scan_2d is None else scan_2d
    for num_q, num_kv, _ in problems:
        _check_args(v_idx[0], s_idx[0], num_q, num_kv, block_m, block_n)
    device = v_idx.device
    num_problems, num_heads, nv = v_idx.shape
    ns = s_idx.shape[2]
    if sizes is None:
        sizes = host_to_device(torch.tensor([[q, kv, int(c)] for q, kv, c in problems], dtype=torch.int64), device)
    num_q_t, num_kv_t, causal_t = (sizes[:, i, None, None] for i in range(3))
    d_lo = torch.where(causal_t != 0, 0, 1 - num_q_t)
    # clamping keeps invalid values invalid and the order intact; int32 from here on
    d = torch.clamp(s_idx, d_lo - 1, num_kv_t).to(torch.int32).sort(dim=-1, descending=True).values
    cols = torch.minimum(v_idx.clamp(min=-1), num_kv_t).to(torch.int32).sort(dim=-1).values
    widths = [index_widths(nv, ns, q, kv, causal=c, block_m=block_m, block_n=block_n) for q, kv, c in problems]
    max_blocks = max((w[0] for w in widths), default=1)
    max_cols = max((w[1] for w in widths), default=1)
    num_blocks = max((-(-q // block_m) for q, _, _ in problems), default=0)
    shape = (num_problems, num_heads, num_blocks)
    block_count = torch.empty(shape, dtype=torch.int32, device=device)
    column_count = torch.empty(shape, dtype=torch.int32, device=device)
    block_offset = torch.empty(*shape, max_blocks, dtype=torch.int32, device=device)
    column_index = torch.empty(*shape, max_cols, dtype=torch.int32, device=device)
    num_rows = num_problems * num_heads * num_blocks
    if num_rows:
        slash_tile, slot_tile, col_tile = tiles
        # no empty (null) pointers at the launch: a dummy column that the kernel never reads (ns / nv = 0)
        d = d if ns else torch.zeros(num_problems, num_heads, 1, dtype=torch.int32, device=device)
        cols = cols if nv else torch.zeros(num_problems, num_heads, 1, dtype=torch.int32, device=device)
        prob = sizes.to(torch.int32).contiguous()
        # problems shorter than the widest leave their last rows unwritten: counts 0 there
        if any(-(-q // block_m) < num_blocks for q, _, _ in problems):
            block_count.zero_()
            column_count.zero_()
        _vs_index_kernel[(triton.cdiv(num_rows, rows),)](
            d, cols, prob, block_count, block_offset, column_count, column_index,
            ns, nv, num_heads, num_blocks, num_rows, max_blocks.bit_length(),
            d.stride(0), d.stride(1), cols.stride(0), cols.stride(1),
            block_count.stride(0), block_count.stride(1), block_count.stride(2),
            block_offset.stride(0), block_offset.stride(1), block_offset.stride(2),
            column_count.stride(0), column_count.stride(1), column_count.stride(2),
            column_index.stride(0), column_index.stride(1), column_index.stride(2),
            BLOCK_M=block_m, BLOCK_N=block_n, ROWS=rows,
            SLASH_TILE=slash_tile, SLOT_TILE=slot_tile, COL_TILE=col_tile, SCAN_2D=scan_2d,
            num_warps=_NUM_WARPS,
        )
    return BatchedVSIndex(block_count, block_offset, column_count, column_index, problems=list(problems),
                          block_m=block_m, block_n=block_n)


__all__ = ["build_vertical_slash_index_batched", "build_vertical_slash_index_triton",
           "index_widths"]
