"""Triton kernels for ``attention.sparse_estimate.attention_sums`` (vertical and slash sums).

Oracle: ``qwen1m.attention.sparse_estimate.attention_sums`` on CPU (same contract, same arguments).

The last L queries (positions query_end - L ... query_end - 1) attend causally to every key of
[0, query_end); the keys come in disjoint ranges, each scored with its own query copy (DCA). Two
passes read K, nothing of size heads x L x keys is ever written:

The kernels work on every piece of a prefill step at once (``attention_sums_batched_triton``, for
``estimate_vertical_slash_batched``; ``attention_sums_triton`` is the one-piece case). Each pass is ONE
launch over a host-built work table (int32 rows: piece, part slot, first query row, L, first query
position, key begin, key end), copied once from pinned memory; the pieces' query copies are
concatenated into one [rows, H, D] tensor (a piece's rows per kind are one block):

1. LSE pass, items (piece, key range, split of keys), grid (item * num_heads + head, row tile): online
   max / sum-exp of the masked scores of the tile's rows over the split's keys, in base 2. Each program
   writes one partial (max + log2 sum) per row into [P, max splits, H, max L] (-inf where a piece has
   fewer); one ``torch.logsumexp`` gives every piece's lse.
2. Sums pass, items (piece, key range), grid (item * num_heads + head, key tile): the program loads its
   K tile once and loops over the row tiles: p = exp2(s - lse) (masked entries exactly 0); the column
   sums are the vertical sums of the tile's keys (plain stores); the entries are added into
   slash[piece, h, q_pos - key] with ``tl.atomic_add`` on a [BLOCK_M, BLOCK_N] pointer tensor (entries
   of one diagonal inside a tile hit one address; atomics make that exact). The sums are
   [P, H, max query_end], 0 past a piece's own end.

GQA: query head h reads kv head h // (num_heads // num_kv_heads); program axis 0 is the query head,
so the heads sharing a K tile run next to each other and K is read from HBM about once per pass.

``exp_floor`` (attention/reference.py) flushes probabilities below exp(-80) to 0; the sums pass does
the same (one ``tl.where``), so a probability the oracle zeroes is zero here too (the difference
would be below 1.8e-35 per entry anyway). The LSE pass does not flush (an online softmax rescales
against running maxima, so it could not match bit for bit; the effect is < 1e-34 relative).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _scores(q, k_ptr, kv_head, key, key_ok, offs_d, stride_kn, stride_kh, stride_kd, qk_scale,
            DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Scores q [BLOCK_M, HEAD_DIM] x keys ``key`` [BLOCK_N] of kv head ``kv_head``, times qk_scale."""
    k_ptrs = (k_ptr + kv_head * stride_kh + key.to(tl.int64)[None, :] * stride_kn
              + offs_d[:, None] * stride_kd)
    k = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)  # [HEAD_DIM, BLOCK_N]
    if UPCAST_DOT:  # the interpreter's 16-bit tl.dot is wrong; fp32 operands hold the same values
        s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, k, input_precision=DOT_PRECISION)
    return s * qk_scale


def _launch_config(device: torch.device, num_l: int) -> dict[str, int]:
    if device.type != "cuda":  # interpreter: small tiles so tiny tests cross tile edges
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    block_m = min(64, max(16, triton.next_power_of_2(num_l)))
    return dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=4, num_stages=2)


