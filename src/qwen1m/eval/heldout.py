"""Held-out evaluation families: text and wordings that no training generator produces.

A score measured on the training distribution says how well the model learned its templates; these
say whether retrieval transfers. Nothing here is imported by ``qwen1m.train``, and
``tests/eval/test_heldout_disjoint.py`` proves the separation:

- haystack families, each from the ``heldout`` half of ``qwen1m.data.words`` minus every word the
  training generators use: news-style "reports" prose, comma-separated "dictionary" words, service
  "logs" with timestamps and numbers, and a "refrain" of five report sentences repeated (the analog
  of the passkey filler and of RULER's noise haystack);
- three phrasings per task (needle, question, and where the question stands) in wordings that share
  no three-word fragment with a training template;
- the question asked in plain words through the model's chat template, as
  ``llm.chat([{"role": "user", "content": document + question}])`` renders it with no system
  message: no task line, no answer prefix. Seeds live under the "heldout/" namespace.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from qwen1m.data.words import HELDOUT, words

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."  # Qwen2.5's template
FAMILIES = ("reports", "dictionary", "logs", "refrain")
LINE_FAMILIES = frozenset({"logs"})
POOL_UNITS = 8192
SEED_NAMESPACE = "heldout/"


def training_words() -> frozenset[str]:
    """Every word a training generator can write: corpus lists and templates, training families
    and phrasings (lower-cased, letters only). Held-out vocabularies leave these out."""
    from qwen1m.data.words import TRAIN, all_words
    from qwen1m.train import corpus, families, tasks

    text = [*corpus._TEMPLATES, *families._WORDTEXT, *families.PASSKEY_LABELS, *families.SHORT_ANSWERS,
            *families._OPENERS, *families._PASSKEY_RELATIONS, *families._PASSKEY_QUESTIONS,
            *families._NIAH_RELATIONS, *families._NIAH_QUESTIONS, *tasks.PASSKEY_FILLER, tasks.PASSKEY_TASK,
            tasks.NIAH_TASK, tasks.VT_TASK, tasks.VT_QUESTION, tasks.VT_ANSWER_PREFIX,
            *families.LINE_TEMPLATE_WORDS]
    for ph in (*families.PASSKEY_PHRASINGS, *families.NIAH_PHRASINGS):
        text += [ph.needle, ph.question, ph.answer, ph.intro]
    lists = [corpus.FIRST_NAMES, corpus.LAST_NAMES, corpus.PLACES, corpus.BUILDINGS, corpus.ADJECTIVES,
             corpus.NOUNS, corpus.ANIMALS, corpus.COLORS, corpus.MATERIALS, corpus.WEEKDAYS, corpus.JOBS]
    found = {w.lower() for t in text + [" ".join(x) for x in lists] for w in re.findall(r"[A-Za-z]+", t)}
    return frozenset(found | all_words(TRAIN))


@cache
def vocab(pos: str) -> tuple[str, ...]:
    """Held-out words of one part of speech that no training generator uses."""
    banned = training_words()
    return tuple(w for w in words(pos, HELDOUT) if w not in banned)


# ---- haystack families ------------------------------------------------------------------------------

_REPORTS = (
    "Officials said the {adj} {noun} would be reviewed again next spring.",
    "A recent survey found most residents prefer a {adj} {noun} over a {adj2} {noun2}.",
    "The council postponed its vote on the {noun} after a {adj} debate.",
    "Researchers reported that the {noun} tends to {verb} under {adj} conditions.",
    "Shares of the {noun} firm climbed after a {adj} announcement on Thursday morning.",
    "Volunteers hope to {verb} the old {noun} before the harvest fair.",
    "Critics called the new {noun} {adj} but praised its {noun2}.",
    "Forecasters expect a {adj} week, with gusts near the {noun}.",
    "A spokesperson declined to {verb} the {noun} when reporters asked.",
    "Early figures suggest the {noun} market will stay {adj} through winter.",
)


_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeiou])")


def _report(rng: random.Random) -> str:
    nouns, adjs = vocab("noun"), vocab("adj")
    text = rng.choice(_REPORTS).format(noun=rng.choice(nouns), noun2=rng.choice(nouns), adj=rng.choice(adjs),
                                       adj2=rng.choice(adjs), verb=rng.choice(vocab("verb")))
    return " " + _A_BEFORE_VOWEL.sub(r"\1n ", text)


def _dictionary(rng: random.Random) -> str:
    pool = vocab("noun") + vocab("adj") + vocab("verb")
    return " " + ", ".join(rng.choice(pool) for _ in range(rng.randint(8, 12))) + ";"


def _log_line(rng: random.Random) -> str:
    level = rng.choice(("INFO", "INFO", "INFO", "WARN", "DEBUG"))
    svc, item = rng.choice(vocab("noun")), rng.choice(vocab("noun"))
    t = f"2031-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:" \
        f"{rng.randint(0, 59):02d}"
    return f"\n{t} {level} {svc}-svc: handled {rng.randint(1, 900)} {item} requests in {rng.randint(1, 400)} ms"


_TEXT: dict[str, Callable[[random.Random], str]] = {"reports": _report, "dictionary": _dictionary, "logs": _log_line}


def unit_texts(family: str, n: int) -> list[str]:
    """``n`` units of a held-out family, the same on every run (seeded under "heldout/")."""
    if family == "refrain":  # five report sentences, repeated in order like the passkey filler
        return unit_texts("reports", 5)
    rng = random.Random(f"{SEED_NAMESPACE}family/{family}")
    return [_TEXT[family](rng) for _ in range(n)]


# ---- phrasings ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HeldoutPhrasing:
    needle: str
    question: str
    question_first: bool = False  # the question opens the message, the document follows


PASSKEY_PHRASINGS = (
    HeldoutPhrasing("Keep this in mind: the secret code is {value}.", "Please recall the secret code from the notes."),
    HeldoutPhrasing("Jot down the memo number {value} somewhere safe.", "What memo number should I jot down?"),
    HeldoutPhrasing("My locker combination, in case you forget, is {value}.",
                    "Can you remind me of my locker combination? It is somewhere in the notes below.",
                    question_first=True),
)

NIAH_PHRASINGS = (
    HeldoutPhrasing("The catalog lists {value} as the {one} filed under {key}.",
                    "Which {many} does the catalog file under {query}?"),
    HeldoutPhrasing("Badge holder {key} was issued the {one} {value}.",
                    "What {many} were issued to badge holder {query}? Give every one."),
    HeldoutPhrasing("In the ledger, {key} maps to {value}.",
                    "Look up {query} in the ledger below and report everything it maps to.", question_first=True),
)

VALUE_NAMES = {"numbers": ("number", "numbers"), "words": ("word", "words"), "uuids": ("identifier", "identifiers")}


def word_key(rng: random.Random) -> str:
    """A RULER-style ``adj-noun`` key from the held-out vocabulary."""
    return f"{rng.choice(vocab('adj'))}-{rng.choice(vocab('noun'))}"


def uuid_value(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


VALUES: dict[str, Callable[[random.Random], str]] = {
    "numbers": lambda rng: str(rng.randint(10 ** 6, 10 ** 7 - 1)),
    "words": word_key,
    "uuids": uuid_value,
}
KEYS: dict[str, Callable[[random.Random], str]] = {"words": word_key, "uuids": uuid_value}


def passkey_document(encode: Callable[[str], list[int]], family: str, n_tokens: int, depth: float, seed: int,
                     phrasing: int = 0) -> tuple[str, str]:
    """(the user message, the pass key): about ``n_tokens`` tokens of a held-out family with a pass
    key at ``depth`` (0 = start, 1 = end) and the question in held-out phrasing ``phrasing``, as
    plain text for ``llm.chat`` (the demo; the eval suites build exact-length token prompts)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown held-out family {family!r} (known: {', '.join(FAMILIES)}).")
    rng = random.Random(f"{SEED_NAMESPACE}demo/{seed}")
    key = str(rng.randint(10_000, 99_999))
    ph = PASSKEY_PHRASINGS[phrasing]
    sep = "\n" if family in LINE_FAMILIES else " "
    needle, texts = sep + ph.needle.format(value=key), unit_texts(family, POOL_UNITS)
    total, units = len(encode(needle)) + len(encode(ph.question)) + 32, []  # 32: the chat turns around it
    while total < n_tokens:
        unit = texts[len(units) % len(texts)] if family == "refrain" else rng.choice(texts)
        units.append(unit)
        total += len(encode(unit))
    units.insert(round(depth * len(units)), needle)
    document = "".join(units).strip()
    return (ph.question + "\n\n" + document if ph.question_first else document + "\n" + ph.question), key
