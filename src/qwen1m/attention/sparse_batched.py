"""Sparse prefill of one step in a few launches per layer and no host synchronisation (the GPU path).

``sparse_prefill.sparse_prefill_attention`` states the method per piece and per DCA region: estimate,
re-base the picks, build an index, attend, merge; with a host decision (``index_density``, a sync)
between index and attention. Run that way a 512K prefill of the bundled model made 275,000 launches
and 2,370 stream syncs for 4.6 s of GPU work (7.3 s wall). This module computes the same thing for
every (piece, region) *problem* of the step at once:

    1. estimate all pieces together (``estimate_vertical_slash_batched``: on CUDA two kernel launches
       and one top-k per direction for the whole step, no sync), picks v [P pieces, H, nv] and
       s [P, H, ns], -1 padded;
    2. re-base for every problem in one set of tensor ops (``_rebase``);
    3. one index launch for all problems (``build_vertical_slash_index_batched``);
    4. the dense decision on the device: a problem whose index lists more than
       ``cfg.dense_above_density`` of its visible pairs gets dense = 1 in the problem table;
    5. one sparse attention launch for the problems with dense = 0 (``vertical_slash_attention_batched``)
       and two dense launches (causal, non-causal) for those with dense = 1 (``flash_attn_problems``:
       every visible key, exact, at the dense kernel's rate and with its packed GQA; the programs of the
       other problems return at once), each writing its rows of a per-region output slot (intra 0,
       succ 1, inter 2), and one LSE merge of the slots. Under attention_dtype="fp8" both run in e4m3
       on the FP8 cache's bytes (or a quantised copy) with the queries quantised once per step.

Problem tables (sizes, piece of each problem, fallback columns) are built on the host from shapes
and copied once, asynchronously, from pinned memory. Density telemetry stays on the device
(``stats`` receives 0-dim tensors) until someone reads it.
"""

from __future__ import annotations

import torch

from qwen1m.attention.dca import dca_pieces
from qwen1m.attention.fp8 import Fp8Tensor, quantize
from qwen1m.attention.kernel_choice import KernelChoice
from qwen1m.attention.sparse_estimate import estimate_vertical_slash_batched
from qwen1m.cache import sparse_workspace
from qwen1m.sparse_config import SparseConfig

_BIG = 1 << 40  # re-based slash padding: far outside every region
_SLOTS = ("intra", "succ", "inter")  # output slot of each region kind


def _problems(begin: int, total: int, chunk_len: int | None):
    """Host plan: the pieces, and per problem (piece, query kind, selection kind, key range, causal)."""
    s = chunk_len if chunk_len is not None else total
    pieces, problems = [], []
    for i, (piece_begin, piece_end, chunk_begin) in enumerate(dca_pieces(begin, total, s)):
        pieces.append((piece_begin, piece_end))
        problems.append((i, "intra", "intra", chunk_begin, piece_end, True))
        if chunk_len is not None and chunk_begin >= s:
            problems.append((i, "succ", "succ_critical", chunk_begin - s, chunk_begin, False))
        if chunk_len is not None and chunk_begin >= 2 * s:
            problems.append((i, "inter", "inter_critical", 0, chunk_begin - s, False))
    return pieces, problems


def batched_supported(q: torch.Tensor, k: torch.Tensor, cfg: SparseConfig) -> bool:
    """Whether the kernels of this path take these shapes (else ``sparse_prefill``'s per-region path)."""
    head_dim, block = q.shape[-1], cfg.block_size
    return (16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0 and block >= 16 and block & (block - 1) == 0
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and k.dtype == q.dtype)


def _rebase(v_idx, s_idx, table, spread, num_fallback: int):
    """Step 2 of ``sparse_prefill`` for every problem at once (``_region_index``'s maths).

    v_idx [P, H, nv], s_idx [P, H, ns] (absolute columns, distances, -1 padded); table int64 [N, 7]
    (piece, key begin, key end, piece end, num_q, num_kv, causal); spread [N, num_fallback] the even
    columns of a problem's empty-head fallback. Returns cols [N, H, nv (+ num_fallback)], d [N, H, ns].
    """
    piece, a, b, piece_end, num_q, num_kv, causal = (table[:, i, None, None] for i in range(7))
    v = v_idx[table[:, 0]]  # [N, H, nv]
    s = s_idx[table[:, 0]]
    cols = torch.where((v >= a) & (v < b), v - a, -1)
    d = torch.where(s >= 0, s - (piece_end - b), -_BIG)
    if num_fallback:
        lo = torch.where(causal != 0, 0, 1 - num_q)
        has_slash = ((d >= lo) & (d <= num_kv - 1)).any(-1)
        empty = ~(has_slash | (cols >= 0).any(-1))  # [N, H]
        fallback = torch.where(empty[..., None], spread[:, None, :], -1)
        cols = torch.cat([cols, fallback], dim=-1)
    return cols, d


