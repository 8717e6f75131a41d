"""Per-sample scores in [0, 100] for the task metrics (RULER ``eval/synthetic/constants.py``).

A task's score at a length is the mean of its samples' scores, which equals RULER's
``string_match_all`` / ``string_match_part`` over the same predictions.
"""

from __future__ import annotations

from qwen1m.train.scoring import passkey_correct, string_match_all, string_match_part


def sample_score(metric: str, output: str, answers: list[str]) -> float:
    if metric == "passkey":
        return 100.0 * passkey_correct(output, answers[0])
    if metric == "all":
        return string_match_all([output], [answers])
    if metric == "part":
        return string_match_part([output], [answers])
    raise ValueError(f"unknown metric {metric!r} (expected passkey, all or part).")
