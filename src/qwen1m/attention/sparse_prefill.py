"""Sparse prefill: vertical-slash attention estimated per prefill piece, DCA-aware (design §3.4).

For each piece of queries (a prefill chunk cut at DCA chunk boundaries, ``dca.dca_pieces``):

    1. estimate: the last ``last_q`` queries score every key so far (continuous positions for the
       successive and older chunks: ``q_succ_critical``, ``q_inter_critical``) and each head keeps its
       top verticals and slashes (``sparse_estimate``);
    2. split and re-base the picks per DCA region (intra causal, succ and inter non-causal);
       a vertical j of region [a, b) becomes column j - a; a slash at distance D = i - j becomes the
       region's slash offset D - (piece_end - b) (``vertical_slash`` coordinates);
    3. attend each region with its own index, using the DCA rotations (q_intra / q_succ / q_inter),
       and merge the regions by LSE exactly as dense DCA does. A region whose index lists more than
       ``cfg.dense_above_density`` of its visible pairs is attended densely instead (``attend_fn``):
       there the dense kernel is faster and exact.

Without DCA the whole prompt is one region (intra), so this is MInference's chunked variant.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from qwen1m.attention.dca import Region, attend_region, dca_pieces, intra_regions
from qwen1m.attention.kernel_choice import KERNEL_BUILD_ERRORS, KernelChoice
from qwen1m.attention.reference import exp_floor, logsumexp, merge_attn_states
from qwen1m.attention.sparse_estimate import estimate_vertical_slash
from qwen1m.attention.vertical_slash import VerticalSlashIndex, build_vertical_slash_index
from qwen1m.sparse_config import SparseConfig

log = logging.getLogger(__name__)

SparseFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
_MAX_GATHER = 1 << 22  # score elements alive at once in the CPU gather path (16 MiB of float32)


def sparse_attend_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: VerticalSlashIndex,
    *,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU path of ``vertical_slash_attention``: per query block, gather the listed keys and attend.

    Memory is bounded by the listed keys, not num_q x num_kv (a 64K-token piece on a CPU).
    q: [num_q, num_heads, head_dim]; k, v: [num_kv, num_kv_heads, head_dim].
    Returns out [num_q, num_heads, head_dim] (q dtype), lse [num_heads, num_q] float32.
    """
    num_q, num_heads, head_dim = q.shape
    num_kv, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    bm, bn = index.block_m, index.block_n
    num_blocks = index.block_count.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(num_q, num_heads, head_dim, dtype=acc, device=q.device)
    lse = torch.full((num_heads, num_q), float("-inf"), dtype=acc, device=q.device)
    offset = num_kv - num_q
    qpad = torch.zeros(num_blocks * bm, num_heads, head_dim, dtype=acc, device=q.device)
    qpad[:num_q] = q.to(acc)
    for h in range(num_heads):
        kv_h = h // group
        dense = index.block_offset[h].long()[..., None] + torch.arange(bn, device=q.device)  # [M, nb, bn]
        dense_ok = (torch.arange(dense.shape[1], device=q.device)[None, :] < index.block_count[h][:, None])
        dense_ok = dense_ok[..., None].expand_as(dense)
        cols = index.column_index[h].long()
        cols_ok = torch.arange(cols.shape[1], device=q.device)[None, :] < index.column_count[h][:, None]
        keys = torch.cat([dense.flatten(1), cols], dim=1)  # [M, W]
        ok = torch.cat([dense_ok.flatten(1), cols_ok], dim=1) & (keys < num_kv)
        width = keys.shape[1]
        step = max(1, _MAX_GATHER // max(1, bm * width))
        for m0 in range(0, num_blocks, step):
            m1 = min(m0 + step, num_blocks)
            kk = keys[m0:m1].clamp(0, max(num_kv - 1, 0))
            kb = k[:, kv_h].to(acc)[kk]  # [m, W, D]
            vb = v[:, kv_h].to(acc)[kk]
            qb = qpad[m0 * bm:m1 * bm, h].view(m1 - m0, bm, head_dim)
            scores = torch.einsum("mqd,mwd->mqw", qb, kb) * softmax_scale
            valid = ok[m0:m1, None, :].expand_as(scores)
            if causal:
                q_abs = torch.arange(m0 * bm, m1 * bm, device=q.device).view(m1 - m0, bm, 1) + offset
                valid = valid & (keys[m0:m1, None, :] <= q_abs)
            scores = scores.masked_fill(~valid, float("-inf"))
            row_lse = logsumexp(scores, dim=-1)  # [m, bm]
            safe = torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))
            ob = torch.einsum("mqw,mwd->mqd", exp_floor(scores - safe[..., None]), vb)
            rows = slice(m0 * bm, min(m1 * bm, num_q))
            n = rows.stop - rows.start
            out[rows, h] = ob.reshape(-1, head_dim)[:n]
            lse[h, rows] = row_lse.reshape(-1)[:n]
    return out.to(q.dtype), (lse.float() if acc != torch.float64 else lse)


