"""Passkey / single-needle accuracy of a checkpoint through the engine (greedy ``LLM.generate``), at
multiples of its training length, DCA on or off: the rows of the bundled model's card.

    PYTHONPATH=src python3 benchmarks/eval_bundled_engine.py --task niah --plan 8192:100,16384:50 \
        [--model DIR] [--no-dca] [--device cpu]

--plan is length:samples pairs (samples at evenly spread depths, ``qwen1m.train.evaluate``). Saves
benchmarks/results/bundled_engine_<task>_<date>.json after every length (a cut run keeps what it did).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402

from qwen1m.llm import bundled_model_path  # noqa: E402
from qwen1m.train.evaluate import llm_accuracy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=("passkey", "niah"), default="passkey")
    ap.add_argument("--plan", required=True, help="length:samples pairs, e.g. 8192:100,16384:50")
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    ap.add_argument("--no-dca", action="store_true")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    folder = Path(args.model) if args.model else bundled_model_path()
    plan = [tuple(int(x) for x in item.split(":")) for item in args.plan.split(",") if item]
    results = {"model": str(folder), "task": args.task, "dca": not args.no_dca, "records": []}
    for length, n in plan:
        t = time.perf_counter()
        results["records"].extend(llm_accuracy(folder, args.task, [length], n, not args.no_dca, args.device))
        print(results["records"][-1], f"{time.perf_counter() - t:.0f} s", flush=True)
        save(f"bundled_engine_{args.task}", results)


if __name__ == "__main__":
    main()
