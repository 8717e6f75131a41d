"""Pick the fastest correct attention implementation for a device (``reference.attend``'s contract).

CPU: the pure-PyTorch reference. CUDA: our Triton kernel (``qwen1m.kernels.flash_attn``) or torch's
cuDNN / flash SDPA kernels where they apply and were measured faster. Kernels are imported lazily so
``import qwen1m`` works without triton.

torch's SDPA kernels, as used here (checked against the reference on the H200, see
benchmarks/bench_attention.py):
- their causal mask is top-left aligned, so they only serve causal calls with num_q == num_kv, and
  non-causal calls;
- GQA without copying K/V per query head, two ways, both checked: "native" passes K/V views with
  num_kv_heads heads ([1, num_kv_heads, num_kv, head_dim]) and both kernels map query heads to kv
  heads themselves (used: as fast or faster; any internal copy would be in the timings, and 1M
  tokens ran); "batch" *views* q as [group, num_kv_heads, num_q, head_dim] (query head
  h = kv_head * group + g, so g has stride head_dim) and K/V as [group (stride 0), num_kv_heads,
  num_kv, head_dim], so every batch entry reads the same K/V memory;
- LSE comes back as [batch, heads, num_q] in natural log, the reference's units (lse error vs the
  float64 reference ~2e-6, like our kernel's).

The choice per call shape is made from the H200 measurements written next to ``_CUDNN_MIN_NUM_Q``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qwen1m.attention.reference import attend, merge_attn_states

AttendFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
MergeFn = Callable[[list[tuple[torch.Tensor, torch.Tensor]]], tuple[torch.Tensor, torch.Tensor]]

_SDPA_DTYPES = (torch.float16, torch.bfloat16)
_SDPA_HEAD_DIMS = (128,)  # the head size measured and checked on the H200
# Non-causal calls with 2..255 queries go to the flash kernel, others to cuDNN (figures below).
_CUDNN_MIN_NUM_Q = 256

# Measured 2026-11-29 on one H200 (torch 2.11, triton 3.6, bf16, head_dim 128, 28 q / 4 kv heads),
# benchmarks/results/attention_2026-11-29.json; every path checked against a float64 reference
# (out rel. error ~2.3e-3 for all, the bf16 rounding of the output).
#   causal, num_q == num_kv, TFLOP/s at 8K / 32K / 128K:
#     cuDNN (GQA native) 558 / 592 / 559   cuDNN (group as batch) 554 / 597 / 531
#     Triton (ours)      470 / 495 / 490   FlexAttention 393 / 428 / 416   flash 313 / 340 / 330
#   non-causal, ms, over 131072 keys (65536 for the first):
#     num_q:          4096(64K)   32768     256      64      16      1
#     cuDNN native       6.28    105.7    1.485   1.498   1.499   0.080
#     flash native      11.23    177.1    1.670   0.434   0.426   0.094
#     Triton             7.83    125.6    2.108   2.121   2.111   2.317
#   causal with num_q < num_kv (torch's masks are top-left): Triton only, e.g. 7.65 ms at 4096 x 64K.
# So: cuDNN for causal square calls, for non-causal calls with 1 or >= 256 queries; flash for
# 2..255 queries; Triton for everything else (bottom-right causal chunks, fp32, other head sizes).
# Dense causal prefill at 1M tokens through this dispatch: 15.8 s per layer (498 TFLOP/s); Triton
# alone 17.0 s; DCA (chunk 262144, local 8192) at 1M: 14.5 s, i.e. 8% faster than dense.


def sdpa_applicable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> bool:
    """Whether torch's SDPA kernels compute exactly ``attend`` for this call (mask alignment, dtypes)."""
    num_q, _, head_dim = q.shape
    num_kv = k.shape[0]
    return (
        q.is_cuda
        and q.dtype in _SDPA_DTYPES
        and head_dim in _SDPA_HEAD_DIMS
        and num_q > 0
        and num_kv > 0
        and (not causal or num_q == num_kv)
        and q.stride(-1) == 1
        and k.stride(-1) == 1
        and v.stride(-1) == 1
    )


