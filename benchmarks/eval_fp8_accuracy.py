"""FP8 attention's accuracy on a trained model and held-out text: logits, then passkey and RULER niah.

    PYTHONPATH=src python3 benchmarks/eval_fp8_accuracy.py [--model DIR] [--lengths 4096,16384]
        [--eval-lengths 4k,16k] [--depths 0:100:25] [--samples 2] [--ruler-samples 10] [--tasks passkey,niah_single_1]

1. Logits. One held-out passkey prompt per length (key at 50%, ``eval.heldout`` text the model never
   trained on): every position's logits with attention_dtype="auto" (the model dtype) and "fp8",
   compared on the last 1024 positions: max and mean |difference|, the mean KL divergence of FP8's
   distribution from the model dtype's, and how often the top token agrees. Beside them the same
   figures for the FP8 KV cache alone (kv_cache_dtype="fp8": K and V rounded as FP8 attention rounds
   them, q and P not) and, on a CPU, for the whole model in bfloat16 against float32.
2. Tasks. ``qwen1m eval <task> --modes dca`` (rope where the model has no DCA) with each attention
   dtype on the same generated prompts (same seed), held-out families: accuracy per length and the
   FP8 - model-dtype difference in points.
On a GPU the FP8 kernel runs; on a CPU its arithmetic is emulated (``attention.fp8.emulate``: both
roundings, not bit-equal to the kernel). Writes fp8_accuracy_<date>.json (+ the eval folders) under
$OUT or benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import save  # noqa: E402

from qwen1m import LLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 1024


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """b against a (logits [n, vocab], float32)."""
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    kl = (la.exp() * (la - lb)).sum(-1)
    diff = (a - b).abs()
    return {"max_abs": round(diff.max().item(), 5), "mean_abs": round(diff.mean().item(), 6),
            "logit_std": round(a.std().item(), 4), "kl_mean": float(f"{kl.mean().item():.3g}"),
            "kl_max": float(f"{kl.max().item():.3g}"),
            "top1_agree": round((a.argmax(-1) == b.argmax(-1)).float().mean().item(), 5)}


def logits_rows(args, device: str) -> list[dict]:
    from qwen1m.eval.context import EvalContext
    from qwen1m.eval.tasks import make_sample

    lengths = [int(x) for x in args.lengths.split(",") if x]
    max_len = max(lengths) + 64
    common = dict(model=args.model, device=device, max_model_len=max_len)
    # the FP8 KV cache rounds K and V as FP8 attention does: the part of its error users already accept
    variants = {"auto": dict(attention_dtype="auto"), "fp8": dict(attention_dtype="fp8"),
                "fp8_kv_cache": dict(kv_cache_dtype="fp8")}
    if device == "cpu":
        variants["bfloat16_model"] = dict(dtype="bfloat16")
    logits: dict[str, dict[int, torch.Tensor]] = {}
    prompts = None
    for name, extra in variants.items():
        llm = LLM(**common, **extra)
        if prompts is None:
            ec = EvalContext.build(llm.tokenizer, families="heldout")
            prompts = {n: make_sample(ec, "passkey", n, 50.0, f"fp8-accuracy-{n}").ids for n in lengths}
        logits[name] = {}
        for n, ids in prompts.items():
            t = time.perf_counter()
            logits[name][n] = llm.logits(ids)[-WINDOW:].float()
            print(f"logits {name} {n}: {time.perf_counter() - t:.1f} s", flush=True)
        del llm
    rows = []
    for n in lengths:
        row = {"tokens": n, "positions": min(WINDOW, n), "fp8_vs_auto": compare(logits["auto"][n], logits["fp8"][n])}
        row["fp8_kv_cache_vs_auto"] = compare(logits["auto"][n], logits["fp8_kv_cache"][n])
        if "bfloat16_model" in logits:
            row["bfloat16_model_vs_float32"] = compare(logits["auto"][n], logits["bfloat16_model"][n])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def task_rows(args, device: str, out_dir: Path) -> list[dict]:
    """passkey (``qwen1m eval passkey``) and RULER tasks (``qwen1m eval ruler --tasks``), each dtype."""
    rows = []
    for task in (t for t in args.tasks.split(",") if t):
        accs = {}
        for dtype in ("auto", "fp8"):
            folder = out_dir / f"{task}_{dtype}"
            suite = (["passkey", "--depths", args.depths, "--no-heatmaps", "--samples", str(args.samples)]
                     if task == "passkey" else ["ruler", "--tasks", task, "--samples", str(args.ruler_samples)])
            cmd = [sys.executable, "-m", "qwen1m", "eval", *suite, "--lengths", args.eval_lengths,
                   "--modes", args.mode, "--attention-dtype", dtype, "--device", device, "--out", str(folder),
                   "--families", "heldout"]
            if args.model:
                cmd += ["--model", args.model]
            env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
            t = time.perf_counter()
            if not args.summarize_only:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"{' '.join(cmd[2:6])} failed:\n{proc.stderr[-2000:]}")
            accs[dtype] = _accuracy(folder)
            print(f"{task} {dtype}: {accs[dtype]} ({time.perf_counter() - t:.0f} s)", flush=True)
        same = _same_answers(out_dir / f"{task}_auto", out_dir / f"{task}_fp8")
        for length, (a, n) in accs["auto"].items():
            f = accs["fp8"].get(length, (None, 0))[0]
            rows.append({"task": task, "length": length, "samples": n, "auto": a, "fp8": f,
                         "fp8_minus_auto_points": None if f is None else round(f - a, 2),
                         "same_answer_share": same.get(length)})
    return rows


def _same_answers(auto: Path, fp8: Path) -> dict[int, float]:
    """Per length, the share of prompts (the same ones: same seed) whose answer text is identical."""
    a = json.loads(next(auto.glob("*.json")).read_text())["samples"]
    b = json.loads(next(fp8.glob("*.json")).read_text())["samples"]
    key = ("task", "length", "depth", "sample")
    got = {tuple(r.get(k) for k in key): r["got"] for r in b}
    by_len: dict[int, list[bool]] = {}
    for r in a:
        other = got.get(tuple(r.get(k) for k in key))
        if other is not None:
            by_len.setdefault(r["length"], []).append(other == r["got"])
    return {n: round(sum(v) / len(v), 3) for n, v in sorted(by_len.items())}


def _accuracy(folder: Path) -> dict[int, tuple[float, int]]:
    """(mean score in percent, samples) per length from an eval folder's JSON."""
    data = json.loads(next(folder.glob("*.json")).read_text())
    by_len: dict[int, list[float]] = {}
    for r in data["samples"]:
        by_len.setdefault(r["length"], []).append(float(r["score"]))
    return {n: (round(sum(v) / len(v), 2), len(v)) for n, v in sorted(by_len.items())}  # scores are percent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--lengths", default="4096,16384", help="logit comparison prompt lengths")
    ap.add_argument("--eval-lengths", default="4k,16k")
    ap.add_argument("--depths", default="0:100:25")
    ap.add_argument("--samples", type=int, default=2, help="passkey samples per length and depth")
    ap.add_argument("--ruler-samples", type=int, default=10, help="RULER samples per task and length")
    ap.add_argument("--tasks", default="passkey,niah_single_1")
    ap.add_argument("--mode", default="dca")
    ap.add_argument("--name", default="fp8_accuracy")
    ap.add_argument("--summarize-only", action="store_true",
                    help="no model runs: the task rows from the eval folders already under $OUT")
    args = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    out_dir = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="fp8_accuracy_"))
    results = {"model": args.model or "bundled", "device": device,
               "fp8_path": "kernel" if device == "cuda" else "CPU emulation (attention.fp8.emulate)",
               "families": "heldout", "args": vars(args)}
    if not args.summarize_only and args.lengths:
        results["logits"] = logits_rows(args, device)
        save(args.name, results)
    results["tasks"] = task_rows(args, device, out_dir)
    save(args.name, results)
    print("\n| task | length | model dtype | fp8 | points | same answer |\n|---|---|---|---|---|---|")
    for r in results["tasks"]:
        print(f"| {r['task']} | {r['length']} | {r['auto']} | {r['fp8']} | {r['fp8_minus_auto_points']} "
              f"| {r['same_answer_share']} |")


if __name__ == "__main__":
    main()
