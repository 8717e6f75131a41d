"""Train the bundled model and measure it, in one job (one H200 call; also runs on CPU at toy size).

    PYTHONPATH=src python3 benchmarks/train_bundled.py --recipe recipes/bundled.json --out $OUT

Writes to --out: final/ (the checkpoint, refreshed after every stage so a cut-off job still returns
its last stage), train_log.json, loss.png (if matplotlib is there) and eval.json:
- plain RoPE (the training forward, teacher-forced, see qwen1m.train.evaluate) passkey accuracy at
  1x..16x the training length, and single-needle (RULER niah_single_1) at 1x;
- the engine (qwen1m.LLM, greedy generate) with DCA on and off, as far as --deadline-s allows.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from qwen1m.config import load_model_config
from qwen1m.model.loader import load_model
from qwen1m.train.encoding import Encoder
from qwen1m.train.evaluate import llm_accuracy, teacher_forced_accuracy
from qwen1m.train.recipe import load_recipe, parse_recipe
from qwen1m.train.trainer import run_recipe

CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "generation_config.json")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/qwen1m-train")
    p.add_argument("--device", default="auto")
    p.add_argument("--multiples", default="1,2,4,8,16")
    p.add_argument("--n", type=int, default=100, help="samples per length")
    p.add_argument("--init-from", help="override the recipe's init_from (a checkpoint folder)")
    p.add_argument("--engine-dca", default="on,off", help="engine evaluations: DCA on, off or both")
    p.add_argument("--deadline-s", type=float, default=540.0, help="stop starting evaluations after this")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    out, work = Path(args.out), Path(args.work)
    (out / "final").mkdir(parents=True, exist_ok=True)

    def keep(stage_folder: Path) -> None:
        for f in CHECKPOINT_FILES:
            shutil.copy(stage_folder / f, out / "final" / f)
        for f in ("train_log.json", "loss.png"):
            if (work / f).is_file():
                shutil.copy(work / f, out / f)

    if args.init_from:
        src = json.loads(Path(args.recipe).read_text())
        src["init_from"] = str(Path(args.init_from).resolve())
        recipe = parse_recipe(src, f"recipe '{args.recipe}'")
    else:
        recipe = load_recipe(args.recipe)
    final = run_recipe(recipe, work, args.device, resume=False, on_stage_end=keep)
    keep(final)
    train_s = time.perf_counter() - t0
    length = recipe.stages[-1].seq_len
    lengths = [m * length for m in map(int, args.multiples.split(","))]
    results: dict = {"train_seconds": round(train_s, 1), "train_length": length, "plain_teacher_forced": [],
                     "engine": [], "errors": []}
    dev = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    results["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    save = lambda: (out / "eval.json").write_text(json.dumps(results, indent=1) + "\n")
    left = lambda: args.deadline_s - (time.perf_counter() - t0)

    cfg = load_model_config(final)
    model = load_model(final, cfg, torch.float32, dev).eval()
    enc = Encoder(final)
    for task, lens in (("passkey", lengths), ("niah", lengths[:1])):
        for n_len in lens:
            if left() < 60:
                break
            t = time.perf_counter()
            n = args.n if n_len <= 4 * length else args.n // 2
            acc = teacher_forced_accuracy(model, enc, task, n_len, n, batch_size=max(1, 4 * length // n_len))
            results["plain_teacher_forced"].append({"task": task, "length": n_len, "n": n, "accuracy": acc,
                                                    "seconds": round(time.perf_counter() - t, 1)})
            logging.info("plain %s %d: %.1f%%", task, n_len, acc)
            save()
    del model
    for dca in [{"on": True, "off": False}[m] for m in args.engine_dca.split(",")]:
        for task in ("passkey", "niah"):
            if left() < 30:
                break
            try:
                recs = llm_accuracy(final, task, lengths if task == "passkey" else lengths[:1],
                                    args.n if task == "passkey" else args.n // 2, dca, args.device,
                                    time_budget_s=left() - 30)
                results["engine"].extend(recs)
            except Exception as e:  # the engine is younger than this job: keep the training results
                results["errors"].append(f"engine dca={dca} {task}: {type(e).__name__}: {e}"[:500])
                logging.exception("engine evaluation failed")
            save()
    save()
    print(json.dumps({k: v for k, v in results.items()}, indent=None)[:6000])


if __name__ == "__main__":
    main()
