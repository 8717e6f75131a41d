"""Scorers for the passkey and RULER-style tasks (design §6.1)."""

from __future__ import annotations

import re
from collections.abc import Sequence

_INT = re.compile(r"\d+")


def passkey_correct(output: str, answer: str) -> bool:
    """Exact match: the first number in the model's output is the pass key."""
    m = _INT.search(output)
    return m is not None and m.group(0) == answer.strip()


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER: per sample, the fraction of references found (case-insensitive substring); mean x 100."""
    if not preds:
        return 0.0
    per = [sum(r.lower() in p.lower() for r in rs) / len(rs) for p, rs in zip(preds, refs)]
    return 100.0 * sum(per) / len(preds)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER: per sample, 1 if any reference is found (case-insensitive substring); mean x 100."""
    if not preds:
        return 0.0
    per = [max(r.lower() in p.lower() for r in rs) for p, rs in zip(preds, refs)]
    return 100.0 * sum(per) / len(preds)
