"""Online vertical-slash pattern estimation for one prefill piece (design §3.2, §3.4).

The last ``last_q`` queries of a piece attend (softmax over every key of the sequence so far) and
the attention mass is summed two ways:

    vertical[j] = sum_i A[i, j]            -> the heaviest key columns
    slash[d]    = sum_i A[i, i - d]        -> the heaviest diagonals (d = query pos - key pos >= 0)

With DCA the scores use continuous positions for selection (the report's fix): keys of the
successive chunk are scored with ``q_succ_critical`` (p' + s) and older keys with
``q_inter_critical`` (p' + c), so a diagonal keeps one relative distance along its length; the
attention itself later uses the DCA rotations.

Memory: two passes over key blocks (max and sum-exp first, then normalised sums), so the
[heads, last_q, keys] probability matrix never exists whole: at 1M keys and 28 heads it would be
7 GB; a block of ``key_block`` keys costs heads * last_q * key_block * 4 bytes.

On CUDA ``attention_sums`` runs the Triton kernels of ``qwen1m.kernels.sparse_estimate`` (same sums,
K read twice, no score tensor in memory) until they fail once; the PyTorch code below is the CPU
path and the oracle.

``estimate_vertical_slash_batched`` estimates every piece of a prefill step together (two kernel
launches, one top-k per direction, no host sync on CUDA) with the per-piece function's results; its
CPU path is the loop over ``estimate_vertical_slash``.
"""

from __future__ import annotations

import torch

from qwen1m.attention.kernel_choice import KERNEL_BUILD_ERRORS, KernelChoice
from qwen1m.attention.reference import exp_floor
from qwen1m.cache.sparse_workspace import MAX_SUM_ELEMENTS
from qwen1m.transfer import host_to_device

_KEY_BLOCK = 1 << 15

def _triton_supported(queries: dict[str, torch.Tensor], k: torch.Tensor, key_ranges, kernels: KernelChoice) -> bool:
    """On CUDA, while ``kernels`` has the Triton sums (they fall back to PyTorch only when they cannot
    be built: ``kernel_choice``), for the dtypes and head sizes they take."""
    head_dim = k.shape[-1]
    return (k.device.type == "cuda" and kernels.sparse_sums and k.dtype in (torch.float16, torch.bfloat16,
            torch.float32) and head_dim >= 16 and head_dim & (head_dim - 1) == 0
            and all(queries[kind].dtype == k.dtype and queries[kind].device == k.device
                    for kind, _, _ in key_ranges))


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q [L, H, D] (H = KVH * G), k [n, KVH, D] -> scores [H, L, n] float32 (GQA without copying K)."""
    num_l, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    qg = q.float().view(num_l, num_kv_heads, num_heads // num_kv_heads, head_dim)
    s = torch.einsum("lhgd,nhd->hgln", qg, k.float()) * scale
    return s.reshape(num_heads, num_l, -1)


def attention_sums(
    queries: dict[str, torch.Tensor],
    k: torch.Tensor,
    key_ranges: list[tuple[str, int, int]],
    query_end: int,
    *,
    softmax_scale: float,
    key_block: int = _KEY_BLOCK,
    kernels: KernelChoice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column sums and diagonal sums of the causal softmax of the last queries.

    queries: kind -> [L, num_heads, head_dim], the last L queries (positions query_end - L ...
      query_end - 1) rotated the way keys of that kind are scored; key_ranges: (kind, begin, end)
      disjoint ranges covering [0, query_end); k: [>= query_end, num_kv_heads, head_dim].
    kernels: the backend's choice (None: a fresh one, Triton on CUDA); a Triton failure to build turns
      its ``sparse_sums`` off. Any other error (out of memory included) propagates.
    Returns vertical [num_heads, query_end] and slash [num_heads, query_end] (index d = distance), fp32.
    """
    kernels = kernels if kernels is not None else KernelChoice()
    if _triton_supported(queries, k, key_ranges, kernels):
        try:
            from qwen1m.kernels.sparse_estimate import attention_sums_triton

            return attention_sums_triton(queries, k, key_ranges, query_end, softmax_scale=softmax_scale)
        except KERNEL_BUILD_ERRORS as e:
            kernels.fall_back("sparse_sums", e, "the PyTorch attention sums")
    any_q = next(iter(queries.values()))
    num_l, num_heads, _ = any_q.shape
    device = any_q.device
    q_pos = torch.arange(query_end - num_l, query_end, device=device)

    def blocks():
        for kind, begin, end in key_ranges:
            for a in range(begin, end, key_block):
                b = min(a + key_block, end)
                s = _scores(queries[kind], k[a:b], softmax_scale)  # [H, L, n]
                k_pos = torch.arange(a, b, device=device)
                dist = q_pos[:, None] - k_pos[None, :]  # [L, n]
                yield a, b, s.masked_fill((dist < 0)[None], float("-inf")), dist

    row_max = torch.full((num_heads, num_l), float("-inf"), device=device)
    for _, _, s, _ in blocks():
        row_max = torch.maximum(row_max, s.amax(-1))
    row_sum = torch.zeros(num_heads, num_l, device=device)
    for _, _, s, _ in blocks():
        row_sum += exp_floor(s - row_max[..., None]).sum(-1)
    lse = row_max + torch.log(row_sum)

    vertical = torch.zeros(num_heads, query_end, device=device)
    slash = torch.zeros(num_heads, query_end, device=device)
    for a, b, s, dist in blocks():
        p = exp_floor(s - lse[..., None])  # masked entries are exp(-inf) = 0
        vertical[:, a:b] += p.sum(1)
        slash.scatter_add_(1, dist.clamp_min(0).reshape(1, -1).expand(num_heads, -1), p.reshape(num_heads, -1))
    return vertical, slash


