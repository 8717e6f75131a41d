"""Decode step time at batch 32: all rows greedy, greedy and sampled rows mixed, all sampled.

    PYTHONPATH=src python3 benchmarks/bench_sampling.py [--cpu] [--steps 32] [--context 128] [--tag NAME]

On the GPU: Qwen2.5-7B-Instruct-1M shapes with random weights (load_format="dummy", CUDA graphs as
``LLM`` sets them up). With --cpu (or no GPU): a 2-layer model with the same vocabulary (152,064),
so the sampler's per-row work over the vocabulary weighs as it does on the real model while the
layers stay cheap; figures there say how the sampling path compares between commits, not how fast
decode is.

Each mode adds 32 requests of ``--context`` random prompt tokens, prefills them (not timed), then
times ``--steps`` decode steps: the median interval between consecutive ``engine.step()`` returns.
Modes (a mode this commit's SamplingParams cannot express is reported as skipped):
    greedy          32 rows temperature 0
    mixed           16 greedy rows + 16 rows temperature 0.8, top_p 0.95, top_k 50, seeded
    sampled         32 sampled rows as above
    mixed_penalties mixed, the sampled rows with presence/frequency/repetition penalties and a logit_bias
    mixed_top_p     mixed, the sampled rows with top_p 0.95 and no top_k (the OpenAI API's knobs: the
                    sampler sorts the whole vocabulary for them)
    greedy_logprobs 32 greedy rows asking for 5 top logprobs
Saves sampling_<tag>_<date>.json under $OUT or benchmarks/results (date, commit, device in "meta").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402

from qwen1m import LLM, SamplingParams  # noqa: E402

CONFIG = Path(__file__).parent / "configs" / "qwen2.5-7b-instruct-1m"
BATCH = 32
SAMPLED = dict(temperature=0.8, top_p=0.95, top_k=50)
PENALTIES = dict(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1, logit_bias={11: 2.0, 42: -5.0})


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cpu_config(folder: Path) -> Path:
    """The 7B config cut to 2 layers of width 256 (vocabulary kept), without DCA."""
    cfg = json.loads((CONFIG / "config.json").read_text())
    cfg.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=4096, torch_dtype="float32")
    cfg.pop("dual_chunk_attention_config")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def row_params(mode: str, i: int, max_tokens: int) -> SamplingParams:
    common = dict(max_tokens=max_tokens, ignore_eos=True)
    greedy_row = mode in ("greedy", "greedy_logprobs") or (mode.startswith("mixed") and i % 2 == 0)
    if greedy_row:
        extra = dict(logprobs=5) if mode == "greedy_logprobs" else {}
        return SamplingParams(temperature=0, **common, **extra)
    extra = PENALTIES if mode == "mixed_penalties" else {}
    sampled = {**SAMPLED, "top_k": -1} if mode == "mixed_top_p" else SAMPLED
    return SamplingParams(seed=i, **sampled, **common, **extra)


def decode_steps(llm: LLM, mode: str, context: int, steps: int) -> dict:
    engine = llm.engine
    params = [row_params(mode, i, steps + 1) for i in range(BATCH)]
    gen = torch.Generator().manual_seed(0)
    for p in params:
        engine.add_request(torch.randint(0, llm.config.vocab_size, (context,), generator=gen).tolist(), p)
    while engine.num_waiting() or any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()  # prefill and the first token: not timed
    _sync()
    times, last = [], time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        now = time.perf_counter()
        times.append(now - last)
        last = now
    _sync()
    times = times[1:] or times  # the first interval may include a graph's first replay
    return {"mode": mode, "batch": BATCH, "context": context, "steps": len(times),
            "step_ms": statistics.median(times) * 1e3, "mean_step_ms": statistics.mean(times) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="the 2-layer CPU model even where a GPU is present")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each mode; the best median is kept")
    ap.add_argument("--tag", default="", help="a suffix for the result file name (e.g. before / after)")
    args = ap.parse_args()
    cpu = args.cpu or not torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        folder = cpu_config(Path(tmp) / "model") if cpu else CONFIG
        llm = LLM(folder, load_format="dummy", device="cpu" if cpu else "cuda",
                  dtype="float32" if cpu else "bfloat16", max_model_len=args.context + args.steps + 8,
                  max_num_seqs=BATCH, max_num_batched_tokens=max(2048, BATCH * args.context))
        rows = []
        for mode in ("greedy", "mixed", "sampled", "mixed_penalties", "greedy_logprobs", "mixed_top_p"):
            try:
                row_params(mode, 1, 2)
            except (TypeError, ValueError) as e:  # an older SamplingParams
                print(f"{mode:16s} skipped: {e}")
                rows.append({"mode": mode, "skipped": str(e)})
                continue
            decode_steps(llm, mode, args.context, 4)  # warm-up
            runs = [decode_steps(llm, mode, args.context, args.steps) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["step_ms"])
            best["runs_step_ms"] = [round(r["step_ms"], 3) for r in runs]
            rows.append(best)
            print(f"{mode:16s} step {best['step_ms']:8.3f} ms (runs {best['runs_step_ms']}), "
                  f"{BATCH / best['step_ms'] * 1e3:8.1f} tokens/s", flush=True)
    name = "sampling" + ("_cpu" if cpu else "") + (f"_{args.tag}" if args.tag else "")
    save(name, {"device_kind": "cpu" if cpu else "cuda", "threads": torch.get_num_threads(), "results": rows})


if __name__ == "__main__":
    main()