def _dense_flags(index, sizes, num_heads: int, threshold: float) -> torch.Tensor:
    """[N] int32: 1 where the problem's index lists more than ``threshold`` of its visible pairs
    (``sparse_prefill.index_density``, computed on the device)."""
    bm = index.block_m
    listed = index.block_count.long() * index.block_n + index.column_count.long()  # [N, H, M]
    num_q, num_kv, causal = sizes[:, 0, None], sizes[:, 1, None], sizes[:, 2, None]
    m = torch.arange(listed.shape[2], device=listed.device)[None, :]
    ends = ((m + 1) * bm).minimum(num_q)
    visible = torch.where(causal != 0, (ends + num_kv - num_q).minimum(num_kv), num_kv)
    visible = visible * (m * bm < num_q)  # query blocks past the problem's own: nothing
    got = listed.minimum(visible[:, None, :]).sum((1, 2))
    full = (visible.sum(1) * num_heads).clamp(min=1)
    return (got.double() / full.double() > threshold).int()


def _computed_pairs(index, sizes, dense, full: torch.Tensor) -> torch.Tensor:
    """Query-key pairs the kernel computes (block granularity, ``sparse_prefill._count``), summed."""
    bm = index.block_m
    listed = index.block_count.long() * index.block_n + index.column_count.long()
    m = torch.arange(listed.shape[2], device=listed.device)[None, :]
    rows = (sizes[:, 0, None] - m * bm).clamp(0, bm)  # [N, M]
    computed = (listed * rows[:, None, :]).sum((1, 2)).minimum(full)
    return torch.where(dense != 0, full, computed).sum()


