"""Online vertical-slash pattern estimation for one prefill piece (spec 3.2, 3.4).

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
"""

from __future__ import annotations

import logging

import torch

from qwen1m.attention.reference import exp_floor

_KEY_BLOCK = 1 << 15
log = logging.getLogger(__name__)
# The Triton kernels are used on CUDA until they fail once (e.g. a Triton version that cannot compile
# them); the PyTorch code computes the same sums, only slower.
_TRITON_SUMS = {"usable": True}


def _triton_supported(queries: dict[str, torch.Tensor], k: torch.Tensor, key_ranges) -> bool:
    head_dim = k.shape[-1]
    return (k.device.type == "cuda" and _TRITON_SUMS["usable"] and k.dtype in (torch.float16, torch.bfloat16,
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column sums and diagonal sums of the causal softmax of the last queries.

    queries: kind -> [L, num_heads, head_dim], the last L queries (positions query_end - L ...
      query_end - 1) rotated the way keys of that kind are scored; key_ranges: (kind, begin, end)
      disjoint ranges covering [0, query_end); k: [>= query_end, num_kv_heads, head_dim].
    Returns vertical [num_heads, query_end] and slash [num_heads, query_end] (index d = distance), fp32.
    """
    if _triton_supported(queries, k, key_ranges):
        from qwen1m.kernels.sparse_estimate import attention_sums_triton

        try:
            return attention_sums_triton(queries, k, key_ranges, query_end, softmax_scale=softmax_scale)
        except torch.OutOfMemoryError:  # not the kernels' fault (and the PyTorch path needs more memory)
            raise
        except Exception as e:  # noqa: BLE001 - a kernel that fails to build must not fail the request
            _TRITON_SUMS["usable"] = False
            log.warning("the Triton attention-sums kernels failed (%s); using the PyTorch path", e)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each head's key columns and diagonals (arguments as ``attention_sums``).

    Returns v_idx [num_heads, max(vertical_sizes)] absolute key positions and
    s_idx [num_heads, max(slash_sizes)] diagonal distances d (query pos - key pos), both int64,
    padded with -1 where a head's budget is smaller than the widest head's.
    """
    vertical, slash = attention_sums(queries, k, key_ranges, query_end, softmax_scale=softmax_scale,
                                     key_block=key_block)
    vertical[:, :sink_tokens] = float("inf")  # attention sinks
    slash[:, :local_diagonals] = float("inf")  # the local window
    return (_top_per_head(vertical, vertical_sizes), _top_per_head(slash, slash_sizes))


def _top_per_head(scores: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Top-sizes[h] indices of scores[h] per head, -1 padded to the widest head."""
    width = min(max(sizes), scores.shape[1]) if sizes else 0
    if width == 0:
        return torch.empty(scores.shape[0], 0, dtype=torch.long, device=scores.device)
    idx = torch.topk(scores, width, dim=-1).indices
    # the mask is host data: built there, copied without a sync (a pageable copy would block)
    keep = torch.arange(width)[None, :] < torch.tensor(sizes)[:, None]
    if scores.device.type == "cuda":
        keep = keep.pin_memory().to(scores.device, non_blocking=True)
    return torch.where(keep.to(scores.device), idx, -1)
