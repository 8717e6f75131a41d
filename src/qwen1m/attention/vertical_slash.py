"""Vertical-slash sparse attention (MInference, design §3.3): the block index and the pure-PyTorch oracles.

Coordinates. Queries ``i`` in [0, num_q), keys ``j`` in [0, num_kv), ``offset = num_kv - num_q``: the
bottom-right alignment of ``reference.attend`` (causal query i sees keys j <= i + offset).

* A *vertical* is a key column ``c``: every query reads key c (causal: when c <= i + offset).
* A *slash* with offset ``d`` is the diagonal ``j = i + offset - d``: d = 0 is the causal main diagonal
  (each query's own key when num_q == num_kv), d > 0 lies d keys further back. The same formula is
  used when ``causal=False`` (DCA succ/inter parts), where d < 0 (keys after the main diagonal) is
  meaningful too. A slash selects some key iff d is in [1 - num_q, num_kv - 1] (causal: [0, num_kv - 1]);
  other offsets select nothing and are dropped. (vLLM's non-causal offsets d' are ``d' = d + num_q``.)

Covered key set, per head and query block b = rows [start_b, end_b), end_b = min(start_b + block_m, num_q):

  1. slash interval of each distinct d: ``I_d = [start_b + offset - d, end_b + offset - d)`` clipped to
     [0, lim_b), lim_b = num_kv, or min(num_kv, end_b + offset) when causal (the block's last visible key
     + 1): every key of slash d for *some* row of the block;
  2. groups: the non-empty I_d sorted by start are chained while a start is less than ``block_n`` past
     the largest end so far (overlapping, adjacent, or a gap < block_n); group g spans [L_g, H_g);
  3. dense blocks: group g is cut into ceil((H_g - L_g) / block_n) blocks of block_n keys starting at
     L_g, L_g + block_n, ... (``block_offset``); they cover [L_g, T_g), T_g = L_g + block_n * ceil(...)
     < H_g + block_n <= L_{g+1}, so blocks never overlap and no key is counted twice;
  4. columns (``column_index``): the distinct verticals in [0, num_kv), not inside a dense block, and
     when causal <= end_b - 1 + offset (later ones are invisible to the whole block).

  covered(i) = (dense keys ∪ columns) ∩ [0, num_kv) ∩ ({j <= i + offset} when causal).

So besides its verticals and its own slash keys, a row reads exactly: the slash keys of the other rows
of its block (a band of block_m keys around each of its slashes), gaps shorter than block_n between
slash intervals, and the tail of each group up to a multiple of block_n (< block_n keys), all under its
causal mask. ``vertical_slash_mask`` builds exactly this set from an index, so the Triton kernel equals
masked dense attention (``sparse_attend_reference``) exactly.

The builder is vectorised over heads, query blocks and slashes (a 1M-token prefill chunk has 512 query
blocks x 28 heads x ~6K slashes); heads are processed in groups to bound the temporary memory.
"""

from __future__ import annotations

import torch

from qwen1m.sparse_index import BatchedVSIndex, VerticalSlashIndex, check_index_args

# Elements per temporary [heads, query blocks, slashes] tensor: 2^24 int64 = 128 MiB each.
_MAX_ELEMENTS = 1 << 24
# Sentinel for dropped entries; far above any key index, small enough that differences do not overflow.
_BIG = 1 << 40


