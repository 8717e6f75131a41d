"""JSON mode's cost per decode step (``qwen1m.constrained.json_object_processor``) on the CPU.

    PYTHONPATH=src python3 benchmarks/bench_json_mode.py [--tokenizer DIR ...] [--steps 300] [--seeds 3]

For each tokenizer folder (default: the bundled model's; pass a Qwen 152K-token tokenizer.json folder
for the real vocabulary): the time to build the token table (once per tokenizer), then a random walk
of --steps tokens sampled from random logits through the processor, timing each call: the mean and
the worst step (a state's first visit walks the token trie; later visits hit the state's cached
mask). One torch thread: on a shared machine, intra-op threads contending would be what is measured.
Every walk must end in text that json.loads parses as an object. Saves json_mode_<date>.json under
$OUT or benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402

from qwen1m.constrained import json_object_processor  # noqa: E402
from qwen1m.llm import bundled_model_path  # noqa: E402
from qwen1m.tokenizer import Tokenizer  # noqa: E402


def walk(tokenizer, steps: int, seed: int) -> dict:
    start = time.perf_counter()
    proc = json_object_processor(tokenizer, steps)
    build_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(seed)
    out, times = [], []
    while len(out) < steps:
        logits = torch.randn(tokenizer.vocab_size, generator=gen) * 3
        start = time.perf_counter()
        masked = proc(out, logits)
        times.append(time.perf_counter() - start)
        token = int(torch.multinomial(torch.softmax(masked, -1), 1, generator=gen))
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
    if not isinstance(json.loads(tokenizer.decode(out)), dict):
        raise SystemExit(f"seed {seed}: the walk did not end in a JSON object")
    return {"seed": seed, "build_s": round(build_s, 3), "steps": len(times),
            "mean_ms": round(1000 * sum(times) / len(times), 3), "max_ms": round(1000 * max(times), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", action="append", default=None, help="a folder with tokenizer.json (repeatable)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for folder in args.tokenizer or [str(bundled_model_path())]:
        tok = Tokenizer.from_folder(Path(folder))
        for seed in range(args.seeds):  # the first seed pays the table build; later ones reuse it
            row = {"tokenizer": folder, "vocab": tok.vocab_size, **walk(tok, args.steps, seed)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    save("json_mode", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
