"""The vertical-slash block index: what an index builder produces and the sparse attention kernels read.

A leaf module of data types (no qwen1m imports): the PyTorch builder and oracles
(``attention.vertical_slash``), the Triton builder (``kernels.vs_index``) and the attention kernels
(``kernels.sparse_attn``) all use these types, so kernels/ need not import attention/. The coordinates
are explained in ``attention/vertical_slash.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class VerticalSlashIndex:
    """Per head and query block, the dense key blocks and single key columns a query block reads."""

    block_count: torch.Tensor  # [num_heads, num_m_blocks] int32: dense key blocks of each query block
    block_offset: torch.Tensor  # [num_heads, num_m_blocks, max_blocks] int32: first key, ascending
    column_count: torch.Tensor  # [num_heads, num_m_blocks] int32: single columns of each query block
    column_index: torch.Tensor  # [num_heads, num_m_blocks, max_cols] int32: key index, ascending
    num_q: int  # queries the index was built for
    num_kv: int  # keys the index was built for
    causal: bool  # whether columns past each block's last visible key were dropped
    block_m: int  # query rows per block
    block_n: int  # keys per dense block

    @property
    def num_heads(self) -> int:
        return self.block_count.shape[0]


@dataclass(slots=True)
class BatchedVSIndex:
    """The indices of several problems (e.g. the DCA regions of the pieces of one prefill step) in one
    set of tensors, padded to the widest problem; rows past a problem's own blocks have counts 0."""

    block_count: torch.Tensor  # [num_problems, num_heads, num_m_blocks] int32
    block_offset: torch.Tensor  # [num_problems, num_heads, num_m_blocks, max_blocks] int32
    column_count: torch.Tensor  # [num_problems, num_heads, num_m_blocks] int32
    column_index: torch.Tensor  # [num_problems, num_heads, num_m_blocks, max_cols] int32
    problems: list[tuple[int, int, bool]]  # (num_q, num_kv, causal) per problem, host ints
    block_m: int
    block_n: int

    def problem(self, p: int) -> VerticalSlashIndex:
        """Problem p as a ``VerticalSlashIndex`` (views; its own query blocks only)."""
        num_q, num_kv, causal = self.problems[p]
        nb = -(-num_q // self.block_m)
        return VerticalSlashIndex(self.block_count[p, :, :nb], self.block_offset[p, :, :nb],
                                  self.column_count[p, :, :nb], self.column_index[p, :, :nb],
                                  num_q=num_q, num_kv=num_kv, causal=causal, block_m=self.block_m,
                                  block_n=self.block_n)


def check_index_args(who: str, v_idx, s_idx, num_q: int, num_kv: int, block_m: int, block_n: int) -> None:
    """The argument checks every index builder shares (``who`` names the builder in the message)."""
    if v_idx.dim() != 2 or s_idx.dim() != 2 or v_idx.shape[0] != s_idx.shape[0]:
        raise ValueError(
            f"{who} expects v_idx [num_heads, nv] and s_idx [num_heads, ns], "
            f"got {tuple(v_idx.shape)} and {tuple(s_idx.shape)}."
        )
    if block_m < 1 or block_n < 1 or num_q < 0 or num_kv < 0:
        raise ValueError(f"block_m {block_m} and block_n {block_n} must be >= 1, num_q {num_q} and "
                         f"num_kv {num_kv} >= 0.")