def _index_elements(shapes, widths, num_heads: int, block_m: int) -> int:
    """Elements of block_offset + column_index of these problems indexed together: the tensors are
    [problems, heads, widest query blocks, widest dense blocks / columns] (``_build_batched``)."""
    rows = max(-(-q // block_m) for q, _, _ in shapes)
    return len(shapes) * num_heads * rows * (max(w[0] for w in widths) + max(w[1] for w in widths))


def _groups(shapes, widths, num_heads: int, block_m: int) -> list[tuple[int, int]]:
    """Consecutive problem ranges whose padded index stays under MAX_INDEX_ELEMENTS (a larger problem
    alone is a group). shapes: (num_q, num_kv, causal) per problem; widths: its ``index_widths``."""
    groups, first = [], 0
    for i in range(1, len(shapes)):
        elements = _index_elements(shapes[first:i + 1], widths[first:i + 1], num_heads, block_m)
        if elements > sparse_workspace.MAX_INDEX_ELEMENTS:
            groups.append((first, i))
            first = i
    groups.append((first, len(shapes)))
    return groups


def sparse_prefill_batched(
    queries: dict[str, torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    begin: int,
    chunk_len: int | None,
    softmax_scale: float,
    vertical_sizes: list[int],
    slash_sizes: list[int],
    cfg: SparseConfig,
    merge_fn,
    dense_regions: bool,
    stats: dict | None = None,
    kernels: KernelChoice | None = None,
    decisions: dict | None = None,
    fp8_kv: tuple[Fp8Tensor, Fp8Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sparse_prefill_attention``'s contract, computed for all pieces and regions together.

    dense_regions: whether regions above ``cfg.dense_above_density`` run dense (the caller had an
    ``attend_fn``); here they run through ``flash_attn_problems``, decided on the device.
    stats: receives "computed" (a 0-dim device tensor, added to what is there) and "causal" (int).
    kernels: the backend's kernel choice, for the estimate's Triton sums (None: a fresh one).
    decisions: with dense regions on, receives "dense": int32 [P] on the device, 1 where problem p
    (piece, region) ran dense (``dense_hint`` reads it a step later).
    fp8_kv: attention_dtype="fp8": k and v in e4m3 (the FP8 cache's bytes or a quantised copy); the
    queries are quantised here and both attention kernels run in e4m3. The estimate reads the 16-bit
    k as before, so the picks, indices and dense decisions do not change.
    """
    from qwen1m.kernels.sparse_attn import PROB_FIELDS
    from qwen1m.kernels.vs_index import index_widths
    from qwen1m.transfer import host_to_device

    q_intra = queries["intra"]
    num_q, num_heads, head_dim = q_intra.shape
    device = q_intra.device
    total = begin + num_q
    pieces, problems = _problems(begin, total, chunk_len)

    # 1. estimate, all pieces together (no sync: fixed-size top-k, -1 padded)
    est_queries, est_ranges = [], []
    for i, (piece_begin, piece_end) in enumerate(pieces):
        mine = [p for p in problems if p[0] == i]
        last = min(cfg.last_q, piece_end - piece_begin)
        est = slice(piece_end - begin - last, piece_end - begin)
        est_queries.append({sel: queries[sel][est] for _, _, sel, *_ in mine})
        est_ranges.append([(sel, a, b) for _, _, sel, a, b, _ in mine if b > a])
    v_idx, s_idx = estimate_vertical_slash_batched(
        est_queries, k, est_ranges, [piece_end for _, piece_end in pieces], softmax_scale=softmax_scale,
        vertical_sizes=vertical_sizes, slash_sizes=slash_sizes, sink_tokens=cfg.sink_tokens,
        local_diagonals=cfg.local_diagonals, kernels=kernels)

    # the problem tables, on the host, then one asynchronous copy
    num_fallback = cfg.empty_region_columns
    rows = [[piece, a, b, pieces[piece][1], pieces[piece][1] - pieces[piece][0], b - a, int(causal)]
            for piece, _, _, a, b, causal in problems]
    # the fallback's even columns as ``_region_index`` makes them (float32 linspace, truncated)
    spread = torch.stack([torch.linspace(0, b - a - 1, num_fallback) for _, _, _, a, b, _ in problems]).long()
    table = host_to_device(torch.cat([torch.tensor(rows, dtype=torch.int64), spread], dim=1), device)

    kinds = [kind for kind in _SLOTS if any(p[1] == kind for p in problems)]
    q_all = torch.stack([queries[kind] for kind in kinds])  # [R, num_q, H, D]: one copy
    attn = (q_all, k, v, None)  # what the attention kernels read: q, k, v, FP8 scales
    if fp8_kv is not None:
        q8 = quantize(q_all.view(-1, num_heads, head_dim))
        (k8, v8), slots_shape = fp8_kv, q_all.shape[:3]
        attn = (q8.values.view(q_all.shape), k8.values, v8.values, (q8.scale.view(slots_shape), k8.scale, v8.scale))
    out_all = torch.empty(len(kinds), num_q, num_heads, head_dim, dtype=q_intra.dtype, device=device)
    lse_all = torch.empty(len(kinds), num_heads, num_q, dtype=torch.float32, device=device)
    if len(kinds) > 1 and any(sum(p[0] == i for p in problems) < len(kinds) for i in range(len(pieces))):
        out_all[1:].zero_()  # slots a piece has no region for: weight 0 in the merge
        lse_all[1:].fill_(float("-inf"))
    attn_rows = [[kinds.index(kind), pieces[piece][0] - begin, a, pieces[piece][1] - pieces[piece][0], b - a,
                  int(causal), 0, kinds.index(kind)] for piece, kind, _, a, b, causal in problems]
    attn_table = host_to_device(torch.tensor(attn_rows, dtype=torch.int32).reshape(-1, PROB_FIELDS), device)

    bm = bn = cfg.block_size
    nv = v_idx.shape[2] + num_fallback
    ns = s_idx.shape[2]
    shapes = [(pieces[p][1] - pieces[p][0], b - a, causal) for p, _, _, a, b, causal in problems]
    widths = [index_widths(nv, ns, q, kv, causal=c, block_m=bm, block_n=bn) for q, kv, c in shapes]
    dense_on = dense_regions and cfg.dense_above_density < 1.0
    computed, dense_flags = [], []
    for first, stop in _groups(shapes, widths, num_heads, bm):
        # 2.-5. the group's problems together; its temporaries are freed before the next group's
        pairs, dense = _attend_group(slice(first, stop), shapes, picks=(v_idx, s_idx), tables=(table, attn_table),
                                     slots=(out_all, lse_all), attn=attn, softmax_scale=softmax_scale,
                                     cfg=cfg, dense_on=dense_on, with_stats=stats is not None)
        if pairs is not None:
            computed.append(pairs)
        dense_flags.append(dense)
    out, lse = out_all[0], lse_all[0]
    if len(kinds) > 1:
        out, lse = merge_fn([(out_all[r], lse_all[r]) for r in range(len(kinds))])
    if stats is not None:  # last: a call that fails (e.g. out of memory) leaves stats as they were
        stats["computed"] = stats.get("computed", 0) + torch.stack(computed).sum()
        stats["causal"] = stats.get("causal", 0) + sum(num_heads * _pairs(*shape) for shape in shapes)
    if decisions is not None and dense_on:
        decisions["dense"] = torch.cat(dense_flags)
    return out, lse


def _attend_group(group: slice, shapes, *, picks, tables, slots, attn, softmax_scale: float, cfg: SparseConfig,
                  dense_on: bool, with_stats: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Steps 2.-5. for the problems ``group``: re-base, index, dense decision, attention.

    picks: (v_idx, s_idx) of the pieces; tables: the problem table (``_rebase``'s, + fallback columns)
    and the attention problem table; slots: (out_all, lse_all), written in place; attn: (q_all, k, v,
    scales) as the attention kernels take them (scales None, or e4m3 inputs' scales). Returns (the
    computed pairs, a 0-dim device tensor, if with_stats, else None; the dense flags of the group's
    problems, int32 on the device).
    """
    from qwen1m.kernels.flash_attn_problems import flash_attn_problems
    from qwen1m.kernels.sparse_attn import vertical_slash_attention_batched
    from qwen1m.kernels.vs_index import build_vertical_slash_index_batched
    from qwen1m.transfer import host_to_device

    (v_idx, s_idx), (table, attn_table), (out_all, lse_all) = picks, tables, slots
    q_all, k, v, scales = attn
    num_heads, bm = q_all.shape[2], cfg.block_size
    sizes = table[group, 4:7]  # num_q, num_kv, causal
    cols, d = _rebase(v_idx, s_idx, table[group, :7], table[group, 7:], cfg.empty_region_columns)
    index = build_vertical_slash_index_batched(cols, d, shapes[group], block_m=bm, block_n=bm, sizes=sizes)
    prob = attn_table[group]
    dense = torch.zeros(prob.shape[0], dtype=torch.int32, device=prob.device)
    if dense_on:
        dense = _dense_flags(index, sizes, num_heads, cfg.dense_above_density)
        prob = prob.clone()
        prob[:, 6] = dense
    vertical_slash_attention_batched(q_all, k, v, index, prob, out_all, lse_all, softmax_scale=softmax_scale,
                                     scales=scales)
    if dense_on:
        flash_attn_problems(q_all, k, v, prob, out_all, lse_all, softmax_scale=softmax_scale,
                            max_num_q=max(shape[0] for shape in shapes[group]), scales=scales)
    if not with_stats:
        return None, dense
    full = torch.tensor([num_heads * _pairs(*shape) for shape in shapes[group]], dtype=torch.int64)
    return _computed_pairs(index, sizes, dense, host_to_device(full, prob.device)), dense


def causal_pairs(begin: int, total: int, chunk_len: int | None, num_heads: int) -> int:
    """Visible query-key pairs of a prefill step over every piece and region (telemetry of a step that
    ran dense: its computed pairs)."""
    pieces, problems = _problems(begin, total, chunk_len)
    return sum(num_heads * _pairs(pieces[p][1] - pieces[p][0], b - a, c) for p, _, _, a, b, c in problems)


def _pairs(num_q: int, num_kv: int, causal: bool) -> int:
    """Visible query-key pairs of one head (bottom-right causal)."""
    return num_q * (num_q + 1) // 2 + num_q * (num_kv - num_q) if causal else num_q * num_kv
