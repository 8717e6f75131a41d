"""Why a DCA decode launch (three key ranges) is slower than one range over the same keys, and what
fixes it: paged_decode_attention_multi variants at Qwen2.5-7B-Instruct-1M shapes, timed inside CUDA
graphs (triton.testing.do_bench_cudagraph) so that host launch overhead is out of the figures.

    GIT_COMMIT=$(git rev-parse HEAD) PYTHONPATH=src python3 benchmarks/bench_decode_ranges.py [--out DIR]

Every variant reads the same K / V bytes (context * 4 kv heads * 128 * 2 * 2); rows give ms and GB/s.
Writes decode_ranges.json under --out (default $OUT, else benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from bench_decode import DCA_CHUNK, NUM_KV_HEADS, SCALE, dca_bounds, kv_bytes, make_case  # noqa: E402

from qwen1m.kernels.paged_decode import paged_decode_attention, paged_decode_attention_multi  # noqa: E402


def time_graph_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def variants(context: int):
    """(name, kwargs builder) pairs; each builder gets (q, kc, vc, bt, device) and returns a callable."""
    dev = "cuda"
    starts, ends = dca_bounds(context, DCA_CHUNK, 1, dev)
    asc_s, asc_e = starts.flip(0).contiguous(), ends.flip(0).contiguous()
    one_s = torch.tensor([[0], [0], [0]], dtype=torch.int32, device=dev)
    one_e = torch.tensor([[context], [0], [0]], dtype=torch.int32, device=dev)
    s1 = torch.zeros(1, dtype=torch.int32, device=dev)
    e1 = torch.full((1,), context, dtype=torch.int32, device=dev)
    out = [("R=1 [0, n)", lambda q, q3, kc, vc, bt: lambda: paged_decode_attention(q, kc, vc, bt, s1, e1, SCALE))]
    for splits in (None, 88, 132):
        out.append((f"R=3 dca splits={splits or 'auto'}",
                    lambda q, q3, kc, vc, bt, n=splits: lambda: paged_decode_attention_multi(
                        q3, kc, vc, bt, starts, ends, SCALE, num_splits=n)))
    out.append(("R=3 dca ascending order",
                lambda q, q3, kc, vc, bt: lambda: paged_decode_attention_multi(q3, kc, vc, bt, asc_s, asc_e, SCALE)))
    out.append(("R=3 one range [0, n), two empty",
                lambda q, q3, kc, vc, bt: lambda: paged_decode_attention_multi(q3, kc, vc, bt, one_s, one_e, SCALE)))
    for cfg in ((64, 4, 2), (64, 8, 3), (128, 4, 2), (32, 4, 4)):
        c = dict(BLOCK_N=cfg[0], num_warps=cfg[1], num_stages=cfg[2])
        out.append((f"R=3 dca N{cfg[0]} w{cfg[1]} s{cfg[2]}",
                    lambda q, q3, kc, vc, bt, c=c: lambda: paged_decode_attention_multi(
                        q3, kc, vc, bt, starts, ends, SCALE, config=c)))
        out.append((f"R=1 [0, n) N{cfg[0]} w{cfg[1]} s{cfg[2]}",
                    lambda q, q3, kc, vc, bt, c=c: lambda: paged_decode_attention(q, kc, vc, bt, s1, e1, SCALE,
                                                                                   config=c)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--contexts", default="1000000,131072,32768")
    args = ap.parse_args()
    rows = []
    for context in (int(x) for x in args.contexts.split(",")):
        q, kc, vc, bt = make_case(1, context, torch.bfloat16, "cuda", 64)[:4]
        q3 = torch.stack([q, q.roll(1, dims=-1), q.roll(2, dims=-1)])
        nbytes = kv_bytes(1, context, torch.bfloat16)
        for name, build in variants(context):
            try:
                ms = time_graph_ms(build(q, q3, kc, vc, bt))
                row = dict(context=context, variant=name, ms=ms, gbs=nbytes / ms / 1e6)
            except Exception as exc:  # a config that does not compile is a data point
                row = dict(context=context, variant=name, error=repr(exc)[:300])
            rows.append(row)
            print(f"{context:>8} {name:38s} " + (f"{row['ms']:.4f} ms {row['gbs']:7.0f} GB/s" if "ms" in row
                                                    else row["error"]), flush=True)
        del q, q3, kc, vc, bt
        torch.cuda.empty_cache()
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                git_commit=os.environ.get("GIT_COMMIT", "unknown"), device=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__, num_kv_heads=NUM_KV_HEADS,
                timing="triton.testing.do_bench_cudagraph median (no host launch overhead)")
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    with open(os.path.join(args.out, f"decode_ranges_{stamp}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