def _sorted_distinct(x: torch.Tensor, lo: int, hi: int, descending: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: values in [lo, hi], sorted, duplicates and out-of-range values marked invalid."""
    ok = (x >= lo) & (x <= hi)
    fill = lo - 1 if descending else _BIG  # dropped values sort last
    x = torch.where(ok, x, torch.full_like(x, fill)).sort(dim=-1, descending=descending).values
    ok = (x >= lo) & (x <= hi)
    ok[..., 1:] &= x[..., 1:] != x[..., :-1]
    return x, ok


def _scatter_compact(values: torch.Tensor, keep: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, n] -> [rows, width]: the kept values of each row, in order, zero padded."""
    out = torch.zeros(values.shape[0], width, dtype=torch.int32, device=values.device)
    pos = keep.long().cumsum(-1) - 1
    rows = torch.arange(values.shape[0], device=values.device)[:, None].expand_as(values)
    out[rows[keep], pos[keep]] = values[keep].to(torch.int32)
    return out


def _build_heads(d, d_ok, cols, c_ok, starts, ends, num_kv, offset, causal, block_n):
    """Index of a group of heads. d, d_ok: [h, ns]; cols, c_ok: [h, nv]; starts, ends: [nb]."""
    num_heads, num_blocks = d.shape[0], starts.shape[0]
    rows = num_heads * num_blocks
    lim = (ends + offset).clamp(0, num_kv) if causal else torch.full_like(ends, num_kv)
    # 1. slash intervals [lo, hi) per (head, block, slash), dropped ones moved to the end
    lo = ((starts + offset)[None, :, None] - d[:, None, :]).clamp(min=0)
    hi = torch.minimum((ends + offset)[None, :, None] - d[:, None, :], lim[None, :, None])
    ok = d_ok[:, None, :] & (lo < hi)
    lo = torch.where(ok, lo, _BIG).reshape(rows, d.shape[1])
    hi = torch.where(ok, hi, _BIG).reshape(rows, d.shape[1])
    # d descending = lo ascending already; the stable sort only moves dropped entries last
    lo, order = lo.sort(dim=-1, stable=True)
    hi = hi.gather(-1, order)
    ok = lo < _BIG
    # 2. groups: a new group starts where the gap to the largest end so far reaches block_n
    hi_max = hi.cummax(-1).values
    prev_hi = torch.cat([torch.full_like(hi_max[:, :1], -_BIG), hi_max[:, :-1]], dim=-1)
    new_group = ok & (lo - prev_hi >= block_n)
    group_lo = torch.where(new_group, lo, -_BIG).cummax(-1).values  # L_g, forward filled
    next_starts = torch.cat([new_group[:, 1:] | ~ok[:, 1:], torch.ones_like(ok[:, :1])], dim=-1)
    is_end = ok & next_starts
    # 3. dense blocks: ceil((H_g - L_g) / block_n) per group, counted at the group's last interval
    n_blocks = torch.where(is_end, (hi_max - group_lo + block_n - 1) // block_n, 0)
    block_count = n_blocks.sum(-1)
    width = max(1, int(block_count.max())) if rows else 1
    block_offset = torch.zeros(rows, width, dtype=torch.int32, device=d.device)
    end_rows, end_cols = is_end.nonzero(as_tuple=True)
    per_group = n_blocks[end_rows, end_cols]
    first_out = (n_blocks.cumsum(-1) - n_blocks)[end_rows, end_cols]  # output slot of the group's block 0
    total = int(per_group.sum())
    if total:
        grp = torch.repeat_interleave(torch.arange(per_group.numel(), device=d.device), per_group,
                                      output_size=total)
        t = torch.arange(total, device=d.device) - (per_group.cumsum(0) - per_group)[grp]
        block_offset[end_rows[grp], first_out[grp] + t] = (
            group_lo[end_rows[grp], end_cols[grp]] + t * block_n).to(torch.int32)
    # 4. columns not inside a dense block; the block's group is the one of the last interval starting <= c
    nv = cols.shape[-1]
    cols_b = cols[:, None, :].expand(num_heads, num_blocks, nv).reshape(rows, nv)
    keep = c_ok[:, None, :].expand(num_heads, num_blocks, nv).reshape(rows, nv)
    if causal:
        keep = keep & (cols_b <= (ends - 1 + offset).repeat(num_heads)[:, None])
    if lo.shape[-1] and cols_b.shape[-1]:
        group_end = torch.where(is_end, group_lo + n_blocks * block_n, _BIG)  # T_g at the group's end
        group_end = group_end.flip(-1).cummin(-1).values.flip(-1)  # T_g, backward filled
        k = torch.searchsorted(lo, cols_b.contiguous(), right=True) - 1
        inside = (k >= 0) & (cols_b < group_end.gather(-1, k.clamp(min=0)))
        keep = keep & ~inside
    column_count = keep.sum(-1)
    col_width = max(1, int(column_count.max())) if rows else 1
    column_index = _scatter_compact(cols_b, keep, col_width)
    shape = (num_heads, num_blocks)
    return (block_count.to(torch.int32).reshape(shape), block_offset.reshape(*shape, width),
            column_count.to(torch.int32).reshape(shape), column_index.reshape(*shape, col_width))


def _pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    width = max(p.shape[-1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in parts], dim=0)


def build_vertical_slash_index(
    v_idx: torch.Tensor,
    s_idx: torch.Tensor,
    num_q: int,
    num_kv: int,
    *,
    causal: bool,
    block_m: int,
    block_n: int,
) -> VerticalSlashIndex:
    """Convert per-head vertical columns and slash offsets into dense key blocks + single columns.

    v_idx: [num_heads, nv] int key columns; s_idx: [num_heads, ns] int slash offsets d (key
    j = i + num_kv - num_q - d for query i). Any order; duplicates and values selecting no key are
    dropped; nv or ns may be 0. The covered key set is defined in the module docstring.
    """
    check_index_args("build_vertical_slash_index", v_idx, s_idx, num_q, num_kv, block_m, block_n)
    device = v_idx.device
    num_heads = v_idx.shape[0]
    offset = num_kv - num_q
    num_blocks = -(-num_q // block_m)
    starts = torch.arange(num_blocks, device=device, dtype=torch.int64) * block_m
    ends = (starts + block_m).clamp(max=num_q)
    d, d_ok = _sorted_distinct(s_idx.to(device, torch.int64), 0 if causal else 1 - num_q, num_kv - 1,
                               descending=True)
    cols, c_ok = _sorted_distinct(v_idx.to(torch.int64), 0, num_kv - 1, descending=False)
    per_head = max(1, num_blocks * max(d.shape[1], cols.shape[1], 1))
    step = max(1, _MAX_ELEMENTS // per_head)
    parts = [
        _build_heads(d[h : h + step], d_ok[h : h + step], cols[h : h + step], c_ok[h : h + step],
                     starts, ends, num_kv, offset, causal, block_n)
        for h in range(0, num_heads, step)
    ]
    if parts:
        block_count = torch.cat([p[0] for p in parts])
        block_offset = _pad_cat([p[1] for p in parts])
        column_count = torch.cat([p[2] for p in parts])
        column_index = _pad_cat([p[3] for p in parts])
    else:
        block_count = column_count = torch.zeros(0, num_blocks, dtype=torch.int32, device=device)
        block_offset = column_index = torch.zeros(0, num_blocks, 1, dtype=torch.int32, device=device)
    return VerticalSlashIndex(block_count, block_offset, column_count, column_index,
                              num_q=num_q, num_kv=num_kv, causal=causal, block_m=block_m, block_n=block_n)


def vertical_slash_mask(index: VerticalSlashIndex, num_q: int, num_kv: int, causal: bool) -> torch.Tensor:
    """[num_heads, num_q, num_kv] bool: the keys each query reads under ``index`` (small sizes only)."""
    num_heads, num_blocks = index.block_count.shape
    device = index.block_count.device
    # dense blocks as +1 at the start and -1 past the end (blocks never overlap), then a running sum;
    # padding slots are sent past num_kv, where the result is cut off
    size = num_kv + index.block_n + 1
    edges = torch.zeros(num_heads, num_blocks, size, dtype=torch.int32, device=device)
    used = torch.arange(index.block_offset.shape[-1], device=device) < index.block_count[..., None]
    start = torch.where(used, index.block_offset.long().clamp(0, num_kv), num_kv)
    ones = torch.ones_like(start, dtype=torch.int32)
    edges.scatter_add_(-1, start, ones)
    edges.scatter_add_(-1, start + index.block_n, -ones)
    used = torch.arange(index.column_index.shape[-1], device=device) < index.column_count[..., None]
    cols = torch.where(used, index.column_index.long().clamp(0, num_kv), num_kv)
    hits = torch.zeros(num_heads, num_blocks, size, dtype=torch.int32, device=device)
    hits.scatter_add_(-1, cols, torch.ones_like(cols, dtype=torch.int32))
    block_keys = ((edges.cumsum(-1) > 0) | (hits > 0))[..., :num_kv]  # [num_heads, num_blocks, num_kv]
    mask = block_keys.repeat_interleave(index.block_m, dim=1)[:, :num_q]
    if causal:
        q_idx = torch.arange(num_q, device=device)[:, None] + num_kv - num_q
        mask &= torch.arange(num_kv, device=device)[None, :] <= q_idx
    return mask


def sparse_attend_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: VerticalSlashIndex,
    *,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked dense attention over ``vertical_slash_mask``: the oracle of the Triton kernel.

    q: [num_q, num_heads, head_dim]; k, v: [num_kv, num_kv_heads, head_dim] (GQA as in ``attend``).
    Returns out [num_q, num_heads, head_dim] in q's dtype and lse [num_heads, num_q] (float32, float64
    for float64 q); a row that reads no key gets out = 0, lse = -inf.
    """
    num_q, num_heads, head_dim = q.shape
    num_kv, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = vertical_slash_mask(index, num_q, num_kv, causal)  # [num_heads, num_q, num_kv]
    kf = k.to(acc_dtype).repeat_interleave(group, dim=1)  # oracle only: small sizes, K/V copy is fine
    vf = v.to(acc_dtype).repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.to(acc_dtype), kf) * softmax_scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf for rows without keys
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = torch.einsum("hqk,khd->qhd", torch.exp(scores - safe[..., None]), vf)
    return out.to(q.dtype), lse


__all__ = ["BatchedVSIndex", "VerticalSlashIndex", "build_vertical_slash_index", "sparse_attend_reference",
           "vertical_slash_mask"]