def estimate_vertical_slash(
    queries: dict[str, torch.Tensor],
    k: torch.Tensor,
    key_ranges: list[tuple[str, int, int]],
    query_end: int,
    *,
    softmax_scale: float,
    vertical_sizes: list[int],
    slash_sizes: list[int],
    sink_tokens: int,
    local_diagonals: int,
    key_block: int = _KEY_BLOCK,
    kernels: KernelChoice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each head's key columns and diagonals (arguments as ``attention_sums``).

    Returns v_idx [num_heads, max(vertical_sizes)] absolute key positions and
    s_idx [num_heads, max(slash_sizes)] diagonal distances d (query pos - key pos), both int64,
    padded with -1 where a head's budget is smaller than the widest head's.
    """
    vertical, slash = attention_sums(queries, k, key_ranges, query_end, softmax_scale=softmax_scale,
                                     key_block=key_block, kernels=kernels)
    _force_first(vertical, sink_tokens)  # attention sinks
    _force_first(slash, local_diagonals)  # the local window
    return (_top_per_head(vertical, vertical_sizes), _top_per_head(slash, slash_sizes))


# Scores of the always-kept entries: above every sum (a sum is at most L, the number of estimating rows),
# distinct integers exact in float32 (below 2^24)
_FORCED = float(1 << 23)


def _force_first(scores: torch.Tensor, n: int) -> None:
    """Make the first n entries of the last axis outrank every sum, the lower index first.

    Distinct values, not +inf: with +inf a budget smaller than n left the choice among them to
    ``torch.topk``'s tie order, which differs between widths and devices (and so between the per-piece
    and the batched estimate); this way the picks are a function of the scores. One device op, no copy
    from the host.
    """
    n = min(n, scores.shape[-1])
    if n > 0:
        scores[..., :n] = torch.arange(_FORCED, _FORCED - n, -1.0, device=scores.device)


def _top_per_head(scores: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Top-sizes[h] indices of scores[h] per head, -1 padded to the widest head."""
    width = min(max(sizes), scores.shape[1]) if sizes else 0
    if width == 0:
        return torch.empty(scores.shape[0], 0, dtype=torch.long, device=scores.device)
    idx = torch.topk(scores, width, dim=-1).indices
    # the mask is host data: built there, copied without a sync (a pageable copy would block)
    keep = host_to_device(torch.arange(width)[None, :] < torch.tensor(sizes)[:, None], scores.device)
    return torch.where(keep, idx, -1)


def pad_stack(parts: list[torch.Tensor]) -> torch.Tensor:
    """Stack [H, n_i] index tensors to [len(parts), H, max n_i], padding with -1."""
    width = max(p.shape[-1] for p in parts)
    return torch.stack([torch.nn.functional.pad(p, (0, width - p.shape[-1]), value=-1) for p in parts])


