"""Device memory of the batched sparse prefill (``attention/sparse_batched.py``), for the memory planner.

The bound lives here, beside the planner, and not in attention/: the planner reserves it before any
model exists, and cache/ must not import attention/ (attention writes into the paged KV cache). The
two group bounds that keep the workspace bounded are read from here by the estimate
(``attention.sparse_estimate``) and the index grouping (``attention.sparse_batched``), so the
formula and the code always use the same numbers.
"""

from __future__ import annotations

from qwen1m.sparse_config import SparseConfig

# The sums of a group of pieces are two [P_g, H, max query_end] fp32 tensors: pieces are estimated in
# groups of at most this many elements per tensor (2^27 x 4 B = 512 MiB; the bundled model's ~9 pieces
# at 1M tokens make 9 x 4 x 2^20 = 38M: one group; 28 heads at 1M: 4 pieces a group)
MAX_SUM_ELEMENTS = 1 << 27
# Elements of one group's block_offset + column_index (int32, padded to the group's widest problem in
# query blocks, dense blocks and columns): problems are indexed in groups below this (2^28 x 4 B =
# 1 GiB); a problem larger than that is a group of its own (28 heads, a 31K-query DCA piece and the
# 7B-shaped budgets over 1M keys: 1.5 GiB). Lowering it would not lower the peak at 1M, which is that
# one problem, and only adds launches at shorter lengths.
MAX_INDEX_ELEMENTS = 1 << 28


def sparse_workspace_bytes(num_q: int, num_keys: int, *, num_heads: int, head_dim: int, element_size: int,
                           max_vertical: int, max_slash: int, cfg: SparseConfig, chunk_len: int | None) -> int:
    """Upper bound on the device memory one ``sparse_prefill_batched`` call (attention/sparse_batched.py)
    allocates (its result included) for any step of at most ``num_q`` queries over at most ``num_keys``
    keys (cached + new), any begin.

    num_heads, head_dim: the queries' (this rank's); element_size: bytes of a q / k / v element;
    max_vertical, max_slash: the widest head budgets (``SparseConfig.budgets`` over every layer); chunk_len:
    DCA's s, or None. The inputs (query rotations, the cache) belong to the caller and are not counted.

    With s = chunk_len (num_keys without DCA), P = 1 + ceil((num_q - 1) / s) pieces, R region kinds
    (intra, + succ once a query sits in chunk 1, + inter from chunk 2), N = P R problems, nv = the top-k
    vertical width + cfg.empty_region_columns, ns = the top-k slash width, L = min(last_q, num_q),
    M = ceil(min(num_q, s) / block_size) query blocks of a piece, H = num_heads, D = head_dim, e = element_size:

      picks     24 P H (nv + ns)      int64 top-k picks of each piece, their padded copies, the stack
                + 16 N (16 + f)       the problem tables, host and device copies (f = cfg.empty_region_columns)
      estimate  8 min(P H num_keys, max(S, H num_keys))  vertical and slash sums, fp32, of one group of
                                      pieces (``estimate_vertical_slash_batched``: S = its group bound
                                      ``MAX_SUM_ELEMENTS``, or one piece alone) + P num_keys (past-end mask)
                + 3 P L H D e         the used query copies of every piece, in one flat tensor
                + 12 P H L (num_keys / 256 + 3)  the LSE partials (>= 16 key tiles of >= 16 keys per
                                      split) and two temporaries of their size (the logsumexp)
                + 32 P H (nv + ns)    top-k values, indices, the keep masks and the -1 padded result
                + 64 P (num_keys / 256 + 6)  the work tables (7 int32 fields a row)
      slots     R num_q H (2 D e + 4) q_all (the stacked rotations), out_all, and lse_all in fp32
      index     4 min(N X, max(MAX_INDEX_ELEMENTS, X))   one group's block_offset + column_index (int32):
                                      under the group bound, or the largest problem alone, X = H M (wb + wc)
                                      with wb, wc = ``index_widths`` of a piece's queries over num_keys keys
                + 56 N H M            block / column counts and the dense-decision and telemetry temporaries
                + 48 N H (nv + ns)    the re-based picks (int64), their sorted int32 copies, sort buffers
      merge     R = 3: num_q H (D (4 + e) + 8): the fp32 merge of two slots, then the result;
                R = 2: num_q H (D e + 4); R = 1: none (the result is a view of the slot)

    peak = picks + max(estimate, slots + max(index, merge)): the slots are allocated after the last
    piece's estimate is freed, and a group's index (``_attend_group``) before the next group's and the merge.
    """
    terms = sparse_workspace_terms(num_q, num_keys, num_heads=num_heads, head_dim=head_dim,
                                   element_size=element_size, max_vertical=max_vertical, max_slash=max_slash,
                                   cfg=cfg, chunk_len=chunk_len)
    return terms["picks"] + max(terms["estimate"], terms["slots"] + max(terms["index"], terms["merge"]))


def sparse_workspace_terms(num_q: int, num_keys: int, *, num_heads: int, head_dim: int, element_size: int,
                           max_vertical: int, max_slash: int, cfg: SparseConfig, chunk_len: int | None
                           ) -> dict[str, int]:
    """The terms of ``sparse_workspace_bytes`` (same arguments): picks, estimate, slots, index, merge."""
    from qwen1m.kernels.vs_index import index_widths

    s = chunk_len if chunk_len is not None else num_keys
    pieces = 1 + -(-(num_q - 1) // s)
    kinds = 1 if chunk_len is None else 1 + min(2, max(0, num_keys - 1) // s)
    problems = pieces * kinds
    h, d, e, bm = num_heads, head_dim, element_size, cfg.block_size
    nv0, ns = min(max_vertical, num_keys), min(max_slash, num_keys)
    nv = nv0 + cfg.empty_region_columns
    last = min(cfg.last_q, num_q)
    blocks = -(-min(num_q, s) // bm)
    wb, wc = index_widths(nv, ns, min(num_q, s), num_keys, causal=False, block_m=bm, block_n=bm)
    largest = h * blocks * (wb + wc)

    picks = 24 * pieces * h * (nv + ns) + 16 * problems * (16 + cfg.empty_region_columns)
    estimate = (8 * min(pieces * h * num_keys, max(MAX_SUM_ELEMENTS, h * num_keys)) + pieces * num_keys
                + 3 * pieces * last * h * d * e + 12 * pieces * h * last * (num_keys // 256 + 3)
                + 32 * pieces * h * (nv + ns) + 64 * pieces * (num_keys // 256 + 6))
    slots = kinds * num_q * h * (2 * d * e + 4)
    index = (4 * min(problems * largest, max(MAX_INDEX_ELEMENTS, largest)) + 56 * problems * h * blocks
             + 48 * problems * h * (nv + ns))
    merge = {1: 0, 2: num_q * h * (d * e + 4), 3: num_q * h * (d * (4 + e) + 8)}[kinds]
    return {"picks": picks, "estimate": estimate, "slots": slots, "index": index, "merge": merge}
