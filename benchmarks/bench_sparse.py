"""Vertical-slash sparse prefill vs dense attention, one H200, Qwen2.5-7B-Instruct-1M attention shapes.

Run on the device:  PYTHONPATH=src python3 benchmarks/bench_sparse.py [--out DIR] [--sizes 131072,...]
Check here:         PYTHONPATH=src python3 benchmarks/bench_sparse.py --cpu-smoke   (TRITON_INTERPRET=1)
Writes sparse.json under --out (default $OUT or benchmarks/results) and prints a table last.

The chunked-prefill situation (design §3.4): one chunk of 32768 queries at the END of a context of N keys
(N = 128K, 512K, 1M), causal (bottom-right), 28 q / 4 kv heads, head_dim 128, bf16. Every head uses the
base budget of the shipped config, (vertical 1000, slash 6096) ("uniform" budgets), or per-head budgets
drawn from the 7B config's statistics (design §3.5; "7b-mix": the 28 heads of layer 0 of
``bench_engine.sparse_config("7b-mix")``), with random-but-realistic indices:
key columns 0..29 (attention sinks) and diagonals 0..99 (local window) always in, the other columns
uniform, the other diagonals drawn two ways (one row each): "loguniform" (P(d) ~ 1/d: scores decay
with distance, the realistic case) and "uniform" (the worst case for the 64-key rounding). Steps:
  1. self-check: the kernel vs ``sparse_attend_reference`` in float64 on a small problem, then on the
     first and last query blocks of every size (one kv group of heads); any mismatch aborts;
  2. times: both index builders (the PyTorch ``build_vertical_slash_index``, ``index_ms``, and the Triton
     ``build_vertical_slash_index_triton`` that CUDA runs use, ``index_triton_ms``; its index must be
     exactly equal, else the run aborts), the sparse kernel, our dense kernel (``flash_attn``, same q,
     same N keys, causal), and torch cuDNN SDPA (its causal mask is top-left aligned, so: non-causal over
     the N - 32768 earlier keys + causal over the chunk's own keys + LSE merge); "x incl idx" adds the
     Triton builder's time (``speedup_vs_dense_incl_torch_index``: the PyTorch builder's);
  3. density: query-key pairs the sparse kernel computes under the causal mask / all causal pairs
     ("tile density" also counts the masked positions inside the tiles it runs).
TFLOP/s are effective: 4 * pairs * head_dim * num_heads / time (two matmuls, 2 FLOPs per multiply-add),
with pairs = the causal pairs each method computes (dense: all of them).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

if "--cpu-smoke" in sys.argv:  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402

from qwen1m.attention.fp8 import quantize  # noqa: E402
from qwen1m.attention.vertical_slash import (  # noqa: E402
    VerticalSlashIndex,
    build_vertical_slash_index,
    sparse_attend_reference,
    vertical_slash_mask,
)
from qwen1m.kernels.flash_attn import flash_attn  # noqa: E402
from qwen1m.kernels.sparse_attn import vertical_slash_attention  # noqa: E402
from qwen1m.kernels.vs_index import build_vertical_slash_index_triton  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 28, 4, 128  # Qwen2.5-7B-Instruct-1M
CHUNK = 32768  # queries per prefill chunk
SIZES = (131072, 524288, 1048576)
VERTICAL, SLASH = 1000, 6096  # the shipped config's base budget per head (design §3.5)
SINKS, LOCAL = 30, 100  # always-kept key columns and diagonals (design §3.2)
SLASH_DISTS = ("loguniform", "uniform")  # see realistic_indices
BLOCK = 64  # block_m = block_n of the index, as in vLLM / MInference
FLOP_FORMULA = "4 * pairs * head_dim * num_heads; dense causal pairs = num_q * (N - num_q) + num_q * (num_q + 1) / 2"


def _sample_without_replacement(num_heads, low, high, count, inv_weight, g, device):
    """[num_heads, count] distinct integers of [low, high), P(x) proportional to 1 / inv_weight(x)
    (exponential race: the largest log(u) * inv_weight win)."""
    x = torch.arange(low, high, device=device, dtype=torch.float64)
    race = torch.rand(num_heads, high - low, generator=g, device=device, dtype=torch.float64).log() * inv_weight(x)
    return race.topk(count, dim=-1).indices + low


def realistic_indices(num_heads: int, num_q: int, num_kv: int, nv: int, ns: int, device, seed: int = 0,
                      slash_dist: str = "loguniform"):
    """v_idx [num_heads, nv], s_idx [num_heads, ns]: sinks and local diagonals always, the rest random.

    Columns: uniform over the other keys (which keys matter depends on the content). Slashes:
    "loguniform" draws diagonal d with probability ~ 1/d, since diagonal scores decay with distance
    (most chosen slashes are recent, a few reach far back); "uniform" spreads them evenly, the worst
    case for the 64-key block rounding.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    nv, ns = min(nv, num_kv), min(ns, num_kv)
    sinks, local = min(SINKS, nv), min(LOCAL, ns)
    flat = lambda x: torch.ones_like(x)  # noqa: E731
    cols = _sample_without_replacement(num_heads, sinks, num_kv, nv - sinks, flat, g, device)
    inv_weight = (lambda x: x) if slash_dist == "loguniform" else flat
    diags = _sample_without_replacement(num_heads, local, num_kv, ns - local, inv_weight, g, device)
    v_idx = torch.cat([torch.arange(sinks, device=device).expand(num_heads, -1), cols], dim=1)
    s_idx = torch.cat([torch.arange(local, device=device).expand(num_heads, -1), diags], dim=1)
    return v_idx, s_idx