def _group_as_batch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q viewed as [group, num_kv_heads, num_q, head_dim]; k, v as [group (stride 0), num_kv_heads,
    num_kv, head_dim]."""
    num_q, num_heads, head_dim = q.shape
    num_kv, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    qb = q.as_strided(
        (group, num_kv_heads, num_q, head_dim),
        (q.stride(1), group * q.stride(1), q.stride(0), q.stride(2)),
        q.storage_offset(),
    )
    kb = k.permute(1, 0, 2).unsqueeze(0).expand(group, num_kv_heads, num_kv, head_dim)
    vb = v.permute(1, 0, 2).unsqueeze(0).expand(group, num_kv_heads, num_kv, head_dim)
    return qb, kb, vb


def sdpa_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool,
    backend: str = "cudnn",
    gqa: str = "batch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend`` through torch's cuDNN or flash SDPA kernel; only where ``sdpa_applicable``.

    gqa: "batch" puts the query group in the batch dimension over stride-0 K/V (no copy);
    "native" passes K/V with num_kv_heads heads and lets the kernel map the heads.
    """
    num_q, num_heads, head_dim = q.shape
    num_kv, num_kv_heads, _ = k.shape
    if gqa == "batch":
        qb, kb, vb = _group_as_batch(q, k, v)
    else:
        qb = q.permute(1, 0, 2).unsqueeze(0)
        kb = k.permute(1, 0, 2).unsqueeze(0)
        vb = v.permute(1, 0, 2).unsqueeze(0)
    if backend == "cudnn":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            qb, kb, vb, None, True, 0.0, causal, False, scale=softmax_scale
        )
    elif backend == "flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            qb, kb, vb, 0.0, causal, False, scale=softmax_scale
        )
    else:
        raise ValueError(f"sdpa_attend: backend must be 'cudnn' or 'flash', got {backend!r}.")
    ob, lse_b = res[0], res[1]
    lse_b = lse_b.reshape(qb.shape[0], qb.shape[1], -1)[..., :num_q]  # drop any trailing size-1 / padding
    if gqa == "batch":  # [group, num_kv_heads, ...] -> query head kv_head * group + g
        out = ob.permute(2, 1, 0, 3).reshape(num_q, num_heads, head_dim)
        lse = lse_b.permute(1, 0, 2).reshape(num_heads, num_q)
    else:
        out = ob[0].permute(1, 0, 2).contiguous()  # a no-op when the kernel kept q's layout
        lse = lse_b[0]
    return out, lse.float()


def _triton_attend(q, k, v, *, softmax_scale: float, causal: bool):
    from qwen1m.kernels.flash_attn import flash_attn

    return flash_attn(q, k, v, softmax_scale=softmax_scale, causal=causal)


def _cuda_attend(q, k, v, *, softmax_scale: float, causal: bool):
    """The measured choice per call (figures above); every branch computes ``attend`` exactly."""
    num_q, num_kv = q.shape[0], k.shape[0]
    if causal and num_q == 1 and num_kv >= 1:  # bottom-right: the one query sees every key
        causal = False
    if sdpa_applicable(q, k, v, causal=causal):
        backend = "cudnn" if causal or num_q == 1 or num_q >= _CUDNN_MIN_NUM_Q else "flash"
        return sdpa_attend(q, k, v, softmax_scale=softmax_scale, causal=causal, backend=backend, gqa="native")
    return _triton_attend(q, k, v, softmax_scale=softmax_scale, causal=causal)


def _cpu_attend(q, k, v, *, softmax_scale: float, causal: bool):
    """torch's CPU flash attention (it returns the LSE too) where it computes ``attend`` exactly:
    float32/bfloat16, non-empty, causal only when square (its mask is top-left aligned). About 12x
    faster than the reference on 2 cores (3968 x 3968 causal, 4/2 heads, head_dim 64: 0.06 s vs
    0.75 s, 2026-11-29). GQA: the query group is the batch over stride-0 expanded K/V (no copy)."""
    num_q, num_heads, head_dim = q.shape
    num_kv, num_kv_heads, _ = k.shape
    if causal and num_q == 1:
        causal = False
    if (q.dtype not in (torch.float32, torch.bfloat16) or num_q == 0 or num_kv == 0
            or (causal and num_q != num_kv) or k.dtype != q.dtype):
        return attend(q, k, v, softmax_scale=softmax_scale, causal=causal)
    group = num_heads // num_kv_heads
    qb = q.view(num_q, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [kv_heads, group, num_q, D]
    kb = k.permute(1, 0, 2)[:, None].expand(num_kv_heads, group, num_kv, head_dim)
    vb = v.permute(1, 0, 2)[:, None].expand(num_kv_heads, group, num_kv, head_dim)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qb, kb, vb, 0.0, causal,
                                                                           scale=softmax_scale)[:2]
    return (out.permute(2, 0, 1, 3).reshape(num_q, num_heads, head_dim),
            lse.reshape(num_heads, num_q).float())


def get_attend_fn(device: torch.device) -> AttendFn:
    """The fastest correct ``attend`` for ``device`` (reference contract, see module docstring)."""
    if torch.device(device).type != "cuda":
        return _cpu_attend if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") else attend
    return _cuda_attend


def get_merge_fn(device: torch.device) -> MergeFn:
    """The LSE merge for ``device``: the Triton kernel on CUDA, the reference elsewhere."""
    if torch.device(device).type != "cuda":
        return merge_attn_states
    from qwen1m.kernels.merge import merge_attn_states as triton_merge

    return triton_merge


__all__ = ["get_attend_fn", "get_merge_fn", "sdpa_applicable", "sdpa_attend"]
