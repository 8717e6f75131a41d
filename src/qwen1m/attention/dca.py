"""Dual Chunk Attention (design §2.2-§2.4): the attention math, independent of any model or cache.

The sequence is cut into DCA chunks of s = c - w tokens. Keys are rotated once at p' = p mod s; each
query comes in three rotations (``rotate_for_dca`` in ``dca_rope.py`` builds them), one per region of
keys it reads. Queries x keys for c = 8, w = 3, s = 5 (the paper's Figure 2 sizes), 13 tokens,
the last prefill chunk being tokens [11, 13):

                 keys j ->
                 chunk 0    chunk 1    chunk 2
                 0 1 2 3 4  5 6 7 8 9  10 11 12
    query  0     a
           1     a a
           ...
           5     S S S S S  a
           6     S S S S S  a a
           ...
           10    I I I I I  S S S S S  a
           11    I I I I I  S S S S S  b  a
           12    I I I I I  S S S S S  b  a  a

    a  intra, causal block       q_intra = p'            r = i' - j'        (true distance)
    b  intra, non-causal prefix  q_intra = p'            r = i' - j'
    S  succ  (previous chunk)    q_succ  = min(p'+s, c)  r = min(i'+s, c) - j'  (exact iff i' <= w)
    I  inter (older chunks)      q_inter = c             r = c - j'

We follow the released vLLM convention (clamp at c: q_succ = min(p'+s, c), q_inter = c), not the
paper figure's DCA-paper convention that clamps at c - 1; the released model was served with vLLM's.

Queries are walked in *pieces* that never cross a DCA chunk boundary (design §2.3): a piece starting at
``piece_begin`` lies in the chunk [chunk_begin, chunk_begin + s), chunk_begin = (piece_begin // s) * s,
and ends at min(chunk_begin + s, total). Prefill in one go, a prefill chunk that straddles DCA chunks,
and decode (one query) all go through the same loop. Every region, for every piece, is one call of
``attend_region`` (written once); the parts are combined by the LSE merge.

Design choice, intra split: the intra region of a piece is attended as a non-causal prefix
[chunk_begin, piece_begin) (rows ``b`` above, present when a prefill chunk started mid-DCA-chunk)
plus a square causal block [piece_begin, piece_end) (the ``a`` triangle). Then every causal call
has num_q == num_kv, where top-left and bottom-right causal masks coincide, so SDPA backends that
only offer top-left causal (cuDNN, PyTorch flash) can serve every call on GPU. The price is one
extra call, only for pieces that start mid-chunk. A single-query piece (decode) needs no mask at
all, so its intra region stays one non-causal call over [chunk_begin, piece_end): decode makes at
most three calls, the ranges of design §2.4.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from qwen1m.attention.reference import attend, merge_attn_states
from qwen1m.config import DCAConfig

AttendFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
MergeFn = Callable[[list[tuple[torch.Tensor, torch.Tensor]]], tuple[torch.Tensor, torch.Tensor]]


class Region(NamedTuple):
    """One query rotation attending one contiguous key range."""

    query: str  # "intra" | "succ" | "inter": which rotated query copy reads this range
    key_begin: int  # absolute token positions, half-open
    key_end: int
    causal: bool  # True only for the square intra block (num_q == num_kv)


def dca_pieces(begin: int, total: int, s: int) -> Iterator[tuple[int, int, int]]:
    """(piece_begin, piece_end, chunk_begin) for queries [begin, total): pieces never cross a DCA
    chunk boundary; chunk_begin is the start of the piece's chunk (vLLM's prev_end, design §2.3)."""
    piece_begin = begin
    while piece_begin < total:
        chunk_begin = (piece_begin // s) * s
        piece_end = min(chunk_begin + s, total)
        yield piece_begin, piece_end, chunk_begin
        piece_begin = piece_end


def intra_regions(chunk_begin: int, piece_begin: int, piece_end: int) -> list[Region]:
    """The piece's own chunk [chunk_begin, piece_end) as calls whose causal ones are square: the piece
    causal over itself, plus the earlier keys of its chunk non-causal (torch's SDPA kernels mask top-left)."""
    if piece_end - piece_begin == 1:
        return [Region("intra", chunk_begin, piece_end, False)]  # one query: a mask changes nothing
    regions = [Region("intra", piece_begin, piece_end, True)]
    if piece_begin > chunk_begin:
        regions.append(Region("intra", chunk_begin, piece_begin, False))
    return regions


def _regions(chunk_begin: int, piece_begin: int, piece_end: int, s: int) -> list[Region]:
    """The key ranges a piece [piece_begin, piece_end) of one DCA chunk reads (design §2.3, §2.4)."""
    regions = intra_regions(chunk_begin, piece_begin, piece_end)
    if chunk_begin >= s:
        regions.append(Region("succ", chunk_begin - s, chunk_begin, False))
    if chunk_begin >= 2 * s:
        regions.append(Region("inter", 0, chunk_begin - s, False))
    return regions


def attend_region(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    region: Region,
    *,
    softmax_scale: float,
    attend_fn: AttendFn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend q [n, num_heads, head_dim] to the region's key range -> (out like q, lse [num_heads, n]).

    Slicing the first dim keeps k, v views of the caller's cache: no K/V bytes are copied here.
    """
    return attend_fn(
        q,
        k[region.key_begin : region.key_end],
        v[region.key_begin : region.key_end],
        softmax_scale=softmax_scale,
        causal=region.causal,
    )


def dca_attention(
    q_intra: torch.Tensor,
    q_succ: torch.Tensor | None,
    q_inter: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    begin: int,
    dca: DCAConfig,
    softmax_scale: float,
    attend_fn: AttendFn = attend,
    merge_fn: MergeFn = merge_attn_states,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DCA attention of the queries of positions [begin, begin + num_q) over all keys so far.

    q_intra, q_succ, q_inter: [num_q, num_heads, head_dim], the same queries rotated at the three DCA
      positions (and YaRN-scaled through ``softmax_scale`` = m / sqrt(head_dim) by the caller).
      q_succ / q_inter may be None when no query reaches past its first / second chunk
      (``dca_rope.needed_rotations``); a region that needs a missing copy is an error.
    k, v: [begin + num_q, num_kv_heads, head_dim], every key/value of the sequence, keys rotated at
      p mod s and multiplied by m; may be strided views of a cache (only ever sliced, never copied).
    attend_fn: ``reference.attend``'s contract; called only on contiguous key ranges; every causal call
      is square (num_q == num_kv), see the module docstring.
    Returns out [num_q, num_heads, head_dim] in q's dtype and lse [num_heads, num_q] float32.
    """
    num_q, num_heads, head_dim = q_intra.shape
    total = begin + num_q
    if num_q < 1 or begin < 0:
        raise ValueError(f"dca_attention needs num_q >= 1 and begin >= 0, got num_q={num_q}, begin={begin}.")
    for name, t in (("q_succ", q_succ), ("q_inter", q_inter)):
        if t is not None and t.shape != q_intra.shape:
            raise ValueError(
                f"dca_attention: {name} {tuple(t.shape)} must have q_intra's shape {tuple(q_intra.shape)}."
            )
    last_chunk = (total - 1) // dca.chunk_len
    if (q_succ is None and last_chunk >= 1) or (q_inter is None and last_chunk >= 2):
        raise ValueError(
            f"dca_attention: queries up to position {total - 1} reach DCA chunk {last_chunk}, which needs "
            f"q_succ{' and q_inter' if last_chunk >= 2 else ''} (got None)."
        )
    if k.shape[0] != total or v.shape[0] != total:
        raise ValueError(
            f"dca_attention: k and v must hold begin + num_q = {total} tokens, "
            f"got {k.shape[0]} and {v.shape[0]}."
        )
    s = dca.chunk_len
    queries = {"intra": q_intra, "succ": q_succ, "inter": q_inter}
    out = torch.empty_like(q_intra)
    lse = torch.empty(num_heads, num_q, dtype=torch.float32, device=q_intra.device)
    for piece_begin, piece_end, chunk_begin in dca_pieces(begin, total, s):
        rows = slice(piece_begin - begin, piece_end - begin)
        parts = [
            attend_region(queries[r.query][rows], k, v, r, softmax_scale=softmax_scale, attend_fn=attend_fn)
            for r in _regions(chunk_begin, piece_begin, piece_end, s)
        ]
        piece_out, piece_lse = merge_fn(parts)
        out[rows] = piece_out
        lse[:, rows] = piece_lse
    return out, lse
