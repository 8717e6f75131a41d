"""Summarise `qwen1m eval` output folders: the score by length, by haystack family and by task.

    python benchmarks/summarize_eval.py OUT.json NAME=DIR [NAME=DIR ...]

Each DIR is one `qwen1m eval ... --out DIR` folder (passkey.json or ruler.json inside); NAME keys
its entry in OUT.json. The scores are the mean sample score (samples are scored in percent), as `qwen1m eval` reports.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def _table(samples: list[dict], key) -> dict[str, dict]:
    groups: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        groups[key(s)].append(s["score"])
    return {k: {"score": round(sum(v) / len(v), 1), "n": len(v)} for k, v in sorted(groups.items())}


def summarize(folder: Path) -> dict:
    (path,) = [p for p in (folder / "passkey.json", folder / "ruler.json") if p.exists()]
    data = json.loads(path.read_text())
    samples = data["samples"]
    meta = {k: data["meta"][k] for k in ("suite", "model", "families", "modes", "lengths", "seed")}
    out = {"meta": meta,
           "by_length": _table(samples, lambda s: f"{s['mode']}/{s['length']}"),
           "by_family": _table(samples, lambda s: f"{s['mode']}/{s['length']}/{s['family']}")}
    if meta["suite"] == "ruler":
        out["by_task"] = _table(samples, lambda s: f"{s['mode']}/{s['length']}/{s['task']}")
    return out


def main(argv: list[str]) -> None:
    out, pairs = Path(argv[0]), [a.split("=", 1) for a in argv[1:]]
    summary = {name: summarize(Path(folder)) for name, folder in pairs}
    out.write_text(json.dumps(summary, indent=1) + "\n")
    for name, s in summary.items():
        print(name, {k: v["score"] for k, v in s["by_length"].items()})


if __name__ == "__main__":
    main(sys.argv[1:])
