"""Needle tasks: passkey (design §6.1), RULER's niah_* (niah.py) and variable tracking (vt).

The "essay" haystack is our offline corpus (``EvalContext``: seeded grammar stories) in place of Paul
Graham's essays; needles go between its paragraphs rather than sentences. ``words`` keys and values
are ``adj-noun`` pairs from our corpus word lists, not wonderwords'. Depths of RULER needles are drawn
from RULER's grid ``round(linspace(0, 100, 40))``; passkey depths are given by the caller.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable

from qwen1m.eval.context import EvalContext, EvalSample
from qwen1m.train.tasks import (  # the training tasks' templates and key / value makers, reused as is
    _NIAH_VALUES,
    NIAH_ANSWER_PREFIX,
    NIAH_NEEDLE,
    NIAH_QUESTION,
    NIAH_TASK,
    _word_key,
    passkey_sample,
    vt_sample,
)

RULER_DEPTHS = [round(i * 100 / 39) for i in range(40)]  # RULER niah.py: np.round(np.linspace(0, 100, 40))
PASSKEY_DIGITS = 5  # as the bundled model card's passkey rows


def passkey(ec: EvalContext, rng: random.Random, length: int, depth: float | None) -> EvalSample:
    key = rng.randint(10 ** (PASSKEY_DIGITS - 1), 10 ** PASSKEY_DIGITS - 1)
    depth = rng.random() * 100 if depth is None else depth
    s, answer = passkey_sample(ec.ctx, rng, length, depth / 100, key, with_answer=False)
    return EvalSample(s.ids, [answer], depth)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


_KEYS: dict[str, Callable[[random.Random], str]] = {"words": _word_key, "uuids": _uuid}


def niah(ec: EvalContext, rng: random.Random, length: int, depth: float | None, *, haystack: str,
         key_type: str = "words", value_type: str = "numbers", num_keys: int = 1, num_values: int = 1,
         num_queries: int = 1) -> EvalSample:
    """RULER niah.py: ``num_keys`` keys with ``num_values`` values each, the first ``num_queries``
    keys asked; haystack "repeat" (the passkey filler), "essay" (our corpus) or "needle" (needles
    of other keys)."""
    keys: list[str] = []
    while len(keys) < num_keys:
        if (k := _KEYS[key_type](rng)) not in keys:
            keys.append(k)
    values = [[_NIAH_VALUES[value_type](rng) for _ in range(num_values)] for _ in keys]
    needles = [NIAH_NEEDLE.format(type=value_type, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    depths = [depth] if depth is not None and len(needles) == 1 else rng.sample(RULER_DEPTHS, len(needles))
    inserts = [(d / 100, ec.enc(" " + n)) for d, n in zip(depths, needles)]
    if haystack == "repeat":
        units = ec.ctx.repeat_units()
    elif haystack == "essay":
        units = ec.ctx.essay_units(rng)
    else:
        def units() -> list[int]:
            k = _KEYS[key_type](rng)
            while k in keys:
                k = _KEYS[key_type](rng)
            return ec.enc(" " + NIAH_NEEDLE.format(type=value_type, key=k, value=_NIAH_VALUES[value_type](rng)))
    asked = keys[:num_queries]
    query = ", ".join(asked[:-1]) + (" and " if len(asked) > 1 else "") + asked[-1]
    ids = ec.chat_prompt(rng, length, NIAH_TASK.format(type=value_type) + "\n", units, inserts,
                         NIAH_QUESTION.format(type=value_type, query=query),
                         NIAH_ANSWER_PREFIX.format(type=value_type, query=query))
    return EvalSample(ids, [v for vs in values[:num_queries] for v in vs], depths[0] if len(needles) == 1 else None)


def vt(ec: EvalContext, rng: random.Random, length: int, depth: float | None) -> EvalSample:
    """RULER variable tracking: one chain of 4 hops (5 variables) in the passkey filler."""
    s, names = vt_sample(ec.ctx, rng, length, hops=4, with_answer=False)
    return EvalSample(s.ids, names)
