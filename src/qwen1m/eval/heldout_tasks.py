"""The eval tasks over held-out families (``eval.heldout``): passkey, RULER's eight niah tasks and vt.

Each sample draws a held-out haystack family and a held-out phrasing, and asks in plain words through
the chat template (``EvalContext.plain_chat_prompt``); the model answers from the assistant turn's
first token, with no answer prefix. Task structure (keys, values, distractors, depths) follows
``eval.needles``; RULER's "repeat" haystack becomes the held-out "refrain", its "essay" haystack any
of the prose-like held-out families, its "needle" haystack distractor needles in the held-out wording.
"""

from __future__ import annotations

import random
import string

from qwen1m.eval.context import EvalContext, EvalSample
from qwen1m.eval.heldout import KEYS, LINE_FAMILIES, NIAH_PHRASINGS, PASSKEY_PHRASINGS, VALUE_NAMES, VALUES
from qwen1m.eval.needles import PASSKEY_DIGITS, RULER_DEPTHS

PROSE_FAMILIES = ("reports", "dictionary", "logs")  # in place of RULER's essays


def _sep(family: str) -> str:
    return "\n" if family in LINE_FAMILIES else " "


def passkey(ec: EvalContext, rng: random.Random, length: int, depth: float | None) -> EvalSample:
    key = str(rng.randint(10 ** (PASSKEY_DIGITS - 1), 10 ** PASSKEY_DIGITS - 1))
    depth = rng.random() * 100 if depth is None else depth
    family = rng.choice((*PROSE_FAMILIES, "refrain"))
    k = rng.randrange(len(PASSKEY_PHRASINGS))
    ph = PASSKEY_PHRASINGS[k]
    needle = ec.enc(_sep(family) + ph.needle.format(value=key))
    ids = ec.plain_chat_prompt(rng, length, ec.heldout_units(family, rng), [(depth / 100, needle)], ph.question,
                               ph.question_first)
    return EvalSample(ids, [key], depth, family, k)


def niah(ec: EvalContext, rng: random.Random, length: int, depth: float | None, *, haystack: str,
         key_type: str = "words", value_type: str = "numbers", num_keys: int = 1, num_values: int = 1,
         num_queries: int = 1) -> EvalSample:
    """``haystack``: "repeat" (the refrain), "essay" (a held-out prose family) or "needle"."""
    keys: list[str] = []
    while len(keys) < num_keys:
        if (key := KEYS[key_type](rng)) not in keys:
            keys.append(key)
    values = [[VALUES[value_type](rng) for _ in range(num_values)] for _ in keys]
    k = rng.randrange(len(NIAH_PHRASINGS))
    ph = NIAH_PHRASINGS[k]
    one, many = VALUE_NAMES[value_type]
    family = {"repeat": "refrain", "needle": "needle"}.get(haystack) or rng.choice(PROSE_FAMILIES)
    sep = _sep(family)

    def needle(key: str, value: str) -> list[int]:
        return ec.enc(sep + ph.needle.format(one=one, key=key, value=value))

    if family == "needle":
        def units() -> list[int]:
            other = KEYS[key_type](rng)
            while other in keys:
                other = KEYS[key_type](rng)
            return needle(other, VALUES[value_type](rng))
    else:
        units = ec.heldout_units(family, rng)
    n_needles = num_keys * num_values
    depths = [depth] if depth is not None and n_needles == 1 else rng.sample(RULER_DEPTHS, n_needles)
    inserts = [(d / 100, needle(key, v)) for d, (key, v) in zip(depths, [(a, v) for a, vs in zip(keys, values)
                                                                          for v in vs])]
    asked = keys[:num_queries]
    query = ", ".join(asked[:-1]) + (" and " if len(asked) > 1 else "") + asked[-1]
    ids = ec.plain_chat_prompt(rng, length, units, inserts, ph.question.format(many=many, query=query),
                               ph.question_first)
    return EvalSample(ids, [v for vs in values[:num_queries] for v in vs], depths[0] if n_needles == 1 else None,
                      family, k)


VT_QUESTIONS = ("Which variables end up holding the value {value}? Name each such variable.",
                "List every variable whose value is {value} after all the assignments above.",
                "Trace the assignments: which variables are equal to {value}?")


def vt(ec: EvalContext, rng: random.Random, length: int, depth: float | None) -> EvalSample:
    """Variable tracking (one chain of 4 hops) in a held-out family, asked in a held-out wording."""
    names: list[str] = []
    while len(names) < 5:
        if (n := "".join(rng.choices(string.ascii_uppercase, k=5))) not in names:
            names.append(n)
    value = str(rng.randint(10 ** 4, 10 ** 5 - 1))
    family = rng.choice(PROSE_FAMILIES)
    lines = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    inserts = [(d, ec.enc(_sep(family) + line)) for d, line in zip(sorted(rng.random() for _ in lines), lines)]
    k = rng.randrange(len(VT_QUESTIONS))
    ids = ec.plain_chat_prompt(rng, length, ec.heldout_units(family, rng), inserts,
                               VT_QUESTIONS[k].format(value=value), False)
    return EvalSample(ids, names, None, family, k)