def per_head_budgets(v_idx: torch.Tensor, s_idx: torch.Tensor, nv: list[int], ns: list[int]):
    """Cut head h's picks to its own budget (nv[h] columns, ns[h] slashes), padding with -1, which the
    index builders drop. The picks of ``realistic_indices`` come sinks / local diagonals first, then in
    random order, so the first n of a row are a valid draw of n."""
    cols = torch.arange(v_idx.shape[1], device=v_idx.device)
    diags = torch.arange(s_idx.shape[1], device=s_idx.device)
    keep_v = cols[None, :] < torch.tensor(nv, device=v_idx.device)[:, None]
    keep_s = diags[None, :] < torch.tensor(ns, device=s_idx.device)[:, None]
    return torch.where(keep_v, v_idx, -1), torch.where(keep_s, s_idx, -1)


def mix_budgets(num_heads: int, scale: float = 1.0) -> tuple[list[int], list[int]]:
    """Layer 0's per-head budgets of the 7B mix (benchmarks/bench_engine.sparse_config), scaled."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_engine import sparse_config

    cfg = sparse_config("7b-mix", 1, num_heads)
    nv, ns = cfg.budgets(0)
    return [max(1, round(v * scale)) for v in nv], [max(1, round(x * scale)) for x in ns]


def causal_pairs(num_q: int, num_kv: int) -> int:
    """Query-key pairs under the bottom-right causal mask, per head."""
    offset = num_kv - num_q
    return sum(max(0, min(num_kv, i + offset + 1)) for i in range(num_q))


def _ramp(t: torch.Tensor, block_n: int) -> torch.Tensor:
    """sum_{x=1..t} min(block_n, x) for t >= 0."""
    t = t.clamp(min=0)
    small = t * (t + 1) // 2
    big = block_n * (block_n + 1) // 2 + (t - block_n) * block_n
    return torch.where(t <= block_n, small, big)


def computed_pairs(index: VerticalSlashIndex) -> tuple[int, int]:
    """(causal pairs the kernel computes, pairs of the tiles it runs), summed over heads.

    Exact for the causal chunk-at-the-end case (num_kv >= num_q): row i of a dense block at a sees keys
    [a, min(a + block_n, i + offset + 1)), a closed-form ramp over the block's consecutive rows.
    """
    num_q, num_kv, bm, bn = index.num_q, index.num_kv, index.block_m, index.block_n
    offset = num_kv - num_q
    nb = index.block_count.shape[1]
    starts = torch.arange(nb, device=index.block_count.device, dtype=torch.int64) * bm
    rows = (starts + bm).clamp(max=num_q) - starts  # [nb]
    first_lim = starts + offset + 1  # keys < first_lim visible to the block's first row
    pairs = tiles = 0
    for h in range(index.num_heads):  # one head at a time: [nb, max_blocks] int64
        off = index.block_offset[h].long()
        used = torch.arange(off.shape[1], device=off.device) < index.block_count[h, :, None]
        x0 = first_lim[:, None] - off  # row r of the block sees min(bn, x0 + r) keys of the block
        block_pairs = _ramp(x0 + rows[:, None] - 1, bn) - _ramp(x0 - 1, bn)
        pairs += int(torch.where(used, block_pairs, 0).sum())
        cols = index.column_index[h].long()
        used = torch.arange(cols.shape[1], device=cols.device) < index.column_count[h, :, None]
        col_rows = (first_lim[:, None] + rows[:, None] - 1 - cols).clamp(0, None).minimum(rows[:, None])
        pairs += int(torch.where(used, col_rows, 0).sum())
        n_col_tiles = (index.column_count[h].long() + bn - 1) // bn
        tiles += int(((index.block_count[h].long() + n_col_tiles) * bn * rows).sum())
    return pairs, tiles


def torch_lowp(q, k, v, mask, scale):
    """Masked attention in torch at q's precision (scores, probabilities, output rounded to q.dtype):
    the error the kernel may double (design §4.8)."""
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # check only: small
    scores = torch.einsum("qhd,khd->hqk", q, kr).float() * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None]).to(q.dtype)
    return torch.einsum("hqk,khd->qhd", probs, vr), lse


def check_kernel(q, k, v, index: VerticalSlashIndex, blocks: list[int], heads: int, scale: float) -> dict:
    """Max errors of the kernel on some query blocks and the first ``heads`` heads (rounded to whole kv
    groups) vs float64; allowed: 2x the error of the same maths in torch at q's precision + atol."""
    group = q.shape[1] // k.shape[1]
    heads = max(group, heads // group * group)
    out, lse = vertical_slash_attention(q, k, v, index, softmax_scale=scale, causal=True)
    worst = {"out_err": 0.0, "out_bound": 0.0, "lse_err": 0.0, "lse_bound": 0.0}
    bm, num_q, num_kv = index.block_m, index.num_q, index.num_kv
    for b in blocks:
        start, end = b * bm, min(b * bm + bm, num_q)
        lim = end + num_kv - num_q  # causal: the block's rows see keys < lim
        sub = dataclasses.replace(
            index, num_q=end - start, num_kv=lim,
            block_count=index.block_count[:heads, b : b + 1], block_offset=index.block_offset[:heads, b : b + 1],
            column_count=index.column_count[:heads, b : b + 1], column_index=index.column_index[:heads, b : b + 1])
        qs, ks, vs = q[start:end, :heads], k[:lim, : heads // group], v[:lim, : heads // group]
        ref_out, ref_lse = sparse_attend_reference(qs.double(), ks.double(), vs.double(), sub,
                                                   softmax_scale=scale, causal=True)
        low_out, low_lse = torch_lowp(qs, ks, vs, vertical_slash_mask(sub, end - start, lim, True), scale)
        ok = torch.isfinite(ref_lse)
        if not torch.equal(torch.isfinite(lse[:heads, start:end]), ok):
            raise SystemExit(f"self-check failed: rows without keys differ in query block {b}")
        if not ok.any():
            continue
        rows = ok.transpose(0, 1)
        o = out[start:end, :heads].double()
        worst["out_err"] = max(worst["out_err"], (o - ref_out)[rows].abs().max().item())
        worst["out_bound"] = max(worst["out_bound"],
                                 2 * (low_out.double() - ref_out)[rows].abs().max().item() + 1e-3)
        worst["lse_err"] = max(worst["lse_err"], (lse[:heads, start:end].double() - ref_lse)[ok].abs().max().item())
        worst["lse_bound"] = max(worst["lse_bound"], 2 * (low_lse.double() - ref_lse)[ok].abs().max().item() + 1e-5)
        if worst["out_err"] > worst["out_bound"] or worst["lse_err"] > worst["lse_bound"]:
            raise SystemExit(f"self-check failed in query block {b}: {worst}")
    return worst


def check_same_index(ref: VerticalSlashIndex, out: VerticalSlashIndex) -> None:
    """The Triton index equals the PyTorch one: counts, and entries within the counts (the padding and
    the padded widths may differ)."""
    if not (torch.equal(ref.block_count, out.block_count) and torch.equal(ref.column_count, out.column_count)):
        raise SystemExit("self-check failed: the Triton index builder's counts differ")
    for entries, counts in (("block_offset", "block_count"), ("column_index", "column_count")):
        a, b, n = getattr(ref, entries), getattr(out, entries), getattr(ref, counts)
        used = int(n.max()) if n.numel() else 0
        valid = torch.arange(used, device=n.device) < n[..., None]
        if used > b.shape[-1] or not torch.equal(torch.where(valid, a[..., :used], 0),
                                                 torch.where(valid, b[..., :used], 0)):
            raise SystemExit(f"self-check failed: the Triton index builder's {entries} differs")


def timer(device: torch.device):
    if device.type == "cuda":
        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    def cpu_ms(fn):
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return cpu_ms


def sdpa_chunk(q, k, v, scale):
    """Causal chunk at the end of N keys with cuDNN SDPA (top-left causal only): prefix + square + merge."""
    from qwen1m.attention.ops import get_merge_fn, sdpa_attend

    num_q, num_kv = q.shape[0], k.shape[0]
    merge = get_merge_fn(q.device)

    def run():
        square = sdpa_attend(q, k[num_kv - num_q:], v[num_kv - num_q:], softmax_scale=scale, causal=True,
                             backend="cudnn", gqa="native")
        if num_kv == num_q:
            return square
        prefix = sdpa_attend(q, k[: num_kv - num_q], v[: num_kv - num_q], softmax_scale=scale, causal=False,
                             backend="cudnn", gqa="native")
        return merge([prefix, square])

    return run


def bench_size(n: int, chunk: int, block: int, nv: int, ns: int, head_dim: int, device, ms, g,
               smoke: bool, budget_kinds: tuple[str, ...] = ("uniform",)) -> list[dict]:
    """Rows of one context length N (the chunk's queries at the end): one per budget kind and slash
    distribution."""
    scale = head_dim**-0.5
    q = torch.randn(chunk, NUM_HEADS, head_dim, generator=g, device=device, dtype=torch.bfloat16)
    k = torch.randn(n, NUM_KV_HEADS, head_dim, generator=g, device=device, dtype=torch.bfloat16)
    v = torch.randn(n, NUM_KV_HEADS, head_dim, generator=g, device=device, dtype=torch.bfloat16)
    dense_pairs = NUM_HEADS * causal_pairs(chunk, n)
    flops_per_pair = 4.0 * head_dim  # pairs and dense_pairs are summed over the heads already
    dense_ms = ms(lambda: flash_attn(q, k, v, softmax_scale=scale, causal=True))
    cudnn_ms, cudnn_error = None, None
    if device.type == "cuda":
        try:
            cudnn_ms = ms(sdpa_chunk(q, k, v, scale))
        except Exception as exc:  # cuDNN missing or refusing the shape: report, do not abort
            cudnn_error = f"{type(exc).__name__}: {exc}"[:300]
    out = torch.empty_like(q)
    lse = torch.empty(NUM_HEADS, chunk, dtype=torch.float32, device=device)
    # attention_dtype="fp8": the same problems in e4m3 (V token-minor, as attention/fp8.py makes it)
    q8, k8, v8 = quantize(q), quantize(k), quantize(v, token_minor=device.type == "cuda")
    rows = []
    for kind, dist in [(kind, dist) for kind in budget_kinds for dist in SLASH_DISTS]:
        if kind == "7b-mix":
            head_v, head_s = mix_budgets(NUM_HEADS, nv / VERTICAL if smoke else 1.0)
            v_idx, s_idx = realistic_indices(NUM_HEADS, chunk, n, max(head_v), max(head_s), device, seed=n,
                                             slash_dist=dist)
            v_idx, s_idx = per_head_budgets(v_idx, s_idx, head_v, head_s)
        else:
            v_idx, s_idx = realistic_indices(NUM_HEADS, chunk, n, nv, ns, device, seed=n, slash_dist=dist)

        def build(v_idx=v_idx, s_idx=s_idx):
            return build_vertical_slash_index(v_idx, s_idx, chunk, n, causal=True, block_m=block, block_n=block)

        def build_triton(v_idx=v_idx, s_idx=s_idx):
            return build_vertical_slash_index_triton(v_idx, s_idx, chunk, n, causal=True, block_m=block,
                                                     block_n=block)

        index = build()
        check_same_index(index, build_triton())  # 1c. the Triton builder: exactly the same index
        # 1b. first and last query blocks of the real size, one kv group of heads
        errs = check_kernel(q, k, v, index, [0, index.block_count.shape[1] - 1], NUM_HEADS // NUM_KV_HEADS, scale)
        print(f"self-check N={n} {kind} {dist} ok: {errs}", flush=True)
        pairs, tile_pairs = computed_pairs(index)
        if smoke:  # the closed form against the dense mask
            assert pairs == int(vertical_slash_mask(index, chunk, n, True).sum()), "computed_pairs is wrong"
        row = {"N": n, "budgets": kind, "slash_dist": dist, "density": pairs / dense_pairs,
               "tile_density": tile_pairs / dense_pairs,
               "mean_blocks": index.block_count.float().mean().item(),
               "mean_columns": index.column_count.float().mean().item(), "self_check": errs,
               "dense_ms": dense_ms, "sdpa_cudnn_ms": cudnn_ms}
        if cudnn_error:
            row["sdpa_cudnn_error"] = cudnn_error
        row["index_ms"] = ms(build)
        row["index_triton_ms"] = ms(build_triton)
        row["index_speedup"] = row["index_ms"] / row["index_triton_ms"]
        row["sparse_ms"] = ms(lambda index=index: vertical_slash_attention(
            q, k, v, index, softmax_scale=scale, causal=True, out=out, lse=lse))
        row["sparse_tflops_eff"] = flops_per_pair * pairs / row["sparse_ms"] / 1e9
        row["dense_tflops"] = flops_per_pair * dense_pairs / dense_ms / 1e9
        # the rate per computed pair against our dense kernel's and cuDNN's (issue target: >= 0.8x ours)
        row["pair_rate_vs_dense"] = row["sparse_tflops_eff"] / row["dense_tflops"]
        if cudnn_ms:
            row["pair_rate_vs_cudnn"] = row["sparse_tflops_eff"] / (flops_per_pair * dense_pairs / cudnn_ms / 1e9)
        # the same kernel with every tile masked (before clear tiles ran unmasked), in the same run
        row["sparse_ms_all_masked"] = ms(lambda index=index: vertical_slash_attention(
            q, k, v, index, softmax_scale=scale, causal=True, out=out, lse=lse, config={"split_masks": False}))
        try:  # FP8 inputs, the same index: its time beside bf16's (attention_dtype="fp8")
            row["sparse_fp8_ms"] = ms(lambda index=index: vertical_slash_attention(
                q8.values, k8.values, v8.values, index, softmax_scale=scale, causal=True, out=out, lse=lse,
                scales=(q8.scale, k8.scale, v8.scale)))
            row["fp8_speedup_vs_bf16_sparse"] = row["sparse_ms"] / row["sparse_fp8_ms"]
        except Exception as exc:  # report, do not lose the bf16 rows
            row["sparse_fp8_error"] = f"{type(exc).__name__}: {exc}"[:300]
        row["speedup_vs_dense"] = dense_ms / row["sparse_ms"]
        # the Triton builder is the one used on CUDA (sparse_prefill._region_index)
        row["speedup_vs_dense_incl_index"] = dense_ms / (row["sparse_ms"] + row["index_triton_ms"])
        row["speedup_vs_dense_incl_torch_index"] = dense_ms / (row["sparse_ms"] + row["index_ms"])
        rows.append(row)
        print(row, flush=True)
        del index
    return rows


SWEEP = [dict(num_warps=w, num_stages=st, heads_first=hf) for hf in (False, True)
         for w, st in ((4, 3), (4, 2), (4, 4), (8, 2), (8, 3))] + [dict(split_masks=False)]


def sweep(n: int, chunk: int, block: int, nv: int, ns: int, head_dim: int, device, ms, g, configs) -> list[dict]:
    """The sparse kernel's launch configurations (warps, stages, grid order) at one size, uniform
    budgets, log-uniform slashes; every configuration's result is checked equal to the default's."""
    scale = head_dim**-0.5
    q = torch.randn(chunk, NUM_HEADS, head_dim, generator=g, device=device, dtype=torch.bfloat16)
    k = torch.randn(n, NUM_KV_HEADS, head_dim, generator=g, device=device, dtype=torch.bfloat16)
    v = torch.randn(n, NUM_KV_HEADS, head_dim, generator=g, device=device, dtype=torch.bfloat16)
    v_idx, s_idx = realistic_indices(NUM_HEADS, chunk, n, nv, ns, device, seed=n, slash_dist="loguniform")
    index = build_vertical_slash_index_triton(v_idx, s_idx, chunk, n, causal=True, block_m=block, block_n=block) \
        if device.type == "cuda" else build_vertical_slash_index(v_idx, s_idx, chunk, n, causal=True,
                                                                 block_m=block, block_n=block)
    pairs, _ = computed_pairs(index)
    want, _ = vertical_slash_attention(q, k, v, index, softmax_scale=scale, causal=True)
    rows = []
    for config in configs:
        try:
            got, _ = vertical_slash_attention(q, k, v, index, softmax_scale=scale, causal=True, config=config)
            same = bool(torch.equal(got, want))
            t = ms(lambda config=config: vertical_slash_attention(q, k, v, index, softmax_scale=scale,
                                                                  causal=True, config=config))
            row = dict(N=n, **config, ms=t, tflops_eff=4.0 * head_dim * pairs / t / 1e9, same_result=same)
        except Exception as exc:  # e.g. out of shared memory: a data point, not an abort
            row = dict(N=n, **config, error=f"{type(exc).__name__}: {exc}"[:200])
        rows.append(row)
        print("sweep", row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="context lengths N, comma separated")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--budgets", default="uniform,7b-mix",
                    help="'uniform' (every head at (1000, 6096)) and/or '7b-mix' (design §3.5 per-head budgets)")
    ap.add_argument("--sweep", type=int, default=0,
                    help="also time the sparse kernel's launch configurations at this N (0: no sweep)")
    args = ap.parse_args()
    budget_kinds = tuple(b for b in args.budgets.split(",") if b)
    if not budget_kinds or set(budget_kinds) - {"uniform", "7b-mix"}:
        raise SystemExit(f"--budgets takes 'uniform' and/or '7b-mix', got {args.budgets!r}.")
    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    # smoke: 16-row blocks so that 64 queries span several, budgets scaled down with the sizes
    chunk, block, nv, ns = (64, 16, 40, 120) if smoke else (CHUNK, BLOCK, VERTICAL, SLASH)
    sizes = [160, 300] if smoke else [int(s) for s in args.sizes.split(",")]
    head_dim = 32 if smoke else HEAD_DIM
    scale = head_dim**-0.5
    ms = timer(device)
    res: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": os.environ.get("GIT_COMMIT", "unknown"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (TRITON_INTERPRET=1)",
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "shape": dict(num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=head_dim, dtype="bfloat16",
                      num_q=chunk, vertical=nv, slash=ns, block=block),
        "flop_formula": FLOP_FORMULA, "rows": [],
    }

    # 1a. self-check on a small problem, every query block, all heads
    g = torch.Generator(device=device).manual_seed(0)
    small_q, small_kv = (40, 100) if smoke else (512, 4096)
    q = torch.randn(small_q, NUM_HEADS, head_dim, generator=g, device=device, dtype=torch.bfloat16)
    k = torch.randn(small_kv, NUM_KV_HEADS, head_dim, generator=g, device=device, dtype=torch.bfloat16)
    v = torch.randn(small_kv, NUM_KV_HEADS, head_dim, generator=g, device=device, dtype=torch.bfloat16)
    v_idx, s_idx = realistic_indices(NUM_HEADS, small_q, small_kv, nv // 10 + SINKS if not smoke else nv,
                                     ns // 10 + LOCAL if not smoke else ns, device)
    index = build_vertical_slash_index(v_idx, s_idx, small_q, small_kv, causal=True, block_m=block, block_n=block)
    res["self_check_small"] = check_kernel(q, k, v, index, list(range(index.block_count.shape[1])), NUM_HEADS,
                                         scale)
    print("self-check (small) ok:", res["self_check_small"], flush=True)

    for n in sizes:
        res["rows"] += bench_size(n, chunk, block, nv, ns, head_dim, device, ms, g, smoke, budget_kinds)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.sweep:
        configs = SWEEP if not smoke else [dict(num_warps=4, num_stages=1, heads_first=hf) for hf in (False, True)]
        res["sweep"] = sweep(args.sweep if not smoke else 300, chunk, block, nv, ns, head_dim, device, ms, g, configs)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sparse.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1, default=str)

    print(f"\n== vertical-slash sparse prefill: {chunk} causal queries at the end of N keys, "
          f"budgets {'/'.join(budget_kinds)} (uniform: v {nv}, s {ns} per head), {res['device']}; "
          f"FLOPs = {FLOP_FORMULA}")
    print(f"{'N':>8} {'budgets':>8} {'slashes':>10} {'density':>8} {'tiles':>7} {'idx torch':>9} {'idx triton':>10} "
          f"{'sparse ms':>10} {'dense ms':>9} "
          f"{'cudnn ms':>9} {'x dense':>8} {'x incl idx':>10} {'eff TF/s':>9} {'dense TF/s':>10} {'rate':>5} "
          f"{'masked ms':>9}")
    for r in res["rows"]:
        cudnn = f"{r['sdpa_cudnn_ms']:9.2f}" if r["sdpa_cudnn_ms"] is not None else f"{'n/a':>9}"
        print(f"{r['N']:>8} {r['budgets']:>8} {r['slash_dist']:>10} {r['density']:8.4f} {r['tile_density']:7.4f} "
              f"{r['index_ms']:9.2f} "
              f"{r['index_triton_ms']:10.3f} "
              f"{r['sparse_ms']:10.2f} {r['dense_ms']:9.2f} {cudnn} {r['speedup_vs_dense']:8.2f} "
              f"{r['speedup_vs_dense_incl_index']:10.2f} {r['sparse_tflops_eff']:9.1f} {r['dense_tflops']:10.1f} "
              f"{r['pair_rate_vs_dense']:5.2f} {r['sparse_ms_all_masked']:9.2f}")
    for r in res.get("sweep", []):
        print(f"sweep N={r['N']} warps {r['num_warps']} stages {r['num_stages']} heads_first {r['heads_first']!s:5}: "
              + (f"{r['ms']:.2f} ms, {r['tflops_eff']:.1f} TFLOP/s, same result {r['same_result']}" if "ms" in r
                 else r["error"]))
    print("json:", path)


if __name__ == "__main__":
    main()
