"""Train, calibrate and measure the sparse-prefill test model (design §3).

Random weights have no attention structure (the estimate lists every block, every region falls back
to dense), the released 7B-1M weights cannot be downloaded here, and the bundled model has 4 heads of
64 dims. This trains a Qwen2 model with the 7B-1M attention shape (28 query heads, 4 KV heads,
head_dim 128; small width, depth and vocabulary) on the bundled recipe's tasks, progressively to 32K
with DCA (recipes/bench_7b_shape.json), in <= 10 minutes on one H200; then calibrates its sparse
config by attention recall at a serving length, checks that recall on held-out text, and runs
bench_sparse_e2e.py on it (dense / sparse / every region sparse).

    PYTHONPATH=src python3 benchmarks/train_bench_model.py --phases train --dir /tmp/bench7b
    PYTHONPATH=src python3 benchmarks/train_bench_model.py --phases calibrate,measure --dir /tmp/bench7b
    PYTHONPATH=src python3 benchmarks/train_bench_model.py --smoke        (CPU: a 2-minute plumbing run)

Phases run as subprocesses of the CLI (``qwen1m train`` / ``qwen1m calibrate``) and of
bench_sparse_e2e.py, so each is what a user would run. The weights stay in --dir (on the GPU
machine); the train log, the calibrated config, the held-out recall and the measurements are written
to $OUT (or benchmarks/results/bench_model_<date>/), which is what gets committed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "bench_7b_shape.json"


def _results_dir() -> Path:
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else (
        ROOT / "benchmarks" / "results" / f"bench_model_{dt.date.today().isoformat()}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` (from the repository root, src on the path), teeing its output to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        if proc.wait():
            raise SystemExit(f"{cmd[0:4]} failed with exit code {proc.returncode}; see {log}")
    return time.perf_counter() - t0


def recipe_for(args) -> Path:
    """The recipe with its tokenizer path made absolute (and, for --smoke, CPU-sized stages)."""
    recipe = json.loads(RECIPE.read_text())
    recipe["tokenizer"]["path"] = str(ROOT / recipe["tokenizer"]["path"])
    if args.smoke:
        recipe["model"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=1, head_dim=32)
        recipe["num_workers"] = 0
        for stage, seq in zip(recipe["stages"], (256, 512, 1024)):
            stage.update(seq_len=seq, batch_size=2, time_s=None, steps=3, warmup_steps=1)
            stage.pop("time_s")
    path = Path(args.dir) / "recipe.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recipe, indent=1))
    return path


def train(args, out: Path) -> dict:
    recipe = recipe_for(args)
    seconds = _run([sys.executable, "-m", "qwen1m", "train", "--recipe", str(recipe), "--out", str(args.dir),
                    "--device", args.device], out / "train.log")
    shutil.copy(Path(args.dir) / "train_log.json", out / "train_log.json")
    return {"train_s": round(seconds, 1), "model": str(Path(args.dir) / "final")}


def calibrate(args, out: Path) -> dict:
    model = Path(args.dir) / "final"
    config = Path(args.dir) / "sparse_attention_config.json"
    seconds = _run([sys.executable, "-m", "qwen1m", "calibrate", "--model", str(model), "--device", args.device,
                    "--length", str(args.calibrate_length), "--samples", "1", "--target-recall",
                    str(args.target_recall), "--step", str(args.step), "--out", str(config)], out / "calibrate.log")
    shutil.copy(config, out / "sparse_attention_config.json")
    return {"calibrate_s": round(seconds, 1), "calibrate_length": args.calibrate_length,
            "target_recall": args.target_recall}


def measure(args, out: Path) -> dict:
    model = Path(args.dir) / "final"
    config = Path(args.dir) / "sparse_attention_config.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_sparse_e2e.py"), "--model", str(model), "--label",
           "bench7b", "--sparse-config", str(config), "--lengths", args.lengths, "--random7b", "",
           "--profile-length", str(args.profile_length), "--name", "bench_model_sparse_e2e"]
    if args.recall:
        cmd.append("--recall")
    if args.smoke:
        cmd += ["--sparse-threshold", "256", "--warmup-tokens", "300", "--chunk", "512"]
    seconds = _run(cmd, out / "measure.log")
    return {"measure_s": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phases", default="train,calibrate,measure")
    ap.add_argument("--dir", default="/tmp/bench7b", help="run folder (weights stay here)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--calibrate-length", type=int, default=131072)
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--step", type=int, default=2048, help="calibration budget increment")
    ap.add_argument("--lengths", default="131072,524288")
    ap.add_argument("--profile-length", type=int, default=524288)
    ap.add_argument("--recall", action="store_true", help="sampled-head recall in the measurement (held-out text)")
    ap.add_argument("--smoke", action="store_true", help="CPU plumbing run: tiny model, lengths and steps")
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.device, args.calibrate_length, args.step = "cpu", 1024, 256
        args.lengths, args.profile_length = "640,1024", 0
    out = _results_dir()
    summary_path = out / "bench_model_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    phases = {"train": train, "calibrate": calibrate, "measure": measure}
    for name in args.phases.split(","):
        summary[name] = phases[name](args, out)
        summary_path.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
