"""Pure-PyTorch attention oracles: the ground truth every kernel and backend is tested against.

``attend`` is one attention call that also returns the log-sum-exp of each row, which is what lets
partial results over disjoint key ranges be merged exactly (``merge_attn_states``). It runs on any
device, computes in float32 (or float64 for float64 inputs), handles GQA by grouping query heads
instead of copying K/V, and processes queries in blocks so memory stays bounded: at most about
``max_scores`` score elements exist at once, so 64K tokens run on a CPU without an N x N matrix.
"""

from __future__ import annotations

import torch

# Score elements alive at once in ``attend``: 2^22 float32 = 16 MiB of scores. Larger blocks bring no
# speed on a CPU and cost a page fault storm: allocations past glibc's mmap threshold (<= 32 MiB) are
# returned to the OS on free and faulted in again, zeroed, on the next call.
_MAX_SCORES = 1 << 22
# exp() of arguments below this underflows to a subnormal; CPU vector exp falls to a scalar path there
# (about 100x slower, measured), so such terms (< 2e-35 relative to the row max) are set to exactly 0.
_EXP_FLOOR = -80.0


def exp_floor(x: torch.Tensor) -> torch.Tensor:
    """exp(x) for x <= 0 with results below exp(-80) flushed to 0 (and exp(-inf) = 0 as usual)."""
    return torch.exp(x.clamp_min(_EXP_FLOOR)).masked_fill(x < _EXP_FLOOR, 0.0)


def logsumexp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """torch.logsumexp through ``exp_floor``; rows of all -inf give -inf."""
    m = x.amax(dim, keepdim=True)
    safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (safe + torch.log(exp_floor(x - safe).sum(dim, keepdim=True))).squeeze(dim)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool,
    max_scores: int = _MAX_SCORES,
    round_probs=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of every query over every key, returning the output and its LSE.

    q: [num_q, num_heads, head_dim]; k, v: [num_kv, num_kv_heads, head_dim], num_heads a multiple
    of num_kv_heads (GQA: query head h reads kv head h // (num_heads // num_kv_heads)).
    causal: bottom-right aligned, i.e. query t sees keys j <= t + (num_kv - num_q), which is the
    FlashAttention convention when a chunk of queries comes after already cached keys.
    Returns out [num_q, num_heads, head_dim] in q's dtype and lse [num_heads, num_q] in float32
    (natural log of the sum of exp(score)). A row that sees no key gets out = 0 and lse = -inf.
    round_probs: emulates a kernel that rounds the probabilities before P.V (``attention/fp8.py``): a
    function of probs [num_kv_heads, group, n, num_kv] returning them rounded; the LSE is unaffected.
    """
    num_q, num_heads, head_dim = q.shape
    num_kv, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(num_q, num_heads, head_dim, dtype=acc_dtype, device=q.device)
    lse = torch.full((num_heads, num_q), float("-inf"), dtype=acc_dtype, device=q.device)
    if num_q == 0 or num_kv == 0:
        return out.to(q.dtype), (lse if acc_dtype == torch.float64 else lse.float())
    kf = k.to(acc_dtype).transpose(0, 1)  # [num_kv_heads, num_kv, head_dim]
    vf = v.to(acc_dtype).transpose(0, 1)
    block = max(1, max_scores // max(1, num_kv * num_heads))
    offset = num_kv - num_q  # causal: query t sees keys <= t + offset
    key_idx = torch.arange(num_kv, device=q.device)
    for start in range(0, num_q, block):
        end = min(start + block, num_q)
        # [num_kv_heads, group, n, head_dim]: query heads grouped under their kv head, no K/V copy
        qb = q[start:end].to(acc_dtype).view(end - start, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        scores = torch.einsum("hgnd,hkd->hgnk", qb, kf) * softmax_scale
        if causal:
            q_idx = torch.arange(start, end, device=q.device) + offset
            scores = scores.masked_fill(key_idx[None, :] > q_idx[:, None], float("-inf"))
        row_lse = logsumexp(scores, dim=-1)  # [num_kv_heads, group, n]
        safe = torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))
        probs = exp_floor(scores - safe[..., None])
        if round_probs is not None:
            probs = round_probs(probs)
        ob = torch.einsum("hgnk,hkd->hgnd", probs, vf)
        out[start:end] = ob.permute(2, 0, 1, 3).reshape(end - start, num_heads, head_dim)
        lse[:, start:end] = row_lse.reshape(num_heads, end - start)
    return out.to(q.dtype), lse.float() if acc_dtype != torch.float64 else lse


def merge_attn_states(
    parts: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax over the union of disjoint key sets from per-part (out, lse).

    parts: list of (out [num_q, num_heads, head_dim], lse [num_heads, num_q]).
    out = sum_p w_p * out_p with w_p = exp(lse_p - LSE), LSE = logsumexp_p lse_p (design §2.3).
    Parts with lse = -inf (no keys) get weight 0; if every part is empty the row is 0 / -inf.
    """
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse for _, lse in parts]).float()  # [P, num_heads, num_q]
    total = logsumexp(lses, dim=0)
    safe_total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    weights = exp_floor(lses - safe_total[None])  # exp(-inf) = 0 for empty parts
    out = torch.zeros_like(parts[0][0], dtype=torch.float32)
    for (o, _), w in zip(parts, weights):
        out += o.float() * w.transpose(0, 1)[..., None]
    return out.to(parts[0][0].dtype), total


def paged_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    softmax_scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle of ``qwen1m.kernels.paged_decode.paged_decode_attention``: one query per sequence, paged keys.

    q: [batch, num_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    (any float dtype or float8_e4m3fn); block_tables: [batch, max_blocks_per_seq] int, logical token t
    of sequence b at k_cache[block_tables[b, t // block_size], t % block_size]; kv_start, kv_end:
    [batch], the key range [kv_start, kv_end). k_scale, v_scale: [num_blocks, block_size, num_kv_heads]
    float32, keys = k_cache.float() * k_scale (fp8 caches). num_splits: accepted for the kernel's
    signature; the result does not depend on it.
    Returns out [batch, num_heads, head_dim] in q's dtype and lse [batch, num_heads] (float32, float64
    for float64 q); an empty range gives out = 0, lse = -inf.
    """
    del num_splits
    batch, num_heads, head_dim = q.shape
    block_size = k_cache.shape[1]
    outs, lses = [], []
    for b in range(batch):
        start, end = int(kv_start[b]), int(kv_end[b])
        pos = torch.arange(start, max(start, end), device=q.device)
        blocks = block_tables[b, pos // block_size].long()
        slots = pos % block_size
        k, v = k_cache[blocks, slots], v_cache[blocks, slots]  # [n, num_kv_heads, head_dim]
        if k.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            k, v = k.float(), v.float()  # float8: widen before any arithmetic
        if k_scale is not None:
            k = k.float() * k_scale[blocks, slots][..., None]
        if v_scale is not None:
            v = v.float() * v_scale[blocks, slots][..., None]
        out, lse = attend(q[b : b + 1], k, v, softmax_scale=softmax_scale, causal=False)
        outs.append(out[0])
        lses.append(lse[:, 0])
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if batch == 0:
        return q.new_zeros(0, num_heads, head_dim), torch.zeros(0, num_heads, dtype=lse_dtype, device=q.device)
    return torch.stack(outs), torch.stack(lses).to(lse_dtype)