def get_sparse_fn(device: torch.device) -> SparseFn:
    """The Triton kernel on CUDA, the gather path elsewhere."""
    if device.type == "cuda":
        from qwen1m.kernels.sparse_attn import vertical_slash_attention

        return vertical_slash_attention
    return sparse_attend_gather


def _region_index(v_idx, s_idx, key_begin, key_end, piece_begin, piece_end, causal, cfg: SparseConfig,
                  kernels: KernelChoice):
    """Re-base the piece's picks (absolute columns, distances) into one region's index (step 2): on CUDA
    with the Triton builder (no host sync, padded to host-known widths) unless it cannot be built here."""
    num_q, num_kv = piece_end - piece_begin, key_end - key_begin
    cols = torch.where((v_idx >= key_begin) & (v_idx < key_end), v_idx - key_begin, torch.full_like(v_idx, -1))
    # distance D -> region offset; -1 padding stays invalid (very negative)
    d = torch.where(s_idx >= 0, s_idx - (piece_end - key_end), torch.full_like(s_idx, -(1 << 40)))
    if cfg.empty_region_columns:
        # a head that picked nothing here keeps a few evenly spaced columns (vLLM's fallback); appended
        # as -1 (dropped by the builders) for the other heads, so that no host sync decides whether
        lo = 0 if causal else 1 - num_q
        has_slash = ((d >= lo) & (d <= num_kv - 1)).any(-1)
        has_col = (cols >= 0).any(-1)
        spread = torch.linspace(0, num_kv - 1, cfg.empty_region_columns, device=cols.device).long()
        empty = ~(has_slash | has_col)
        fallback = torch.where(empty[:, None], spread[None, :], torch.full_like(spread, -1)[None, :])
        cols = torch.cat([cols, fallback], dim=1)
    args = (cols, d, num_q, num_kv)
    kw = dict(causal=causal, block_m=cfg.block_size, block_n=cfg.block_size)
    if cols.device.type == "cuda" and kernels.sparse_index:
        try:
            from qwen1m.kernels.vs_index import build_vertical_slash_index_triton

            return build_vertical_slash_index_triton(*args, **kw)
        except KERNEL_BUILD_ERRORS as e:
            kernels.fall_back("sparse_index", e, "the PyTorch index builder")
    return build_vertical_slash_index(*args, **kw)


