"""The problems of a sparse prefill step that are marked dense, attended by the dense kernel's body.

``attention/sparse_batched.py`` decides on the device which (piece, DCA region) problems are dense
enough to be faster with every key. Those run here, at the dense kernel's rate and with its packed
GQA (``kernels/flash_attn._attn_rows``); the sparse kernel (``kernels/sparse_attn.py``) skips them.
Both read one problem table, rows of ``PROB_FIELDS`` int32 (a test checks the two agree).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qwen1m.kernels.flash_attn import _LOG2E, _attn_rows, _default_config
from qwen1m.kernels.fp8_tile import check_fp8_inputs

_PROB_FIELDS = 8  # a problem-table row, as kernels/sparse_attn.py's PROB_FIELDS (a test checks they agree)


# the problem table and the per-step sizes change with every prefill step: not specialised on
@triton.jit(do_not_specialize=["num_m_blocks", "stride_qs", "stride_os", "stride_ls"])
def _flash_attn_problems_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, prob_ptr, qs_ptr, ks_ptr, vs_ptr,
    num_m_blocks, qk_scale,
    stride_qss, stride_qsm, stride_qsh, stride_sn, stride_sh,
    stride_qs, stride_qm, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_os, stride_om, stride_oh, stride_od,
    stride_ls, stride_lh, stride_lm,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    PROB_FIELDS: tl.constexpr, FP8: tl.constexpr,
):
    # grid (row blocks, kv heads, problems); a problem is a row of the sparse kernel's table (q slot,
    # first query row, first key, num_q, num_kv, causal, dense, out slot: kernels/sparse_attn.py).
    # Only problems marked dense whose causal flag is CAUSAL run here; the programs of the others
    # return at once, so the decision (made on the device) needs no host sync.
    prob = prob_ptr + tl.program_id(2) * PROB_FIELDS
    num_q = tl.load(prob + 3)
    is_causal = tl.load(prob + 5) != 0
    mine = tl.load(prob + 6) != 0
    if CAUSAL:
        mine = mine & is_causal
    else:
        mine = mine & (is_causal == 0)
    pid_m = num_m_blocks - 1 - tl.program_id(0)  # heavy tiles first when causal
    if mine & (pid_m * BLOCK_M < num_q * GROUP):
        q_row0 = tl.load(prob + 1).to(tl.int64)
        key_begin = tl.load(prob + 2).to(tl.int64)
        q_base = q_ptr + tl.load(prob).to(tl.int64) * stride_qs + q_row0 * stride_qm
        out_slot = tl.load(prob + 7).to(tl.int64)
        qs_base = qs_ptr + tl.load(prob).to(tl.int64) * stride_qss + q_row0 * stride_qsm  # FP8 only
        _attn_rows(
            q_base, k_ptr + key_begin * stride_kn, v_ptr + key_begin * stride_vn,
            out_ptr + out_slot * stride_os + q_row0 * stride_om, lse_ptr + out_slot * stride_ls + q_row0 * stride_lm,
            qs_base, ks_ptr + key_begin * stride_sn, vs_ptr + key_begin * stride_sn,
            pid_m, tl.program_id(1), num_q, tl.load(prob + 4), qk_scale,
            stride_qm, stride_qh, stride_qd, stride_kn, stride_kh, stride_kd, stride_vn, stride_vh, stride_vd,
            stride_om, stride_oh, stride_od, stride_lh, stride_lm, stride_qsm, stride_qsh, stride_sn, stride_sh,
            GROUP=GROUP, HEAD_DIM=HEAD_DIM, CAUSAL=CAUSAL, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            DOT_PRECISION=DOT_PRECISION, UPCAST_DOT=UPCAST_DOT, FP8=FP8,
        )


def problem_strides(q, k, v, out, lse, scales) -> dict[str, int]:
    """The strides both problem-table kernels (this one and ``sparse_attn``'s) take: q / out [slots,
    tokens, heads, dim], k / v [keys, kv heads, dim], lse [slots, heads, tokens], and with e4m3
    inputs their scales (q's [slots, tokens, heads], k's and v's [keys, kv heads]; else zeros)."""
    qs, ks = (scales[0], scales[1]) if scales is not None else (None, None)
    return dict(
        stride_qss=qs.stride(0) if qs is not None else 0, stride_qsm=qs.stride(1) if qs is not None else 0,
        stride_qsh=qs.stride(2) if qs is not None else 0, stride_sn=ks.stride(0) if ks is not None else 0,
        stride_sh=ks.stride(1) if ks is not None else 0,
        stride_qs=q.stride(0), stride_qm=q.stride(1), stride_qh=q.stride(2), stride_qd=q.stride(3),
        stride_kn=k.stride(0), stride_kh=k.stride(1), stride_kd=k.stride(2),
        stride_vn=v.stride(0), stride_vh=v.stride(1), stride_vd=v.stride(2),
        stride_os=out.stride(0), stride_om=out.stride(1), stride_oh=out.stride(2), stride_od=out.stride(3),
        stride_ls=lse.stride(0), stride_lh=lse.stride(1), stride_lm=lse.stride(2),
    )


def flash_attn_problems(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    problems: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    softmax_scale: float,
    max_num_q: int,
    config: dict[str, int] | None = None,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """The problems of a sparse step's table that are marked dense, attended densely, in place.

    The sparse path decides on the device which (piece, DCA region) problems are dense enough to be
    faster with every key (``attention/sparse_batched.py``). Those run here, at this kernel's rate and
    with its packed GQA, and the sparse kernel skips them: two launches (causal, non-causal), no host
    sync. q: [num_slots, num_tokens, num_heads, head_dim]; k, v: [total_keys, num_kv_heads, head_dim];
    problems: int32 [P, 8] as ``kernels.sparse_attn.vertical_slash_attention_batched`` takes it; out
    [num_out_slots, num_tokens, num_heads, head_dim], lse [num_out_slots, num_heads, num_tokens];
    max_num_q: the largest num_q of the table (host int: the grid). Rows of other problems are left
    as they were. scales: FP8 attention, as ``vertical_slash_attention_batched`` takes them (q, k, v
    e4m3; the problems then run in the FP8 kernel's arithmetic, ``flash_attn_fp8``).
    """
    num_heads, head_dim = q.shape[2], q.shape[3]
    num_kv_heads = k.shape[1]
    if q.dim() != 4 or num_heads % num_kv_heads or k.shape[2] != head_dim or v.shape != k.shape:
        raise ValueError(f"flash_attn_problems: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "do not match.")
    if problems.dim() != 2 or problems.shape[1] != _PROB_FIELDS or problems.dtype != torch.int32:
        raise ValueError(f"flash_attn_problems: problems must be int32 [P, {_PROB_FIELDS}], got "
                         f"{problems.dtype} {tuple(problems.shape)}.")
    fp8 = scales is not None
    if fp8:
        check_fp8_inputs("flash_attn_problems", q, k, v, scales)
    if not problems.shape[0] or max_num_q <= 0:
        return
    group = num_heads // num_kv_heads
    if config is None:
        from qwen1m.kernels.flash_attn_fp8 import _fp8_config

        config = _fp8_config(head_dim, q.device) if fp8 else _default_config(head_dim, q.dtype, q.device)
    qs, ks, vs = scales if fp8 else (q, k, v)  # unused pointers when not fp8
    block_m = config["BLOCK_M"]
    num_m_blocks = triton.cdiv(max_num_q * group, block_m)
    grid = (num_m_blocks, num_kv_heads, problems.shape[0])
    for causal in (True, False):
        _flash_attn_problems_kernel[grid](
            q, k, v, out, lse, problems, qs, ks, vs, num_m_blocks, softmax_scale * _LOG2E,
            **problem_strides(q, k, v, out, lse, scales),
            GROUP=group, HEAD_DIM=head_dim, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=config["BLOCK_N"],
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            UPCAST_DOT=os.environ.get("TRITON_INTERPRET", "0") == "1", PROB_FIELDS=_PROB_FIELDS, FP8=fp8,
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )


__all__ = ["flash_attn_problems", "problem_strides"]
