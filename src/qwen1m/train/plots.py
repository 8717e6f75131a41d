"""Loss-curve PNG; matplotlib is optional (the ``eval`` extra), so this returns False without it."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_losses(entries: list[dict[str, Any]], path: str | Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    x = 0
    for name in dict.fromkeys(e["stage"] for e in entries):
        pts = [e for e in entries if e["stage"] == name]
        xs = [x + e["step"] for e in pts]
        ax.plot(xs, [e["loss"] for e in pts], label=f"{name} ({pts[0]['seq_len']} tokens)")
        x = xs[-1]
    ax.set_xlabel("step (all stages)")
    ax.set_ylabel("loss (per-row masked mean)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