def sparse_prefill_attention(
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
    sparse_fn: SparseFn = sparse_attend_gather,
    merge_fn=merge_attn_states,
    attend_fn=None,
    stats: dict | None = None,
    batched: bool | None = None,
    kernels: KernelChoice | None = None,
    decisions: dict | None = None,
    fp8_kv=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention of queries [begin, begin + num_q) over all keys so far.

    queries: "intra" (and with DCA also "succ", "inter", "succ_critical", "inter_critical"), each
      [num_q, num_heads, head_dim], rotated as ``dca_rope.rotate_for_dca`` does; without DCA "intra"
      is the plain RoPE query. k, v: [begin + num_q, num_kv_heads, head_dim] (views of the cache).
    chunk_len: DCA's s = chunk_size - local_size, or None without DCA (one region).
    attend_fn: dense attention (``reference.attend``'s contract) for regions denser than
      ``cfg.dense_above_density``; None keeps every region sparse.
    stats: if given, receives the computed and causal query-key pair counts (density telemetry).
    batched: run ``sparse_batched`` (every piece and region in a few launches, no host sync; the
      Triton kernels, so CUDA or TRITON_INTERPRET=1): None = on CUDA when the kernels take the shapes
      and ``kernels`` has it on; if it runs out of memory this call takes the per-region path (the next
      tries again), if it cannot be built (``kernel_choice``) ``kernels`` turns it off; True raises
      either. Any other error propagates. There a dense region runs in ``flash_attn_problems`` (the
      dense kernel, decided on the device) instead of ``attend_fn``.
    kernels: the calling backend's kernel choice (None: a fresh one, for this call only).
    decisions: the batched path's per-region dense decisions go here ("dense", see ``sparse_batched``);
      the per-region path leaves it empty.
    fp8_kv: attention_dtype="fp8": a function returning (k, v) as ``Fp8Tensor`` (called only if the
      batched path runs; its attention kernels then read e4m3). If those cannot be built here, ``kernels``
      turns FP8 off for the sparse kernels (``sparse_fp8``) and they run in the model dtype. The
      per-region path attends its sparse regions in the model dtype; its dense ones use ``attend_fn``.
    Returns out [num_q, num_heads, head_dim] and lse [num_heads, num_q] (float32).
    """
    from qwen1m.attention.sparse_batched import sparse_prefill_batched

    kernels = kernels if kernels is not None else KernelChoice()
    auto = batched is None
    if auto:
        batched = _use_batched(queries["intra"], k, cfg, kernels)
    if batched:
        oom = None
        fp8 = fp8_kv is not None and kernels.sparse_fp8
        try:
            return sparse_prefill_batched(
                queries, k, v, begin=begin, chunk_len=chunk_len, softmax_scale=softmax_scale,
                vertical_sizes=vertical_sizes, slash_sizes=slash_sizes, cfg=cfg, merge_fn=merge_fn,
                dense_regions=attend_fn is not None, stats=stats, kernels=kernels, decisions=decisions,
                fp8_kv=fp8_kv() if fp8 else None)
        except torch.OutOfMemoryError as e:
            if not auto:
                raise
            oom = str(e).split("\n")[0]  # the exception's frames hold the path's tensors: keep only its text
        except KERNEL_BUILD_ERRORS as e:
            if not auto:  # asked for by name (tests, benchmarks): say so
                raise
            if fp8:  # the FP8 variants first: the same path in the model dtype
                kernels.fall_back("sparse_fp8", e, "the sparse kernels in the model dtype")
                return sparse_prefill_attention(
                    queries, k, v, begin=begin, chunk_len=chunk_len, softmax_scale=softmax_scale,
                    vertical_sizes=vertical_sizes, slash_sizes=slash_sizes, cfg=cfg, sparse_fn=sparse_fn,
                    merge_fn=merge_fn, attend_fn=attend_fn, stats=stats, kernels=kernels, decisions=decisions)
            kernels.fall_back("sparse_batched", e, "the per-region sparse prefill")
        if oom is not None:
            _batched_oom(oom, queries["intra"], k, begin, chunk_len, vertical_sizes, slash_sizes, cfg, kernels)
    q_intra = queries["intra"]
    num_q, num_heads, _ = q_intra.shape
    total = begin + num_q
    s = chunk_len if chunk_len is not None else total
    out = torch.empty_like(q_intra)
    lse = torch.empty(num_heads, num_q, dtype=torch.float32, device=q_intra.device)
    for piece_begin, piece_end, chunk_begin in dca_pieces(begin, total, s):
        rows = slice(piece_begin - begin, piece_end - begin)
        # (query copy for attention, query copy for selection, key range, causal)
        regions = [("intra", "intra", chunk_begin, piece_end, True)]
        if chunk_len is not None and chunk_begin >= s:
            regions.append(("succ", "succ_critical", chunk_begin - s, chunk_begin, False))
        if chunk_len is not None and chunk_begin >= 2 * s:
            regions.append(("inter", "inter_critical", 0, chunk_begin - s, False))
        last = min(cfg.last_q, piece_end - piece_begin)
        est_rows = slice(rows.stop - last, rows.stop)
        v_idx, s_idx = estimate_vertical_slash(
            {sel: queries[sel][est_rows] for _, sel, *_ in regions}, k,
            [(sel, a, b) for _, sel, a, b, _ in regions if b > a], piece_end,
            softmax_scale=softmax_scale, vertical_sizes=vertical_sizes, slash_sizes=slash_sizes,
            sink_tokens=cfg.sink_tokens, local_diagonals=cfg.local_diagonals, kernels=kernels)
        parts = []
        for use, _, a, b, causal in regions:
            index = _region_index(v_idx, s_idx, a, b, piece_begin, piece_end, causal, cfg, kernels)
            dense = attend_fn is not None and cfg.dense_above_density < 1.0 and \
                index_density(index) > cfg.dense_above_density
            if dense:
                parts.extend(_dense_region(queries[use][rows], k, v, a, b, piece_begin, causal, softmax_scale,
                                           attend_fn))
            else:
                parts.append(sparse_fn(queries[use][rows], k[a:b], v[a:b], index, softmax_scale=softmax_scale,
                                       causal=causal))
            if stats is not None:
                _count(stats, index, piece_end - piece_begin, b - a, causal, dense)
        out[rows], lse[:, rows] = merge_fn(parts)
    return out, lse


def _use_batched(q: torch.Tensor, k: torch.Tensor, cfg: SparseConfig, kernels: KernelChoice) -> bool:
    """batched=None: on CUDA, while the backend has the batched path, when its kernels take the shapes."""
    from qwen1m.attention.sparse_batched import batched_supported

    return k.device.type == "cuda" and kernels.sparse_batched and batched_supported(q, k, cfg)


def _batched_oom(message: str, q: torch.Tensor, k: torch.Tensor, begin: int, chunk_len: int | None,
                 vertical_sizes: list[int], slash_sizes: list[int], cfg: SparseConfig, kernels: KernelChoice) -> None:
    """The batched path ran out of device memory: give its cached blocks back and warn once (every time
    at debug level). The batched path stays on: memory that is short now (other requests' activations,
    fragmentation) may not be next time; a memory plan that reserves ``sparse_workspace_bytes`` avoids it."""
    from qwen1m.cache.sparse_workspace import sparse_workspace_bytes

    if k.device.type == "cuda":
        torch.cuda.empty_cache()
    num_q, num_heads, head_dim = q.shape
    need = sparse_workspace_bytes(num_q, begin + num_q, num_heads=num_heads, head_dim=head_dim,
                                  element_size=q.element_size(), max_vertical=max(vertical_sizes, default=0),
                                  max_slash=max(slash_sizes, default=0), cfg=cfg, chunk_len=chunk_len)
    level = logging.DEBUG if kernels.oom_warned else logging.WARNING
    kernels.oom_warned = True
    log.log(level, "the batched sparse prefill ran out of device memory (%s) at %d queries over %d keys, %d heads "
            "(%d kv heads) of dim %d, %s; it needs up to %.2f GiB beside the KV cache (sparse_workspace_bytes): "
            "this step takes the per-region path, later steps try the batched path again", message, num_q,
            begin + num_q, num_heads, k.shape[1], head_dim, q.dtype, need / (1 << 30))


def index_density(index: VerticalSlashIndex) -> float:
    """Keys the index lists per query block over the keys that block's last row sees, summed over heads
    and blocks (a host sync: one per region, beside a kernel of milliseconds)."""
    num_blocks = index.block_count.shape[1]
    listed = index.block_count.long() * index.block_n + index.column_count.long()  # [heads, blocks]
    ends = (torch.arange(1, num_blocks + 1, device=listed.device) * index.block_m).clamp(max=index.num_q)
    visible = (ends + index.num_kv - index.num_q).clamp(max=index.num_kv) if index.causal else \
        torch.full_like(ends, index.num_kv)
    got, full = torch.stack([listed.clamp(max=visible).sum(), visible.sum() * listed.shape[0]]).tolist()
    return got / max(1, full)


def _dense_region(q, k, v, a, b, piece_begin, causal, softmax_scale, attend_fn):
    """Dense attention of a region, called as dense DCA calls it (a causal region is split by
    ``dca.intra_regions`` so that every call suits cuDNN). Returns [(out, lse), ...]."""
    regions = intra_regions(a, piece_begin, b) if causal else [Region("dense", a, b, False)]
    return [attend_region(q, k, v, r, softmax_scale=softmax_scale, attend_fn=attend_fn) for r in regions]


def _count(stats: dict, index: VerticalSlashIndex, num_q: int, num_kv: int, causal: bool, dense: bool) -> None:
    """Accumulate computed vs causal query-key pairs (block granularity; telemetry only)."""
    bm = index.block_m
    rows = torch.full_like(index.block_count, bm).long()
    rows[:, -1] = num_q - bm * (index.block_count.shape[1] - 1)
    computed = ((index.block_count.long() * index.block_n + index.column_count.long()) * rows).sum().item()
    full = index.block_count.shape[0] * (num_q * (num_q + 1) // 2 + num_q * (num_kv - num_q) if causal
                                         else num_q * num_kv)
    stats["computed"] = stats.get("computed", 0) + (full if dense else min(computed, full))
    stats["causal"] = stats.get("causal", 0) + full


class SparseTelemetry:
    """Debug report of sparse prefill: computed density per layer, and the attention recall
    exp(lse_sparse - lse_full) of one GQA group of heads (those of kv head 0), measured against dense
    attention on the same request. Costs a dense pass over those heads and a host sync per layer: a
    debugging aid only. recall=False records the density alone (device counters, read by ``summary``)."""

    def __init__(self, recall: bool = True) -> None:
        self.measure_recall = recall
        self.reset()

    def reset(self) -> None:
        """Forget what was recorded (a report per request: reset before it)."""
        self.computed: dict[int, int] = {}
        self.causal: dict[int, int] = {}
        self.recall: dict[int, list[torch.Tensor]] = {}

    def record(self, layer, stats, lse, queries, keys, values, dense_fn) -> None:
        self.computed[layer] = self.computed.get(layer, 0) + stats.get("computed", 0)
        self.causal[layer] = self.causal.get(layer, 0) + stats.get("causal", 0)
        if not self.measure_recall:
            return
        num_heads, num_kv_heads = lse.shape[0], keys.shape[1]
        group = num_heads // num_kv_heads
        _, dense_lse = dense_fn({k: q[:, :group] for k, q in queries.items()}, keys[:, :1], values[:, :1])
        self.recall.setdefault(layer, []).append(torch.exp(lse[:group] - dense_lse).float().cpu())

    def summary(self) -> dict[int, dict[str, float | list[float]]]:
        """layer -> {"density": computed / causal pairs, "recall": mean recall per sampled head}."""
        out = {}
        for layer in sorted(self.causal):
            recall = torch.cat(self.recall[layer], dim=1).mean(-1).tolist() if layer in self.recall else []
            # computed may be a device tensor (the batched path keeps it there): read once, here
            out[layer] = {"density": float(self.computed[layer]) / max(1, self.causal[layer]), "recall": recall}
        return out
