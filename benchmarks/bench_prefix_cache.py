"""Time to first token of a follow-up question about the same long document, with prefix caching.

Qwen2.5-7B-Instruct-1M shapes, random bf16 weights (``load_format="dummy"``), DCA on, one engine with
``enable_prefix_caching=True``. For each document length N: an untimed warm-up prompt, then
    1. document + question 1: computed in full (the baseline: what every question costs without
       prefix caching);
    2. document + question 2 (another question of the same length, so the YaRN factor matches):
       only the tail after the document's last full block is computed.
Prints the rows and saves JSON (``prefix_cache_<date>.json``) under $OUT or benchmarks/results/.

    python benchmarks/bench_prefix_cache.py --lengths 131072,262144
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_engine import CONFIG
from common import save

from qwen1m import LLM, SamplingParams


def _timed(llm: LLM, ids: list[int]) -> tuple[float, int]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))[0]
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out.num_cached_tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="131072", help="document lengths in tokens, comma separated")
    ap.add_argument("--question", type=int, default=64, help="question tokens")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",") if x]
    llm = LLM(CONFIG, load_format="dummy", dtype="bfloat16", max_model_len=max(lengths) + 4096,
              enable_prefix_caching=True)
    vocab = llm.config.vocab_size
    llm.generate([torch.randint(0, vocab, (8192,)).tolist()], SamplingParams(max_tokens=2, ignore_eos=True))
    rows = []
    for n in lengths:
        doc = torch.randint(0, vocab, (n,)).tolist()
        q1, q2 = (torch.randint(0, vocab, (args.question,)).tolist() for _ in range(2))
        full_s, cached1 = _timed(llm, doc + q1)
        reuse_s, cached2 = _timed(llm, doc + q2)
        row = {"document_tokens": n, "question_tokens": args.question, "first_ttft_s": full_s,
               "first_cached_tokens": cached1, "follow_up_ttft_s": reuse_s, "follow_up_cached_tokens": cached2,
               "speedup": full_s / reuse_s}
        rows.append(row)
        print(f"document {n:,} + {args.question} question tokens: first {full_s:.2f} s, "
              f"follow-up {reuse_s * 1e3:.1f} ms ({cached2:,} tokens reused): {row['speedup']:.0f}x", flush=True)
        save("prefix_cache", {"config": "qwen2.5-7b-instruct-1m (dummy weights, bf16), DCA on",
                              "rows": rows})


if __name__ == "__main__":
    main()
