"""Tables and heatmaps from a results JSON.

Markdown: per suite, a summary like the report's Table 4 (rows = modes, columns = lengths, each cell
the mean over tasks of the task's mean sample score, "Avg" = the mean over lengths), then per mode a
task x length table. Passkey adds depth x length tables and one PNG heatmap per mode (length on x,
depth on y, like the report's passkey figure); matplotlib is optional (the ``eval`` extra).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from qwen1m.eval.grid import length_label
from qwen1m.eval.tasks import NIAH_TASKS, TASKS

log = logging.getLogger(__name__)


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def task_scores(records: list[dict[str, Any]]) -> dict[tuple[str, str, int], float]:
    """(mode, task, length) -> mean sample score."""
    groups: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in records:
        groups[r["mode"], r["task"], r["length"]].append(r["score"])
    return {k: mean(v) for k, v in groups.items()}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def summary_rows(records: list[dict[str, Any]], tasks: list[str] | None = None) -> dict[str, dict[int, float]]:
    """mode -> length -> mean over ``tasks`` (default all present) of the task scores."""
    scores = task_scores(records)
    out: dict[str, dict[int, float]] = {}
    for mode in _ordered(r["mode"] for r in records):
        row = {}
        for n in sorted({r["length"] for r in records}):
            xs = [s for (m, t, ln), s in scores.items() if m == mode and ln == n and (tasks is None or t in tasks)]
            if xs:
                row[n] = mean(xs)
        out[mode] = row
    return out


def markdown(records: list[dict[str, Any]], suite: str, meta: dict[str, Any]) -> str:
    lengths = sorted({r["length"] for r in records})
    modes = _ordered(r["mode"] for r in records)
    tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
    head = [f"# {suite} results", "",
            f"model `{meta.get('model')}`, seed {meta.get('seed')}, {len(records)} samples; scores 0-100 "
            "(passkey: exact match of the first number; RULER: string_match_all / string_match_part). "
            "A cell is the mean over tasks of each task's mean sample score; Avg is the mean over lengths.", ""]
    labels = [length_label(n) for n in lengths]
    groups = [("all tasks", None)]
    if any(t in NIAH_TASKS for t in tasks) and any(t not in NIAH_TASKS for t in tasks):
        groups.append(("niah_* only", NIAH_TASKS))
    for name, subset in groups:
        rows = []
        for mode, row in summary_rows(records, subset).items():
            rows.append([mode, _fmt(mean(row.values()) if row else None)] + [_fmt(row.get(n)) for n in lengths])
        head += [f"## Summary ({name})", "", _table(["mode", "Avg", *labels], rows), ""]
    scores = task_scores(records)
    for mode in modes:
        rows = []
        for t in tasks:
            cells = [scores.get((mode, t, n)) for n in lengths]
            present = [c for c in cells if c is not None]
            rows.append([t] + [_fmt(c) for c in cells] + [_fmt(mean(present) if present else None)])
        head += [f"## {mode}: task x length", "", _table(["task", *labels, "Avg"], rows), ""]
        if "passkey" in tasks:
            grid = _depth_grid(records, mode)
            depths = sorted({d for d, _ in grid})
            rows = [[f"{d:g}%"] + [_fmt(grid.get((d, n))) for n in lengths] for d in depths]
            head += [f"## {mode}: passkey accuracy by depth x length", "", _table(["depth", *labels], rows), ""]
    return "\n".join(head)


def _depth_grid(records: list[dict[str, Any]], mode: str) -> dict[tuple[float, int], float]:
    cells: dict[tuple[float, int], list[float]] = defaultdict(list)
    for r in records:
        if r["mode"] == mode and r["task"] == "passkey" and r["grid_depth"] is not None:
            cells[r["grid_depth"], r["length"]].append(r["score"])
    return {k: mean(v) for k, v in cells.items()}


def passkey_heatmaps(records: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """One PNG per mode; [] (with one log line) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'qwen1m[eval]'): no heatmap PNGs written.")
        return []
    paths = []
    for mode in _ordered(r["mode"] for r in records if r["task"] == "passkey"):
        grid = _depth_grid(records, mode)
        lengths = sorted({n for _, n in grid})
        depths = sorted({d for d, _ in grid})
        data = [[grid.get((d, n), float("nan")) for n in lengths] for d in depths]
        fig, ax = plt.subplots(figsize=(3.0 + 0.8 * len(lengths), 1.5 + 0.4 * len(depths)))
        im = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for y, row in enumerate(data):
            for x, v in enumerate(row):
                if v == v:  # not NaN: a cell that was measured
                    ax.text(x, y, f"{v:.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth (%)")
        ax.set_title(f"passkey retrieval, {mode}")
        fig.colorbar(im, ax=ax, label="accuracy (%)")
        fig.tight_layout()
        path = Path(out_dir) / f"passkey_heatmap_{mode.replace('+', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(records: list[dict[str, Any]], suite: str, meta: dict[str, Any], out_dir: str | Path,
                 heatmaps: bool = True) -> list[Path]:
    """``{suite}.md`` (and, unless ``heatmaps`` is False, the passkey heatmaps) in ``out_dir``; returns the
    paths written."""
    out = Path(out_dir)
    md = out / f"{suite}.md"
    md.write_text(markdown(records, suite, meta) + "\n", encoding="utf-8")
    wants_maps = heatmaps and any(r["task"] == "passkey" for r in records)
    return [md] + (passkey_heatmaps(records, out) if wants_maps else [])
