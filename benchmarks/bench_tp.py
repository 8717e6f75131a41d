"""Tensor-parallel benchmark (needs 2+ GPUs: device kind nvidia-h200-x2).

    PYTHONPATH=src python3 benchmarks/bench_tp.py --model 7b --tp 1,2 --ttft 262144,1048576
    PYTHONPATH=src python3 benchmarks/bench_tp.py --model 14b --tp 2 --ttft 1048576 --decode-tokens 32

Random weights (load_format="dummy") of the Qwen2.5-7B/14B-Instruct-1M shapes. For each TP size:
time to first token per prompt length, then (optionally) the time of N decoded tokens, and the peak
memory of rank 0's GPU (the other ranks hold the same shapes). Prints a table, saves JSON.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402

from qwen1m import LLM, SamplingParams  # noqa: E402

CONFIGS = {"7b": "qwen2.5-7b-instruct-1m", "14b": "qwen2.5-14b-instruct-1m"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(CONFIGS), default="7b")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--ttft", default="262144,1048576")
    ap.add_argument("--decode-tokens", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=1010000)
    args = ap.parse_args()
    rows = []
    for tp in [int(x) for x in args.tp.split(",")]:
        llm = LLM(Path(__file__).parent / "configs" / CONFIGS[args.model], load_format="dummy", dtype="bfloat16",
                  tensor_parallel_size=tp, max_model_len=args.max_model_len, max_num_seqs=1)
        print(llm.memory_plan, flush=True)
        for n in [int(x) for x in args.ttft.split(",")]:
            n = min(n, llm.engine.max_model_len - max(1, args.decode_tokens) - 1)
            ids = torch.randint(0, llm.config.vocab_size, (n,)).tolist()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
            torch.cuda.synchronize()
            row = {"model": args.model, "tp": tp, "tokens": n, "ttft_s": time.perf_counter() - t0,
                   "peak_gib_rank0": torch.cuda.max_memory_allocated() / 2**30}
            if args.decode_tokens:
                t0 = time.perf_counter()
                llm.generate([ids], SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True))
                torch.cuda.synchronize()
                row["prefill_plus_decode_s"] = time.perf_counter() - t0
            rows.append(row)
            print(row, flush=True)
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    save(f"tp_{args.model}", {"rows": rows})
    print("\n| model | TP | tokens | TTFT s | peak GiB (rank 0) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['tp']} | {r['tokens']:,} | {r['ttft_s']:.1f} | {r['peak_gib_rank0']:.1f} |")


if __name__ == "__main__":
    main()
