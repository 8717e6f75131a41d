"""Attention benchmark suite for one H200: dense causal prefill and DCA prefill.

Run on the device:  PYTHONPATH=src python3 benchmarks/bench_attention.py [--out DIR] [--quick]
Writes attention_<date>.json under --out (default $OUT or benchmarks/results) and prints a table last.

Sections:
  1. correctness of every implementation against a float64 reference on windows of rows;
  2. a config sweep of our Triton kernel (BLOCK_M / BLOCK_N / num_warps / num_stages);
  3. dense causal prefill TFLOP/s at 8K, 32K, 128K for Qwen2.5-7B-Instruct-1M shapes
     (28 q heads, 4 kv heads, head_dim 128, bf16): Triton, SDPA flash, SDPA cuDNN, FlexAttention;
  4. other call shapes the dispatcher in qwen1m.attention.ops must decide (non-causal, few queries);
  5. DCA prefill at 512K and 1M (chunk_size 262144, local_size 8192) vs dense causal.
FLOPs of a causal prefill of N tokens: 4 * N^2 * head_dim * num_heads / 2 (two matmuls of 2 FLOPs
per multiply-add, half of the N x N scores under the mask). Other shapes: 4 * (query, key) pairs
computed * head_dim * num_heads (num_q * num_kv when non-causal).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import traceback

import torch
import triton

from qwen1m.attention.ops import get_attend_fn, get_merge_fn, sdpa_attend
from qwen1m.attention.reference import attend
from qwen1m.kernels.flash_attn import _default_config, flash_attn, flash_attn_with_config

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 28, 4, 128
SCALE = 1.0 / math.sqrt(HEAD_DIM)
SWEEP = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3),
    (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4), (256, 64, 8, 2), (128, 128, 4, 2),
]
FLOAT_FORMULA = "causal: 4*N^2*head_dim*num_heads/2; non-causal: 4*num_q*num_kv*head_dim*num_heads"


def causal_flops(n: int) -> float:
    return 4.0 * n * n * HEAD_DIM * NUM_HEADS / 2


def rand_qkv(num_q: int, num_kv: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(num_q, NUM_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(num_kv, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(num_kv, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v


def window_errors(out, lse, q, k, v, *, causal: bool, rows: int = 16) -> dict[str, float]:
    """Rel. error of out and max abs error of lse vs a float64 reference, on 3 windows of query rows."""
    num_q, num_kv = q.shape[0], k.shape[0]
    errs, lse_errs = [], []
    for start in sorted({0, num_q // 2, max(0, num_q - rows)}):
        end = min(start + rows, num_q)
        lim = end + num_kv - num_q if causal else num_kv  # bottom-right: these rows see keys < lim
        ro, rl = attend(q[start:end].double(), k[:lim].double(), v[:lim].double(), softmax_scale=SCALE,
                        causal=causal)
        o = out[start:end].double()
        errs.append(((o - ro).norm() / ro.norm()).item())
        lse_errs.append((lse[:, start:end].double() - rl).abs().max().item())
    return {"out_rel_err": max(errs), "lse_max_abs_err": max(lse_errs)}


def bench_ms(fn, rep_ms: int = 400) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def event_ms(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def make_flex(n: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    try:  # _compile builds the block mask without an N x N intermediate (128 GiB at 128K)
        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, n, n, device="cuda",
                                 _compile=True)
    except TypeError:
        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, n, n, device="cuda")

    def run(q, k, v):
        qb, kb, vb = (t.permute(1, 0, 2).unsqueeze(0) for t in (q, k, v))
        res = compiled(qb, kb, vb, block_mask=mask, scale=SCALE, enable_gqa=True, return_lse=True)
        return res[0][0].permute(1, 0, 2), res[1][0]

    return run


def impls(best_cfg):
    out = {
        "triton": lambda q, k, v, c: flash_attn_with_config(
            q, k, v, softmax_scale=SCALE, causal=c, config=best_cfg),
        "dispatch": lambda q, k, v, c: get_attend_fn(torch.device("cuda"))(
            q, k, v, softmax_scale=SCALE, causal=c),
        "sdpa_flash": lambda q, k, v, c: sdpa_attend(q, k, v, softmax_scale=SCALE, causal=c, backend="flash"),
        "sdpa_cudnn": lambda q, k, v, c: sdpa_attend(q, k, v, softmax_scale=SCALE, causal=c, backend="cudnn"),
        "sdpa_flash_native": lambda q, k, v, c: sdpa_attend(
            q, k, v, softmax_scale=SCALE, causal=c, backend="flash", gqa="native"),
        "sdpa_cudnn_native": lambda q, k, v, c: sdpa_attend(
            q, k, v, softmax_scale=SCALE, causal=c, backend="cudnn", gqa="native"),
    }
    return out


def save(results: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--quick", action="store_true", help="skip the sweep and the 1M DCA section")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--dca-triton", action="store_true",
                    help="also time DCA with the Triton kernel alone at 512K")
    args = ap.parse_args()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    path = os.path.join(args.out, f"attention_{date}.json")
    res: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": os.environ.get("QWEN1M_COMMIT", "unknown"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__,
        "shapes": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
                   "dtype": "bf16"},
        "flop_formula": FLOAT_FORMULA,
        "correctness": {}, "sweep": {}, "dense": {}, "shapes_other": {}, "dca": {},
    }
    print(f"FLOP formula: {FLOAT_FORMULA}", flush=True)

    # 2. sweep first: later sections use the best config
    best_cfg = _default_config(HEAD_DIM, torch.bfloat16, torch.device("cuda"))
    if not (args.quick or args.no_sweep):
        scores = {}
        for n in (8192, 32768):
            q, k, v = rand_qkv(n, n, seed=1)
            for bm, bn, w, s in SWEEP:
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
                key = f"{bm}x{bn}_w{w}_s{s}"
                try:
                    run = functools.partial(flash_attn_with_config, q, k, v, softmax_scale=SCALE, causal=True,
                                            config=cfg)
                    ms = bench_ms(run, rep_ms=200)
                    tf = causal_flops(n) / ms / 1e9
                except Exception as e:  # out of shared memory / registers: record and move on
                    tf = None
                    res["sweep"].setdefault("errors", {})[key] = repr(e)[:200]
                res["sweep"].setdefault(str(n), {})[key] = tf
                if tf is not None:
                    scores.setdefault(key, []).append(tf)
                print(f"sweep N={n} {key}: {tf}", flush=True)
            del q, k, v
        full = {key: sum(v) for key, v in scores.items() if len(v) == 2}
        best_key = max(full, key=full.get)
        bm, bn, w, s = next(c for c in SWEEP if f"{c[0]}x{c[1]}_w{c[2]}_s{c[3]}" == best_key)
        best_cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
    res["triton_config"] = best_cfg
    print("triton config:", best_cfg, flush=True)
    save(res, path)

    # 1. + 3. correctness then speed, dense causal
    fns = impls(best_cfg)
    for n in (8192, 32768, 131072):
        q, k, v = rand_qkv(n, n, seed=2)
        cur = dict(fns)
        try:
            cur["flex"] = (lambda run: (lambda q, k, v, c: run(q, k, v)))(make_flex(n))
        except Exception as e:
            res["correctness"][f"flex_{n}"] = repr(e)[:300]
        row = {}
        for name, fn in cur.items():
            try:
                o, lse = fn(q, k, v, True)
                torch.cuda.synchronize()
                err = window_errors(o, lse, q, k, v, causal=True)
                res["correctness"][f"{name}_{n}"] = err
                if not err["out_rel_err"] < 2e-2:
                    print(f"{name} N={n}: WRONG {err}", flush=True)
                    row[name] = None
                    continue
                ms = bench_ms(functools.partial(fn, q, k, v, True))
                row[name] = {"ms": ms, "tflops": causal_flops(n) / ms / 1e9, **err}
                print(f"dense N={n} {name}: {ms:.2f} ms {row[name]['tflops']:.0f} TFLOP/s err {err}",
                      flush=True)
            except Exception as e:
                res["correctness"][f"{name}_{n}"] = repr(e)[:300]
                print(f"{name} N={n} failed: {repr(e)[:300]}", flush=True)
                row[name] = None
        res["dense"][str(n)] = row
        save(res, path)
        del q, k, v
        torch.cuda.empty_cache()

    # 4. shapes the dispatcher sees: DCA succ/inter (non-causal, num_q < num_kv), decode-like, short causal
    for num_q, num_kv, causal in ((4096, 65536, False), (32768, 131072, False), (256, 131072, False),
                                  (64, 131072, False), (16, 131072, False), (1, 131072, False),
                                  (2048, 2048, True), (4096, 65536, True)):
        q, k, v = rand_qkv(num_q, num_kv, seed=3)
        # exact count of (query, key) pairs computed: bottom-right causal rows see num_kv - num_q + t + 1 keys
        pairs = num_q * (num_kv - num_q) + num_q * (num_q + 1) / 2 if causal else num_q * num_kv
        flops = 4.0 * pairs * HEAD_DIM * NUM_HEADS
        row = {}
        names = ["triton", "dispatch"]
        if not causal or num_q == num_kv:
            names += ["sdpa_cudnn", "sdpa_cudnn_native", "sdpa_flash", "sdpa_flash_native"]
        for name in names:
            fn = fns[name]
            try:
                o, lse = fn(q, k, v, causal)
                err = window_errors(o, lse, q, k, v, causal=causal)
                ms = bench_ms(functools.partial(fn, q, k, v, causal), rep_ms=200)
                row[name] = {"ms": ms, "tflops": flops / ms / 1e9, **err}
            except Exception as e:
                row[name] = repr(e)[:300]
        key = f"q{num_q}_kv{num_kv}_{'causal' if causal else 'full'}"
        res["shapes_other"][key] = row
        print(key, {x: (r["ms"], r["out_rel_err"]) if isinstance(r, dict) else r for x, r in row.items()},
              flush=True)
        save(res, path)
        del q, k, v

    # 5. DCA prefill vs dense causal at the same length
    try:
        from qwen1m.attention.dca import dca_attention
        from qwen1m.config import DCAConfig

        dca = DCAConfig(chunk_size=262144, local_size=8192)
        attend_fn, merge_fn = get_attend_fn(torch.device("cuda")), get_merge_fn(torch.device("cuda"))
        triton_fn = lambda q, k, v, *, softmax_scale, causal: flash_attn(  # noqa: E731
            q, k, v, softmax_scale=softmax_scale, causal=causal)
        for n in ((524288,) if args.quick else (524288, 1048576)):
            q, k, v = rand_qkv(n, n, seed=4)
            q_succ, q_inter = torch.randn_like(q), torch.randn_like(q)
            repeats = 2
            variants = {"dispatch": attend_fn}
            if n == 524288 and args.dca_triton:
                variants["triton"] = triton_fn
            row = {}
            for vname, afn in variants.items():
                dense = functools.partial(afn, q, k, v, softmax_scale=SCALE, causal=True)
                dcaf = functools.partial(dca_attention, q, q_succ, q_inter, k, v, begin=0, dca=dca,
                                         softmax_scale=SCALE, attend_fn=afn, merge_fn=merge_fn)
                if n == 524288:
                    dense(), dcaf()  # warm-up: compile, cuDNN plans
                    torch.cuda.synchronize()
                td, tc = event_ms(dense, repeats), event_ms(dcaf, repeats)
                o, lse = dense()
                err = window_errors(o, lse, q, k, v, causal=True, rows=8)
                del o, lse
                row[vname] = {"dense_ms": td, "dca_ms": tc, "ratio": min(tc) / min(td),
                              "dense_tflops": causal_flops(n) / min(td) / 1e9, "dense_check": err}
                print(f"DCA N={n} {vname}: dense {min(td):.0f} ms, dca {min(tc):.0f} ms, "
                      f"ratio {row[vname]['ratio']:.3f} err {err}", flush=True)
            res["dca"][str(n)] = row
            save(res, path)
            del q, k, v, q_succ, q_inter
            torch.cuda.empty_cache()
    except Exception:
        res["dca"]["error"] = traceback.format_exc()[-1500:]
        print(res["dca"]["error"], flush=True)
    save(res, path)

    # table last
    print("\n== dense causal prefill, TFLOP/s (" + FLOAT_FORMULA.split(";")[0] + ")")
    names = ["triton", "sdpa_flash", "sdpa_cudnn", "sdpa_flash_native", "sdpa_cudnn_native", "flex"]
    print(f"{'N':>8} " + " ".join(f"{x:>18}" for x in names))
    for n, row in res["dense"].items():
        cells = [f"{row[x]['tflops']:.0f}" if isinstance(row.get(x), dict) else "-" for x in names]
        print(f"{n:>8} " + " ".join(f"{c:>18}" for c in cells))
    other = ["triton", "dispatch", "sdpa_cudnn", "sdpa_cudnn_native", "sdpa_flash", "sdpa_flash_native"]
    print("== other shapes, ms (" + " / ".join(other) + "; cudnn/flash: GQA as batch or native)")
    for key, row in res["shapes_other"].items():
        cells = [f"{row[x]['ms']:.3f}" if isinstance(row.get(x), dict) else "-" for x in other]
        print(f"{key:>24} " + " / ".join(cells))
    print("== DCA vs dense causal (chunk 262144, local 8192)")
    for n, row in res["dca"].items():
        if isinstance(row, dict):
            for vname, r in row.items():
                print(f"{n:>8} {vname:>9}: dense {min(r['dense_ms']):.0f} ms  dca {min(r['dca_ms']):.0f} ms  "
                      f"overhead {100 * (r['ratio'] - 1):+.1f}%")
    print("json:", path)


if __name__ == "__main__":
    main()