def estimate_vertical_slash_batched(
    queries: list[dict[str, torch.Tensor]],
    k: torch.Tensor,
    key_ranges: list[list[tuple[str, int, int]]],
    query_ends: list[int],
    *,
    softmax_scale: float,
    vertical_sizes: list[int],
    slash_sizes: list[int],
    sink_tokens: int,
    local_diagonals: int,
    kernels: KernelChoice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``estimate_vertical_slash`` for P pieces at once: queries[p], key_ranges[p], query_ends[p] are
    piece p's arguments (a piece's query copies share one L_p; pieces may differ).

    Returns v_idx [P, H, nv] and s_idx [P, H, ns], equal to ``pad_stack`` of the per-piece results:
    the same picks per head, -1 in the same places (nv = min(max(vertical_sizes), max(query_ends)),
    a piece's row is -1 past its own budget and past its own query_end). Exact as long as the sums of
    the two paths order the same (the kernels' fp32 sums differ from the PyTorch ones in the last bits;
    scores that are exactly equal, e.g. columns whose mass is flushed to 0, are picked in ``torch.topk``'s
    tie order, which may differ between the [H, query_end] and the padded [P, H, T] top-k).

    On CUDA (the Triton kernels usable): two kernel launches and a fixed number of tensor ops for all
    pieces, no host sync. Otherwise (the CPU path, and the oracle) a loop over ``estimate_vertical_slash``.
    """
    kernels = kernels if kernels is not None else KernelChoice()
    if all(_triton_supported(q, k, r, kernels) for q, r in zip(queries, key_ranges)):
        # out of memory propagates: the sparse prefill retries that step per region
        try:
            return _estimate_batched_triton(queries, k, key_ranges, query_ends, softmax_scale=softmax_scale,
                                            vertical_sizes=vertical_sizes, slash_sizes=slash_sizes,
                                            sink_tokens=sink_tokens, local_diagonals=local_diagonals)
        except KERNEL_BUILD_ERRORS as e:
            kernels.fall_back("sparse_sums", e, "the PyTorch attention sums")
    picks = [estimate_vertical_slash(q, k, r, end, softmax_scale=softmax_scale, vertical_sizes=vertical_sizes,
                                     slash_sizes=slash_sizes, sink_tokens=sink_tokens,
                                     local_diagonals=local_diagonals, kernels=kernels)
             for q, r, end in zip(queries, key_ranges, query_ends)]
    return pad_stack([v for v, _ in picks]), pad_stack([s for _, s in picks])




def _piece_groups(query_ends: list[int], num_heads: int, limit: int = MAX_SUM_ELEMENTS) -> list[slice]:
    """Consecutive pieces whose [P_g, H, max query_end] sums stay under ``limit`` elements (at least one)."""
    groups, first, widest = [], 0, 0
    for i, end in enumerate(query_ends):
        widest_new = max(widest, end)
        if i > first and (i + 1 - first) * num_heads * widest_new > limit:
            groups.append(slice(first, i))
            first, widest_new = i, end
        widest = widest_new
    groups.append(slice(first, len(query_ends)))
    return groups


def _pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [P_g, H, n_g] index tensors along pieces, padding the last axis with -1."""
    width = max(p.shape[-1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[-1]), value=-1) for p in parts])


def _estimate_batched_triton(queries, k, key_ranges, query_ends, *, split_len: int | None = None,
                             max_elements: int = MAX_SUM_ELEMENTS, **kw):
    """The Triton path of ``estimate_vertical_slash_batched`` (same arguments), a group of pieces at a time."""
    num_heads = next(iter(queries[0].values())).shape[1]
    groups = _piece_groups(query_ends, num_heads, max_elements)
    picks = [_estimate_group(queries[g], k, key_ranges[g], query_ends[g], split_len=split_len, **kw) for g in groups]
    if len(picks) == 1:
        return picks[0]
    return _pad_cat([v for v, _ in picks]), _pad_cat([s for _, s in picks])


def _estimate_group(queries, k, key_ranges, query_ends, *, softmax_scale, vertical_sizes, slash_sizes,
                    sink_tokens, local_diagonals, split_len: int | None = None):
    """One group of pieces: two kernel launches, one top-k per direction."""
    from qwen1m.kernels.sparse_estimate import attention_sums_batched_triton

    vertical, slash = attention_sums_batched_triton(queries, k, key_ranges, query_ends, softmax_scale=softmax_scale,
                                                    split_len=split_len)  # [P, H, T], 0 past a piece's end
    num_pieces, _, width = vertical.shape
    v_keep, s_keep = _keep_masks(vertical_sizes, query_ends, width), _keep_masks(slash_sizes, query_ends, width)
    # the host data in one asynchronous copy: each piece's query_end, then the two keep masks
    host = torch.cat([torch.tensor(query_ends, dtype=torch.int64), v_keep.flatten(), s_keep.flatten()])
    dev = host_to_device(host, vertical.device)
    ends, v_dev, s_dev = dev.split([num_pieces, v_keep.numel(), s_keep.numel()])
    v_keep, s_keep = v_dev.view(v_keep.shape), s_dev.view(s_keep.shape)
    _force_first(vertical, sink_tokens)  # attention sinks
    _force_first(slash, local_diagonals)  # the local window
    # past a piece's query_end nothing exists: -inf (after the sinks, which must not reach there), so
    # top-k over the padded width picks exactly what top-k over the piece's own width picks
    past_end = torch.arange(width, device=vertical.device) >= ends[:, None, None]  # [P, 1, T]
    vertical.masked_fill_(past_end, float("-inf"))
    slash.masked_fill_(past_end, float("-inf"))
    return _top_batched(vertical, v_keep), _top_batched(slash, s_keep)


def _keep_masks(sizes: list[int], query_ends: list[int], width: int) -> torch.Tensor:
    """int64 [P, H, w] (host): 1 where pick j of head h of piece p exists, j < sizes[h] and j < query_end_p
    (``_top_per_head`` clamps its width to the piece's score length); w = min(max(sizes), width)."""
    w = min(max(sizes), width) if sizes else 0
    j = torch.arange(w)
    ends = torch.tensor(query_ends)
    return ((j[None, None, :] < torch.tensor(sizes)[None, :, None]) & (j[None, None, :] < ends[:, None, None])).long()


def _top_batched(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Top-w indices of scores [P, H, T] per (piece, head), -1 where keep [P, H, w] is 0."""
    if keep.shape[-1] == 0:
        return torch.empty(*scores.shape[:2], 0, dtype=torch.long, device=scores.device)
    idx = torch.topk(scores, keep.shape[-1], dim=-1).indices
    return torch.where(keep != 0, idx, -1)
