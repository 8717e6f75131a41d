"""FP8 (e4m3) attention against our bf16 kernel and cuDNN bf16, 7B-1M shapes, one GPU, one run.

Run on the device:  PYTHONPATH=src python3 benchmarks/bench_attention_fp8.py [--sizes 8192,32768,131072]
    [--chunk-kv 1048576] [--sweep]
Writes attention_fp8_<date>.json under $OUT (or benchmarks/results) and prints a table last.

Rows (28 q heads, 4 kv heads, head_dim 128, random inputs):
- causal prefill of N tokens (num_q = num_kv = N): our bf16 Triton kernel, cuDNN bf16 (the best
  peer kernel on this machine, as torch ships it), our FP8 kernel on inputs already in e4m3 (the FP8
  KV cache's layout: V head_dim-minor), the same with V token-minor (the layout FP8 tensor cores
  read P.V from), and FP8 with its quantisation of q, k, v included (``attention.fp8.fp8_attend``:
  what a 16-bit KV cache costs);
- with --chunk-kv M: one 32K-query prefill chunk over M keys, non-causal (a late chunk of a 1M
  prompt, DCA's inter region): the same implementations.
Each row gives ms, TFLOP/s and the ratios fp8 / triton and fp8 / cudnn, and the output's error on
three windows of rows against a float64 reference on the *unquantised* inputs (so FP8's whole error
shows) beside bf16's. --sweep times the FP8 kernel's tile configurations at the first size.
FLOPs: causal 4 * N^2 * head_dim * heads / 2; non-causal 4 * num_q * num_kv * head_dim * heads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
from bench_attention import HEAD_DIM, NUM_HEADS, SCALE, rand_qkv, window_errors  # noqa: E402
from common import save  # noqa: E402

from qwen1m.attention.fp8 import Fp8Tensor, fp8_attend, quantize  # noqa: E402
from qwen1m.attention.ops import sdpa_attend  # noqa: E402
from qwen1m.kernels.flash_attn import flash_attn  # noqa: E402
from qwen1m.kernels.flash_attn_fp8 import _fp8_config, flash_attn_fp8  # noqa: E402

FP8_SWEEP = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (128, 64, 8, 3), (128, 128, 4, 3),
    (64, 128, 4, 3), (256, 64, 8, 2), (256, 128, 8, 2),
]


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=300, return_mode="median")


def token_minor(t: Fp8Tensor) -> Fp8Tensor:
    """The same values stored [heads, head_dim, tokens] (token stride 1), viewed as [tokens, heads, D]."""
    return Fp8Tensor(t.values.permute(1, 2, 0).contiguous().permute(2, 0, 1), t.scale)


def row(num_q: int, num_kv: int, causal: bool) -> dict:
    q, k, v = rand_qkv(num_q, num_kv)
    qq, kq, vq = quantize(q), quantize(k), quantize(v)
    vt = token_minor(vq)
    flops = 4.0 * num_q * num_kv * HEAD_DIM * NUM_HEADS / (2 if causal else 1)
    impls = {
        "triton_bf16": lambda: flash_attn(q, k, v, softmax_scale=SCALE, causal=causal),
        "fp8": lambda: flash_attn_fp8(qq.values, kq.values, vq.values, qq.scale, kq.scale, vq.scale,
                                      softmax_scale=SCALE, causal=causal),
        "fp8_v_token_minor": lambda: flash_attn_fp8(qq.values, kq.values, vt.values, qq.scale, kq.scale,
                                                    vt.scale, softmax_scale=SCALE, causal=causal),
        "fp8_with_quantise": lambda: fp8_attend(q, k, v, softmax_scale=SCALE, causal=causal),
    }
    if not causal or num_q == num_kv:  # torch's masks are top-left
        impls["cudnn_bf16"] = lambda: sdpa_attend(q, k, v, softmax_scale=SCALE, causal=causal, backend="cudnn",
                                                  gqa="native")
    out = {"num_q": num_q, "num_kv": num_kv, "causal": causal}
    for name, fn in impls.items():
        try:
            o, lse = fn()
            t = ms(fn)
            out[name] = {"ms": round(t, 3), "tflops": round(flops / t / 1e9, 1),
                         **window_errors(o, lse, q, k, v, causal=causal)}
        except Exception as e:  # one failing implementation must not lose the others' figures
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(name, out[name], flush=True)
    for name in ("fp8", "fp8_v_token_minor", "fp8_with_quantise"):
        for base in ("triton_bf16", "cudnn_bf16"):
            if "ms" in out.get(name, {}) and "ms" in out.get(base, {}):
                out[f"{name}_vs_{base}"] = round(out[base]["ms"] / out[name]["ms"], 3)
    return out


def sweep(n: int) -> list[dict]:
    q, k, v = rand_qkv(n, n)
    qq, kq, vq = quantize(q), quantize(k), quantize(v)
    vt = token_minor(vq)
    rows = []
    for bm, bn, w, s in FP8_SWEEP:
        for layout, vv in (("v_head_dim_minor", vq), ("v_token_minor", vt)):
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
            try:
                t = ms(lambda vv=vv, cfg=cfg: flash_attn_fp8(
                    qq.values, kq.values, vv.values, qq.scale, kq.scale, vv.scale, softmax_scale=SCALE,
                    causal=True, config=cfg))
                flops = 4.0 * n * n * HEAD_DIM * NUM_HEADS / 2
                r = {**cfg, "v": layout, "ms": round(t, 3), "tflops": round(flops / t / 1e9, 1)}
            except Exception as e:
                r = {**cfg, "v": layout, "error": f"{type(e).__name__}: {e}"[:200]}
            print(r, flush=True)
            rows.append(r)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="8192,32768,131072")
    ap.add_argument("--chunk-kv", type=int, default=0, help="also a 32K-query chunk over this many keys")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--name", default="attention_fp8")
    args = ap.parse_args()
    results = {"default_fp8_config": _fp8_config(HEAD_DIM, torch.device("cuda")), "rows": []}
    if args.sweep:
        results["sweep"] = sweep(int(args.sizes.split(",")[0]))
    for n in (int(x) for x in args.sizes.split(",") if x):
        results["rows"].append(row(n, n, True))
    if args.chunk_kv:
        results["rows"].append(row(32768, args.chunk_kv, False))
    save(args.name, results)
    print(f"\n{'num_q':>7} {'num_kv':>8} {'causal':>6} {'bf16 TF':>8} {'cudnn TF':>8} {'fp8 TF':>8} "
          f"{'fp8/bf16':>8} {'fp8/cudnn':>9} {'fp8 err':>8} {'bf16 err':>8}")
    for r in results["rows"]:
        def tf(name, r=r):
            return r.get(name, {}).get("tflops", float("nan"))
        print(f"{r['num_q']:>7} {r['num_kv']:>8} {str(r['causal']):>6} {tf('triton_bf16'):>8} {tf('cudnn_bf16'):>8} "
              f"{tf('fp8'):>8} {r.get('fp8_vs_triton_bf16', float('nan')):>8} "
              f"{r.get('fp8_vs_cudnn_bf16', float('nan')):>9} "
              f"{r.get('fp8', {}).get('out_rel_err', float('nan')):>8.2e} "
              f"{r.get('triton_bf16', {}).get('out_rel_err', float('nan')):>8.2e}")


if __name__ == "__main__":
    main()
