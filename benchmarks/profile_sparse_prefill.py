"""Where sparse prefill's time goes: torch profiler over one long prefill, 7B-1M shapes, random weights.

    PYTHONPATH=src python3 benchmarks/profile_sparse_prefill.py [--tokens 131072] [--sparse 7b-mix|uniform]
        [--dense]

The three stages of every sparse region are wrapped in profiler ranges (without editing the library:
the wrappers are installed on the module's names here): ``sparse.estimate`` (pattern estimation from
the last queries), ``sparse.index`` (vertical-slash index build), ``sparse.attend`` (the kernel), and
``sparse.merge`` (LSE merge of the DCA regions). Prints the ranges' CUDA and CPU totals, then the top
kernels by GPU time and the top operators by CPU time. On 2026-11-29 a 128K prompt took 31.1 s
sparse against 10.2 s dense (benchmarks/results/engine_sparse_2026-11-29.json); this says why.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import CONFIG, sparse_config  # noqa: E402

from qwen1m import LLM, SamplingParams  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _ranged(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def install_ranges() -> None:
    import qwen1m.attention.sparse_prefill as sp

    sp.estimate_vertical_slash = _ranged("sparse.estimate", sp.estimate_vertical_slash)
    sp._region_index = _ranged("sparse.index", sp._region_index)
    get_sparse_fn = sp.get_sparse_fn
    sp.get_sparse_fn = lambda device: _ranged("sparse.attend", get_sparse_fn(device))
    import qwen1m.attention.sparse_batched as sb

    # the batched GPU path (design §3.6): its estimate, and the whole step (index + attention + merge inside)
    sb.estimate_vertical_slash_batched = _ranged("sparse.estimate", sb.estimate_vertical_slash_batched)
    sb.sparse_prefill_batched = _ranged("sparse.batched_step", sb.sparse_prefill_batched)
    import qwen1m.attention.backend as be

    merge_fn = be._merge_fn
    be._merge_fn = lambda device: _ranged("sparse.merge", merge_fn(device))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--sparse", default="7b-mix")
    ap.add_argument("--dense", action="store_true", help="profile the dense path instead (the baseline)")
    ap.add_argument("--model", default=str(CONFIG), help="config folder (a tiny one for a CPU dry run)")
    ap.add_argument("--sparse-threshold", type=int, default=None)
    ap.add_argument("--sparse-config", default="", help="a sparse_attention_config.json instead of --sparse")
    ap.add_argument("--load-format", default="dummy", help="'auto' loads the folder's weights (the bundled model)")
    ap.add_argument("--prompts", type=int, default=1, help="prompts prefilled together (as an eval batch does)")
    args = ap.parse_args()
    if not args.dense:
        install_ranges()
    from qwen1m.config import load_model_config

    cfg = load_model_config(args.model)
    if args.dense:
        sparse = None
    elif args.sparse_config:
        sparse = args.sparse_config
    else:
        sparse = sparse_config(args.sparse, cfg.num_hidden_layers, cfg.num_attention_heads)
    llm = LLM(args.model, load_format=args.load_format, dtype="bfloat16" if torch.cuda.is_available() else "float32",
              max_model_len=args.tokens + 64, enforce_eager=True, max_num_seqs=max(1, args.prompts),
              sparse_attention_config=sparse,
              sparse_threshold=args.sparse_threshold)
    prompts = [torch.randint(0, llm.config.vocab_size, (args.tokens,)).tolist() for _ in range(args.prompts)]
    ids = prompts[0]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    llm.generate([ids[: min(40000, args.tokens)]], params)  # warm-up: kernel compilation, autotuning
    _sync()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        _sync()
        wall = time.perf_counter() - t0
    what = "dense" if args.dense else "sparse " + (args.sparse_config or args.sparse)
    print(f"{what} prefill of {args.prompts} x {args.tokens:,} tokens: {wall:.2f} s "
          "(under the profiler)")
    events = prof.key_averages()
    for e in events:
        if e.key.startswith("sparse."):
            print(f"  {e.key:<16} calls {e.count:6d}  cpu {e.cpu_time_total / 1e6:8.2f} s  "
                  f"gpu {getattr(e, 'device_time_total', getattr(e, 'cuda_time_total', 0)) / 1e6:8.2f} s")
    if torch.cuda.is_available():
        print(events.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
