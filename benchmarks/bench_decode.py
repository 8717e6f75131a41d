"""Decode attention benchmark: split-K paged kernel vs torch SDPA, Qwen2.5-7B-Instruct-1M shapes.

Run on the device:  GIT_COMMIT=$(git rev-parse HEAD) PYTHONPATH=src python3 benchmarks/bench_decode.py
                    [--out DIR] [--quick]
CPU check of the script itself (tiny sizes, Triton interpreter, no timing meaning):
                    PYTHONPATH=src python3 benchmarks/bench_decode.py --cpu-smoke --out /tmp/x
Writes decode.json under --out (default $OUT, else benchmarks/results) and prints a table last.

Sections:
  1. self-check: the kernel against paged_decode_reference (float64) at a small size, bf16 and fp8,
     several split counts; aborts (exit 1) on a mismatch;
  2. a sweep of BLOCK_N / num_warps / num_stages and of num_splits around the default choice
     (skipped with --quick), bf16 cache, batch 1 x 128K and batch 32 x 8K;
  3. time per call (median, triton.testing.do_bench, L2 flushed between calls) at 28 q heads,
     4 kv heads, head_dim 128, block_size 64: batch 1 at 32K / 128K / 1M keys and batch 32 at 8K,
     bf16 and fp8 caches; and the same attention through torch SDPA on a contiguous bf16 copy
     (flash, efficient and cuDNN backends; the 7 query heads of a kv head become 7 query rows);
  4. the DCA decode launch, paged_decode_attention_multi with R = 3 ranges (bf16), same sizes: at
     32K / 128K only the first range is non-empty (as with Qwen2.5-7B-1M's 256K chunks), at 1M all
     three are (chunk DCA_CHUNK keys).
Sections 3 and 4 also time the split-K reduce alone ("reduce ms": _reduce on a workspace of the
launch's shape, L2 flushed, so an upper bound: in the launch the workspace was just written and is
in L2); the split kernel's share is about ms - reduce ms.
Bandwidth = bytes of K + V read / time, bytes = tokens * num_kv_heads * head_dim * 2 (K and V) *
element size, + tokens * num_kv_heads * 2 * 4 for the fp8 scales; compared with the measured
device-to-device copy ceiling (4,266 GB/s on the H200, docs GPU.md).
"""

from __future__ import annotations

import sys

if "--cpu-smoke" in sys.argv:  # must precede the first triton import
    import os

    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import datetime
import functools
import json
import math
import os
import statistics
import time
import traceback

import torch
import torch.nn.functional as F
import triton

from qwen1m.attention.reference import paged_decode_reference
from qwen1m.kernels.paged_decode import _reduce, choose_num_splits, paged_decode_attention, paged_decode_attention_multi

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 28, 4, 128, 64
SCALE = 1.0 / math.sqrt(HEAD_DIM)
COPY_CEILING_GBS = 4266.0  # H200 device-to-device copy, GPU.md (2026-11-29)
FP8 = torch.float8_e4m3fn
BYTES_FORMULA = ("tokens * num_kv_heads * head_dim * 2 * elem_bytes (K and V) "
                 "+ fp8 only: tokens * num_kv_heads * 2 * 4 (scales)")
SWEEP = [  # (BLOCK_N, num_warps, num_stages)
    (64, 4, 3), (64, 4, 2), (64, 4, 4), (64, 8, 3), (32, 4, 4), (128, 4, 2), (128, 8, 2), (128, 8, 3),
]
SPLIT_FACTORS = (0.25, 0.5, 1.0, 2.0)
DCA_CHUNK = 262144 - 8192  # Qwen2.5-7B-Instruct-1M: chunk_size - local_size keys per DCA chunk


