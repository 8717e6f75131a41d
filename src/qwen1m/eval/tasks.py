"""The eval task registry: each task builds a prompt of exactly ``length`` tokens and its answers.

Prompts are the training path's ChatML exchanges stopped after the answer prefix (``train.tasks``):
system turn, user turn = task line + haystack + question, then ``<|im_start|>assistant`` and the
task's answer prefix, so the model's first generated token starts the answer. Length is exact by
construction: the haystack is cut to the tokens left after the fixed parts (the last filler unit is
truncated; needles, list items and documents are never split except that last unit).

RULER tasks follow ``synthetic.yaml`` (design §6.1); generators live in ``needles`` (passkey,
niah_*, vt), ``words`` (cwe, fwe) and ``qa`` (qa_1, qa_2), each saying where it departs from RULER.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from qwen1m.errors import Qwen1mError
from qwen1m.eval import heldout_tasks as held
from qwen1m.eval.context import EvalContext, EvalSample
from qwen1m.eval.needles import niah, passkey, vt
from qwen1m.eval.qa import qa_hotpotqa, qa_squad
from qwen1m.eval.words import cwe, fwe
from qwen1m.train.encoding import HaystackTooShort


@dataclass(frozen=True, slots=True)
class TaskSpec:
    name: str
    metric: str  # "passkey" (exact first number), "all" (string_match_all), "part" (string_match_part)
    max_tokens: int  # RULER's tokens_to_generate for the task
    make: Callable[[EvalContext, random.Random, int, float | None], EvalSample]
    needs: str | None = None  # a user data file ("squad" / "hotpotqa") the task cannot run without


# RULER synthetic.yaml's eight niah tasks: haystack, key and value types, counts. The same variants
# run over the training templates (eval.needles.niah) and over held-out text (eval.heldout_tasks.niah).
NIAH_VARIANTS: dict[str, dict] = {
    "niah_single_1": dict(haystack="repeat"),
    "niah_single_2": dict(haystack="essay"),
    "niah_single_3": dict(haystack="essay", value_type="uuids"),
    "niah_multikey_1": dict(haystack="essay", num_keys=4),
    "niah_multikey_2": dict(haystack="needle"),
    "niah_multikey_3": dict(haystack="needle", key_type="uuids", value_type="uuids"),
    "niah_multivalue": dict(haystack="essay", num_values=4),
    "niah_multiquery": dict(haystack="essay", num_keys=4, num_queries=4),
}


def _niah_specs(make) -> list[TaskSpec]:
    return [TaskSpec(name, "all", 128, partial(make, **kw)) for name, kw in NIAH_VARIANTS.items()]


def _registry() -> dict[str, TaskSpec]:
    specs = [
        TaskSpec("passkey", "passkey", 12, passkey),
        *_niah_specs(niah),
        TaskSpec("vt", "all", 30, vt),
        TaskSpec("cwe", "all", 120, cwe),
        TaskSpec("fwe", "all", 50, fwe),
        TaskSpec("qa_1", "part", 32, qa_squad, needs="squad"),
        TaskSpec("qa_2", "part", 32, qa_hotpotqa, needs="hotpotqa"),
    ]
    return {s.name: s for s in specs}


def _heldout_registry() -> dict[str, TaskSpec]:
    """The same task names over held-out families and phrasings, answered in plain words: no answer
    prefix, so the budget covers a sentence before the value (passkey 24 tokens, not 12)."""
    train = _registry()
    specs = [
        TaskSpec("passkey", "passkey", 24, held.passkey),
        *_niah_specs(held.niah),
        TaskSpec("vt", "all", 30, held.vt),
        # cwe / fwe are built from pseudo-words no training generator writes, and qa from the user's
        # files: the training-path versions are already held out
        train["cwe"], train["fwe"], train["qa_1"], train["qa_2"],
    ]
    return {s.name: s for s in specs}


TASKS: dict[str, TaskSpec] = _registry()
HELDOUT_TASKS: dict[str, TaskSpec] = _heldout_registry()


def task_spec(task: str, families: str = "heldout") -> TaskSpec:
    """The task of that name in the held-out ("heldout", the default) or training-template ("train") set."""
    return (HELDOUT_TASKS if families == "heldout" else TASKS)[task]


RULER_TASKS = [t for t in TASKS if t != "passkey"]  # RULER's 13, in its order
NIAH_TASKS = [t for t in TASKS if t.startswith("niah_")]


def make_sample(ec: EvalContext, task: str, length: int, depth: float | None, seed: str) -> EvalSample:
    """The sample of ``task`` at ``length`` (and ``depth`` percent, where the task takes one) for the
    seed string: the same arguments give the same tokens on every run and in every mode."""
    try:
        return task_spec(task, ec.families).make(ec, random.Random(seed), length, depth)
    except HaystackTooShort as e:
        raise Qwen1mError(f"task {task} does not fit in {length} tokens ({e}); use a longer --lengths.") from None