def attention_sums_triton(
    queries: dict[str, torch.Tensor],
    k: torch.Tensor,
    key_ranges: list[tuple[str, int, int]],
    query_end: int,
    *,
    softmax_scale: float,
    config: dict[str, int] | None = None,
    split_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``attention_sums``: vertical, slash [num_heads, query_end] float32; the batched
    kernels with one piece.

    config: BLOCK_M / BLOCK_N / num_warps / num_stages (default per device); split_len: keys per
    LSE-pass program (a multiple of BLOCK_N; default sized for a few programs per SM).
    """
    any_q = next(iter(queries.values()))
    for kind, _, _ in key_ranges:
        if queries[kind].shape != any_q.shape:
            raise ValueError("attention_sums_triton: every query copy must be [L, H, D] in k's dtype")
    vertical, slash = attention_sums_batched_triton([queries], k, [key_ranges], [query_end],
                                                    softmax_scale=softmax_scale, config=config, split_len=split_len)
    return vertical[0], slash[0]


# ---------------------------------------------------------------------------------------------------
# The kernels, batched over the pieces of a prefill step: every (piece, key range) of the step
# in one launch each. A work item is one int32 row of ``ITEM_FIELDS``; the program of flat id i handles
# item i // NUM_HEADS for query head i % NUM_HEADS, so the heads sharing a K tile still run side by side.
ITEM_FIELDS = 7  # piece, part slot (LSE pass), first query row, num_l, q_pos0, key begin, key end


@triton.jit
def _load_item(item_ptr, item):
    fields = item_ptr + item.to(tl.int64) * 7  # 7 == ITEM_FIELDS
    return (tl.load(fields), tl.load(fields + 1), tl.load(fields + 2), tl.load(fields + 3), tl.load(fields + 4),
            tl.load(fields + 5), tl.load(fields + 6))


@triton.jit(do_not_specialize=["stride_pp", "stride_ps", "stride_ph"])
def _lse_batched_kernel(
    q_ptr, k_ptr, item_ptr, part_ptr, qk_scale,
    stride_ql, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kd,
    stride_pp, stride_ps, stride_ph, stride_pl,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """``_lse_kernel`` for item (piece, slot, rows, key split [begin, end)): parts[piece, slot, head, rows]."""
    pid = tl.program_id(0)
    item = pid // NUM_HEADS
    head = pid % NUM_HEADS
    pid_m = tl.program_id(1)
    piece, slot, q_row0, num_l, q_pos0, start, stop = _load_item(item_ptr, item)
    kv_head = head // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_l
    q_pos = q_pos0 + rows
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + (q_row0 + rows).to(tl.int64)[:, None] * stride_ql + head * stride_qh
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    stop = tl.where(pid_m * BLOCK_M < num_l, stop, start)  # a row tile past this piece's rows: no work
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        key = n0 + offs_n
        key_ok = key < stop
        s = _scores(q, k_ptr, kv_head, key, key_ok, offs_d, stride_kn, stride_kh, stride_kd, qk_scale,
                    DOT_PRECISION, UPCAST_DOT)
        visible = key_ok[None, :] & (key[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    part = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
    out = part_ptr + piece.to(tl.int64) * stride_pp + slot * stride_ps + head * stride_ph
    tl.store(out + rows * stride_pl, part, mask=row_ok)


@triton.jit(do_not_specialize=["stride_lp", "stride_vp", "stride_vh", "stride_sp", "stride_sh"])
def _sums_batched_kernel(
    q_ptr, k_ptr, item_ptr, lse_ptr, vert_ptr, slash_ptr, qk_scale,
    stride_ql, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kd,
    stride_lp, stride_lh, stride_ll,
    stride_vp, stride_vh, stride_sp, stride_sh,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """``_sums_kernel`` for item (piece, -, rows, key range [begin, end)); grid axis 1 is the key tile
    (sized for the longest range of the step: a tile past this item's range does nothing)."""
    pid = tl.program_id(0)
    item = pid // NUM_HEADS
    head = pid % NUM_HEADS
    piece, _, q_row0, num_l, q_pos0, key_begin, key_end = _load_item(item_ptr, item)
    tile_begin = key_begin + tl.program_id(1) * BLOCK_N
    num_l = tl.where(tile_begin < key_end, num_l, 0)  # past the range: no rows, nothing stored
    kv_head = head // GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = tl.arange(0, BLOCK_M)
    key = tile_begin + tl.arange(0, BLOCK_N)
    key_ok = key < key_end
    k_ptrs = k_ptr + kv_head * stride_kh + key.to(tl.int64)[None, :] * stride_kn + offs_d[:, None] * stride_kd
    k = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)  # [HEAD_DIM, BLOCK_N], read once for all rows
    if UPCAST_DOT:
        k = k.to(tl.float32)
    col_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    lse_row = lse_ptr + piece.to(tl.int64) * stride_lp + head * stride_lh
    slash_row = slash_ptr + piece.to(tl.int64) * stride_sp + head.to(tl.int64) * stride_sh
    for m0 in range(0, num_l, BLOCK_M):
        rows = m0 + offs_m
        row_ok = rows < num_l
        q_pos = q_pos0 + rows
        q = tl.load(q_ptr + (q_row0 + rows).to(tl.int64)[:, None] * stride_ql + head * stride_qh
                    + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
        if UPCAST_DOT:
            s = tl.dot(q.to(tl.float32), k, input_precision="ieee")
        else:
            s = tl.dot(q, k, input_precision=DOT_PRECISION)
        lse = tl.load(lse_row + rows * stride_ll, mask=row_ok, other=0.0)
        x = s * qk_scale - lse[:, None]
        dist = q_pos[:, None] - key[None, :]
        valid = row_ok[:, None] & key_ok[None, :] & (dist >= 0) & (x >= -115.41560327111707)
        p = tl.where(valid, tl.math.exp2(x), 0.0)  # (-115.4... = -80 * log2(e): exp_floor's cut)
        col_sum += tl.sum(p, 0)
        tl.atomic_add(slash_row + dist, p, mask=valid, sem="relaxed")
    vert_row = vert_ptr + piece.to(tl.int64) * stride_vp + head.to(tl.int64) * stride_vh
    tl.store(vert_row + key, col_sum, mask=key_ok)


def _work_tables(query_rows, key_ranges, query_ends, split_len: int):
    """Host work tables (int32 rows of ITEM_FIELDS) of the two passes and each piece's number of parts.

    query_rows[p]: kind -> (first row in the flat query tensor, num_l). LSE items are (piece, range,
    split of split_len keys), numbered per piece by ``slot``; sums items are (piece, range), one row per
    range whatever its length (a row per key tile would be 16K Python lists per range at 1M keys).
    """
    lse_items, sums_items, num_parts = [], [], []
    for piece, (rows, ranges, query_end) in enumerate(zip(query_rows, key_ranges, query_ends)):
        slot = 0
        for kind, a, b in ranges:
            q_row0, num_l = rows[kind]
            head = [q_row0, num_l, query_end - num_l]
            for s in range(a, b, split_len):
                lse_items.append([piece, slot, *head, s, min(s + split_len, b)])
                slot += 1
            sums_items.append([piece, 0, *head, a, b])
        num_parts.append(slot)
    return lse_items, sums_items, num_parts


def attention_sums_batched_triton(
    queries: list[dict[str, torch.Tensor]],
    k: torch.Tensor,
    key_ranges: list[list[tuple[str, int, int]]],
    query_ends: list[int],
    *,
    softmax_scale: float,
    config: dict[str, int] | None = None,
    split_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_sums_triton`` for P pieces in two launches (one per pass), without host syncs.

    Per piece p: queries[p] (kind -> [L_p, H, D], the piece's last L_p queries; L_p may differ between
    pieces but is one per piece), key_ranges[p] and query_ends[p] as in ``attention_sums``.
    Returns vertical, slash [P, num_heads, max(query_ends)] float32; entries at or past a piece's own
    query_end are 0 (no key or distance there).
    """
    from qwen1m.transfer import host_to_device

    any_q = next(iter(queries[0].values()))
    _, num_heads, head_dim = any_q.shape
    num_kv_heads = k.shape[1]
    if num_heads % num_kv_heads or k.shape[2] != head_dim:
        raise ValueError(f"attention_sums_batched_triton: q {tuple(any_q.shape)} does not match k {tuple(k.shape)}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"attention_sums_batched_triton supports head_dim a power of two >= 16, got {head_dim}")
    device = k.device
    num_pieces, width = len(queries), max(query_ends)
    # the used query copies, one flat [rows, H, D] tensor (one copy); each (piece, kind) a block of rows
    blocks, query_rows, first = [], [], 0
    for qs, ranges in zip(queries, key_ranges):
        rows = {}
        used = list(dict.fromkeys(kind for kind, a, b in ranges if b > a))
        for kind in used:
            q = qs[kind]
            if q.shape[1:] != any_q.shape[1:] or q.dtype != k.dtype or q.shape[0] != qs[used[0]].shape[0]:
                raise ValueError("attention_sums_batched_triton: a piece's query copies must be [L_p, H, D], k's dtype")
            rows[kind] = (first, q.shape[0])
            blocks.append(q)
            first += q.shape[0]
        query_rows.append(rows)
    vertical = torch.zeros(num_pieces, num_heads, width, dtype=torch.float32, device=device)
    slash = torch.zeros(num_pieces, num_heads, width, dtype=torch.float32, device=device)
    if not blocks:
        return vertical, slash
    q_flat = torch.cat(blocks)
    max_l = max(num_l for rows in query_rows for _, num_l in rows.values())
    cfg = config or _launch_config(device, max_l)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    row_tiles = triton.cdiv(max_l, bm)
    if split_len is None:  # ~4 programs per SM over all pieces, heads and ranges, at least 16 key tiles each
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        target = 4 * sms // max(1, num_pieces * num_heads * row_tiles)
        split_len = max(16 * bn, triton.cdiv(max(1, width // max(1, target)), bn) * bn)
    if split_len % bn:
        raise ValueError(f"split_len {split_len} must be a multiple of BLOCK_N {bn}")
    ranges = [[(kind, a, b) for kind, a, b in rs if b > a] for rs in key_ranges]
    max_tiles = max(triton.cdiv(b - a, bn) for rs in ranges for _, a, b in rs)
    if max_tiles > 65535:  # CUDA's limit on grid axis 1
        raise ValueError(f"attention_sums_batched_triton: a key range longer than {65535 * bn} keys")
    lse_items, sums_items, num_parts = _work_tables(query_rows, ranges, query_ends, split_len)
    table = host_to_device(torch.tensor(lse_items + sums_items, dtype=torch.int32), device)  # one copy
    lse_table, sums_table = table[:len(lse_items)], table[len(lse_items):]
    dot = dict(
        DOT_PRECISION="ieee" if k.dtype == torch.float32 else "tf32",
        UPCAST_DOT=os.environ.get("TRITON_INTERPRET", "0") == "1",
    )
    common = dict(NUM_HEADS=num_heads, GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn,
                  **dot, **launch)
    qk_scale = softmax_scale * _LOG2E
    # slots a piece has fewer splits than the widest piece, and rows past its L: -inf (weight 0)
    parts = torch.full((num_pieces, max(num_parts), num_heads, max_l), float("-inf"), dtype=torch.float32,
                       device=device)
    _lse_batched_kernel[(len(lse_items) * num_heads, row_tiles)](
        q_flat, k, lse_table, parts, qk_scale,
        q_flat.stride(0), q_flat.stride(1), q_flat.stride(2), k.stride(0), k.stride(1), k.stride(2),
        parts.stride(0), parts.stride(1), parts.stride(2), parts.stride(3), **common,
    )
    lse = torch.logsumexp(parts * _LN2, dim=1) * _LOG2E  # [P, num_heads, max_l], base 2 like the parts
    _sums_batched_kernel[(len(sums_items) * num_heads, max_tiles)](
        q_flat, k, sums_table, lse, vertical, slash, qk_scale,
        q_flat.stride(0), q_flat.stride(1), q_flat.stride(2), k.stride(0), k.stride(1), k.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        vertical.stride(0), vertical.stride(1), slash.stride(0), slash.stride(1), **common,
    )
    return vertical, slash