def make_case(batch: int, context: int, cache_dtype: torch.dtype, device: str, block_size: int, seed: int = 0):
    """Queries and a paged cache holding batch sequences of `context` keys in shuffled physical blocks."""
    g = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = triton.cdiv(context, block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    # generated in bf16 so a 1M-token cache needs no float32 temporary
    k_cache = torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16)
    k_scale = v_scale = None
    if cache_dtype == FP8:
        k_cache, v_cache = (k_cache * 4).to(FP8), (v_cache * 4).to(FP8)
        k_scale = torch.rand(shape[:3], generator=g, device=device) * 0.05 + 0.01
        v_scale = torch.rand(shape[:3], generator=g, device=device) * 0.05 + 0.01
    perm = torch.randperm(num_blocks, generator=g, device=device).to(torch.int32)
    block_tables = perm.view(batch, blocks_per_seq)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=g, device=device, dtype=torch.bfloat16)
    kv_start = torch.zeros(batch, dtype=torch.int32, device=device)
    kv_end = torch.full((batch,), context, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, block_tables, kv_start, kv_end, k_scale, v_scale


def contiguous_kv(case) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache as dense [batch, num_kv_heads, context, head_dim] bf16 (dequantised for fp8): SDPA's input."""
    q, k_cache, v_cache, block_tables, kv_start, kv_end, k_scale, v_scale = case
    context = int(kv_end[0])
    out = []
    for cache, scale in ((k_cache, k_scale), (v_cache, v_scale)):
        dense = cache[block_tables.long()]  # [batch, blocks_per_seq, block_size, kv_heads, head_dim]
        if scale is not None:
            dense = (dense.float() * scale[block_tables.long()][..., None]).to(torch.bfloat16)
        dense = dense.flatten(1, 2)[:, :context]
        out.append(dense.transpose(1, 2).contiguous())
    return out[0], out[1]


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """GQA decode through SDPA without a K/V copy: the group's query heads are the query rows."""
    batch = q.shape[0]
    group = NUM_HEADS // NUM_KV_HEADS
    out = F.scaled_dot_product_attention(q.view(batch, NUM_KV_HEADS, group, HEAD_DIM), k, v, scale=SCALE)
    return out.reshape(batch, NUM_HEADS, HEAD_DIM)


def kv_bytes(batch: int, context: int, cache_dtype: torch.dtype) -> int:
    elem = torch.empty(0, dtype=cache_dtype).element_size()
    total = batch * context * NUM_KV_HEADS * HEAD_DIM * 2 * elem
    if cache_dtype == FP8:
        total += batch * context * NUM_KV_HEADS * 2 * 4
    return total


def time_ms(fn, device: str) -> float:
    if device == "cuda":
        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()  # interpreter: one warm call, then a median of three (meaningless, only exercises the path)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def torch_decode_lowp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's decode in torch at q's precision: q [heads, dim], k/v [n, kv_heads, dim] in q's dtype."""
    group = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,khd->hk", q, k).float() * SCALE
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[:, None]).to(q.dtype)
    return torch.einsum("hk,khd->hd", probs, v), lse


def self_check(device: str) -> list[dict]:
    """Kernel vs the float64 oracle at a small size; error at most 2x torch's at bf16 (+1e-3), as the tests."""
    rows = []
    # block 16: tiles span blocks (per-key lookups); block 64: one table entry per tile (production)
    for cache_dtype, block_size in ((torch.bfloat16, 16), (torch.bfloat16, 64), (FP8, 16), (FP8, 64)):
        case = list(make_case(3, 300, cache_dtype, device, block_size, seed=11))
        case[4] = torch.tensor([0, 17, 299], dtype=torch.int32, device=device)  # odd starts, one key
        case[5] = torch.tensor([300, 250, 300], dtype=torch.int32, device=device)
        q, k_cache, v_cache, bt, s, e, ks, vs = case
        k64 = k_cache if cache_dtype == FP8 else k_cache.double()
        v64 = v_cache if cache_dtype == FP8 else v_cache.double()
        ref_out, ref_lse = paged_decode_reference(q.double(), k64, v64, bt, s, e, SCALE, ks, vs)
        base_err = base_lse_err = 0.0
        for b in range(q.shape[0]):  # torch at bf16 over the dequantised keys, rounded to bf16
            pos = torch.arange(int(s[b]), int(e[b]), device=device)
            phys, slot = bt[b, pos // block_size].long(), pos % block_size
            k, v = k_cache[phys, slot], v_cache[phys, slot]
            if ks is not None:
                k, v = k.float() * ks[phys, slot][..., None], v.float() * vs[phys, slot][..., None]
            o, lse = torch_decode_lowp(q[b], k.to(q.dtype), v.to(q.dtype))
            base_err = max(base_err, (o.double() - ref_out[b]).abs().max().item())
            base_lse_err = max(base_lse_err, (lse.double() - ref_lse[b]).abs().max().item())
        for num_splits in (1, 4, None):
            out, lse = paged_decode_attention(q, k_cache, v_cache, bt, s, e, SCALE, ks, vs, num_splits)
            err = (out.double() - ref_out).abs().max().item()
            lse_err = (lse.double() - ref_lse).abs().max().item()
            ok = (not out.isnan().any().item() and err <= 2 * base_err + 1e-3
                  and lse_err <= 2 * base_lse_err + 1e-5)
            rows.append(dict(cache=str(cache_dtype), block_size=block_size, num_splits=num_splits, out_err=err,
                             torch_bf16_err=base_err, lse_err=lse_err, torch_lse_err=base_lse_err, ok=ok))
            print(f"self-check {str(cache_dtype):22s} block {block_size:2d} splits={num_splits!s:4s} out err {err:.2e} "
                  f"(torch bf16 {base_err:.2e}) lse err {lse_err:.2e} (torch {base_lse_err:.2e}) "
                  f"{'ok' if ok else 'MISMATCH'}")
    return rows


def sweep(device: str, cases: list[tuple[int, int]]) -> list[dict]:
    rows = []
    for batch, context in cases:
        case = make_case(batch, context, torch.bfloat16, device, BLOCK_SIZE)
        nbytes = kv_bytes(batch, context, torch.bfloat16)
        default_splits = choose_num_splits(batch, NUM_KV_HEADS, case[3].shape[1] * BLOCK_SIZE, case[0].device)
        trials = [(cfg, default_splits) for cfg in SWEEP]
        trials += [(SWEEP[0], max(1, round(default_splits * f))) for f in SPLIT_FACTORS if f != 1.0]
        for (block_n, warps, stages), num_splits in trials:
            cfg = dict(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
            try:
                fn = functools.partial(paged_decode_attention, *case[:6], SCALE, *case[6:], num_splits,
                                       config=cfg)
                ms = time_ms(fn, device)
                row = dict(batch=batch, context=context, num_splits=num_splits, ms=ms, gbs=nbytes / ms / 1e6,
                           **cfg)
            except Exception as exc:  # a config that does not compile (shared memory) is a data point
                row = dict(batch=batch, context=context, num_splits=num_splits, error=repr(exc)[:200], **cfg)
            rows.append(row)
            print("sweep", row)
    return rows


def reduce_ms(batch: int, pieces: int, device: str) -> float:
    """The split-K reduce alone over a workspace of the launch's shape (0 when there is one piece:
    the split kernel then writes the result itself)."""
    if pieces <= 1:
        return 0.0
    part_out = torch.randn(batch, NUM_HEADS, pieces, HEAD_DIM, device=device)
    part_lse = torch.randn(batch, NUM_HEADS, pieces, device=device)
    out_dtype = torch.bfloat16 if device == "cuda" else torch.float32  # as _launch (interpreter: float32)
    out = torch.empty(batch, NUM_HEADS, HEAD_DIM, device=device, dtype=out_dtype)
    lse = torch.empty(batch, NUM_HEADS, device=device)
    return time_ms(functools.partial(_reduce, part_out, part_lse, out, lse), device)


def dca_bounds(context: int, chunk: int, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_start / kv_end [3, batch] of design §2.4 for a sequence of `context` keys, n = (context - 1) // chunk:
    intra [n chunk, context), succ [(n - 1) chunk, n chunk), inter [0, (n - 1) chunk); (0, 0) when absent."""
    n = (context - 1) // chunk
    rows = [(n * chunk, context), ((n - 1) * chunk, n * chunk) if n >= 1 else (0, 0),
            (0, (n - 1) * chunk) if n >= 2 else (0, 0)]
    starts = torch.tensor([[s] * batch for s, _ in rows], dtype=torch.int32, device=device)
    ends = torch.tensor([[e] * batch for _, e in rows], dtype=torch.int32, device=device)
    return starts, ends


def measure_multi(device: str, cases: list[tuple[int, int]], chunk: int) -> list[dict]:
    """paged_decode_attention_multi with R = 3 DCA ranges over the whole context (one query per range)."""
    rows = []
    for batch, context in cases:
        case = make_case(batch, context, torch.bfloat16, device, BLOCK_SIZE)
        q, k_cache, v_cache, block_tables = case[:4]
        q3 = torch.stack([q, q.roll(1, dims=-1), q.roll(2, dims=-1)])  # [3, batch, heads, dim]
        starts, ends = dca_bounds(context, chunk, batch, device)
        num_splits = choose_num_splits(batch, NUM_KV_HEADS, block_tables.shape[1] * BLOCK_SIZE, q.device,
                                       num_ranges=3)
        fn = functools.partial(paged_decode_attention_multi, q3, k_cache, v_cache, block_tables, starts, ends,
                               SCALE)
        ms = time_ms(fn, device)
        nbytes = kv_bytes(batch, context, torch.bfloat16)
        row = dict(batch=batch, context=context, cache="bfloat16", ranges=3,
                   non_empty_ranges=int((ends[:, 0] > starts[:, 0]).sum()), num_splits=num_splits,
                   pieces=3 * num_splits, bytes=nbytes, ms=ms, reduce_ms=reduce_ms(batch, 3 * num_splits, device),
                   gbs=nbytes / ms / 1e6, pct_copy_ceiling=100 * nbytes / ms / 1e6 / COPY_CEILING_GBS)
        rows.append(row)
        print("decode multi", row)
        del case, q3, fn
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def measure(device: str, cases: list[tuple[int, int]]) -> list[dict]:
    rows = []
    for batch, context in cases:
        peer = None
        for cache_dtype in (torch.bfloat16, FP8):
            case = make_case(batch, context, cache_dtype, device, BLOCK_SIZE)
            nbytes = kv_bytes(batch, context, cache_dtype)
            num_splits = choose_num_splits(batch, NUM_KV_HEADS, case[3].shape[1] * BLOCK_SIZE, case[0].device)
            fn = functools.partial(paged_decode_attention, *case[:6], SCALE, *case[6:])
            ms = time_ms(fn, device)
            out, _ = fn()
            row = dict(batch=batch, context=context, cache=str(cache_dtype).replace("torch.", ""),
                       num_splits=num_splits, bytes=nbytes, ms=ms, reduce_ms=reduce_ms(batch, num_splits, device),
                       gbs=nbytes / ms / 1e6, pct_copy_ceiling=100 * nbytes / ms / 1e6 / COPY_CEILING_GBS)
            k, v = contiguous_kv(case)  # bf16 (dequantised for fp8): SDPA cannot read the paged / fp8 cache
            ref = sdpa_decode(case[0], k, v)
            row["max_abs_diff_vs_sdpa"] = (out.float() - ref.float()).abs().max().item()
            if peer is None:  # SDPA on the bf16 copy, timed once per shape
                peer = {}
                peer_bytes = kv_bytes(batch, context, torch.bfloat16)
                backends = [("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
                            ("cudnn", "CUDNN_ATTENTION")] if device == "cuda" else [("math", "MATH")]
                from torch.nn.attention import SDPBackend, sdpa_kernel
                for name, backend in backends:
                    try:
                        with sdpa_kernel(getattr(SDPBackend, backend)):
                            t = time_ms(functools.partial(sdpa_decode, case[0], k, v), device)
                        peer[name] = dict(ms=t, gbs=peer_bytes / t / 1e6)
                    except Exception as exc:  # backend not applicable to this shape / build
                        peer[name] = dict(error=repr(exc)[:200])
                    print(f"sdpa {name} b={batch} ctx={context}: {peer[name]}")
            row["sdpa_bf16_copy"] = peer
            rows.append(row)
            print("decode", {k_: v_ for k_, v_ in row.items() if k_ != "sdpa_bf16_copy"})
            del case, k, v, ref, out, fn
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--quick", action="store_true", help="skip the config / split sweep")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU through TRITON_INTERPRET=1")
    args = ap.parse_args()
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_decode: no CUDA device; use --cpu-smoke to check the script on the CPU.")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "decode.json")
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": os.environ.get("GIT_COMMIT", "unknown"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter smoke run)",
        "torch": torch.__version__, "triton": triton.__version__,
        "shapes": dict(num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, block_size=BLOCK_SIZE),
        "bytes_formula": BYTES_FORMULA, "copy_ceiling_gbs": COPY_CEILING_GBS,
        "timing": "triton.testing.do_bench median, L2 flushed" if device == "cuda" else "perf_counter (smoke)",
    }
    checks = self_check(device)
    results["self_check"] = checks
    if not all(c["ok"] for c in checks):
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)
        sys.exit(f"bench_decode: kernel disagrees with paged_decode_reference (see {path}); not timing it.")

    if device == "cuda":
        cases = [(1, 32768), (1, 131072), (1, 1_000_000), (32, 8192)]
        sweep_cases = [(1, 131072), (32, 8192)]
    else:
        cases, sweep_cases = [(1, 200), (2, 64)], [(1, 200)]
    chunk = DCA_CHUNK if device == "cuda" else 96  # smoke: 200 keys in three ranges, 64 in two
    try:
        if not args.quick:
            results["sweep"] = sweep(device, sweep_cases)
        results["decode"] = measure(device, cases)
        results["dca_chunk"] = chunk
        results["decode_multi"] = measure_multi(device, cases, chunk)
    except Exception:
        results["error"] = traceback.format_exc()
        print(results["error"])
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)

    print(f"\nbytes = {BYTES_FORMULA}; copy ceiling {COPY_CEILING_GBS:.0f} GB/s")
    print(f"{'batch':>5} {'context':>9} {'cache':>13} {'splits':>6} {'ms':>8} {'reduce ms':>9} {'GB/s':>7} "
          f"{'%copy':>6} {'sdpa best':>16} {'ms':>8} {'GB/s':>7}")
    for r in results.get("decode", []):
        ok_peers = {n: p for n, p in r["sdpa_bf16_copy"].items() if "ms" in p}
        best = min(ok_peers, key=lambda n: ok_peers[n]["ms"]) if ok_peers else "none"
        pm = ok_peers[best]["ms"] if ok_peers else float("nan")
        pg = ok_peers[best]["gbs"] if ok_peers else float("nan")
        print(f"{r['batch']:>5} {r['context']:>9} {r['cache']:>13} {r['num_splits']:>6} {r['ms']:>8.4f} "
              f"{r['reduce_ms']:>9.4f} {r['gbs']:>7.0f} {r['pct_copy_ceiling']:>6.1f} {best:>16} {pm:>8.4f} "
              f"{pg:>7.0f}")
    if results.get("decode_multi"):
        print(f"\nDCA launch, R = 3 (chunk {chunk}), bf16:")
        print(f"{'batch':>5} {'context':>9} {'ranges':>6} {'splits':>6} {'pieces':>6} {'ms':>8} {'reduce ms':>9} "
              f"{'GB/s':>7} {'%copy':>6}")
        for r in results["decode_multi"]:
            print(f"{r['batch']:>5} {r['context']:>9} {r['non_empty_ranges']:>6} {r['num_splits']:>6} "
                  f"{r['pieces']:>6} {r['ms']:>8.4f} {r['reduce_ms']:>9.4f} {r['gbs']:>7.0f} "
                  f"{r['pct_copy_ceiling']:>6.1f}")
    print("json:", path)
    if "error" in results:
        sys.exit(1)


if __name__ == "__main__":
    main()
