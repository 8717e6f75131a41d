"""Training haystack families and needle phrasings: the variety that teaches retrieval to transfer.

A retrieval task is a value hidden in text of some kind, asked for in some wording. Trained on one
filler and one wording, a small model learns the template, not the skill (the first bundled model
found pass keys in "The grass is green..." and nowhere else). So training draws, per sample:

- a haystack family: the grammar stories and docstrings of the corpus ("essay"), the passkey filler
  ("repeat"), random word sequences ("words"), sentences built from a large word list ("wordtext"),
  number tables ("table") and code-like lines ("code");
- a phrasing: the needle sentence, its label ("pass key", "PIN", ...), the question, where the
  question stands (after the document or before it), and how the answer is given (after an answer
  prefix, as a sentence, or the bare value).

Everything here uses the ``train`` half of ``qwen1m.data.words`` and the corpus word lists. The
held-out families and phrasings of ``qwen1m.eval.heldout`` use the other half and wordings that
appear nowhere in this file; ``tests/eval/test_heldout_disjoint.py`` checks both.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from qwen1m.data.words import TRAIN, words

UnitText = Callable[[random.Random], str]  # one haystack unit as text, starting with a space or newline


def _w(pos: str) -> tuple[str, ...]:
    return words(pos, TRAIN)


def _word_sequence(rng: random.Random) -> str:
    """Random words of the training half, in "sentences" of 6-14 words."""
    pool = _w("noun") + _w("adj") + _w("verb")
    ws = [rng.choice(pool) for _ in range(rng.randint(6, 14))]
    return " " + " ".join(ws).capitalize() + "."


_WORDTEXT = (
    "The {adj} {noun} tried to {verb} the {noun2}.",
    "A {noun} can {verb} a {adj} {noun2} when the {noun3} is near.",
    "Nobody knew why the {noun} had to {verb} before the {noun2} arrived.",
    "Some say that every {adj} {noun} will {verb} in time.",
    "The {noun} and the {noun2} did not {verb} together.",
    "If the {noun} is {adj}, the {noun2} should {verb} it.",
    "They asked the {noun} to {verb} the {adj} {noun2} again.",
)


def _wordtext(rng: random.Random) -> str:
    """Simple sentences over the large word list (wider vocabulary than the grammar stories)."""
    nouns, adjs, verbs = _w("noun"), _w("adj"), _w("verb")
    s = rng.choice(_WORDTEXT).format(noun=rng.choice(nouns), noun2=rng.choice(nouns), noun3=rng.choice(nouns),
                                     adj=rng.choice(adjs), verb=rng.choice(verbs))
    return " " + s


def _table_row(rng: random.Random) -> str:
    """A row of a pipe table with numbers: distractor numbers teach matching the label, not the digits."""
    nouns, adjs = _w("noun"), _w("adj")
    cells = [rng.choice(nouns), str(rng.randint(1, 9999)), rng.choice(adjs),
             f"{rng.randint(0, 999)}.{rng.randint(0, 99):02d}"]
    return "\n| " + " | ".join(cells) + " |"


def _code_line(rng: random.Random) -> str:
    nouns, verbs = _w("noun"), _w("verb")
    a, b, v, n = rng.choice(nouns), rng.choice(nouns), rng.choice(verbs), rng.randint(0, 255)
    return "\n" + rng.choice((
        f"def {v}_{a}({b}):",
        f"    {a}_{b} = {v}({a}, {n})",
        f"    if {a} > {n}:",
        f"    return {b} + {n}",
        f"# {v} the {a} before the {b}",
        f"class {a.capitalize()}{b.capitalize()}:",
        f"    self.{a} = {b}[{n}]",
    ))


# family -> unit text generator; "essay" and "repeat" come from the corpus and the passkey filler
TEXT_FAMILIES: dict[str, UnitText] = {
    "words": _word_sequence,
    "wordtext": _wordtext,
    "table": _table_row,
    "code": _code_line,
}
FAMILIES = ("essay", "repeat", *TEXT_FAMILIES)


def _ledger_line(rng: random.Random) -> str:
    """A dated line of counts: numbers that look like answers (dates, times, counts, ids) and carry no
    label a question names. Stage 6 answered held-out passkeys hidden among log lines with the first
    number of a line; these lines teach that a number is found by its label, not by being a number."""
    nouns, verbs = _w("noun"), _w("verb")
    date = rng.choice((f"{rng.randint(1990, 2060)}/{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}",
                       f"{rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.{rng.randint(1990, 2060)}",
                       f"day {rng.randint(1, 365)}", f"{rng.randint(0, 23):02d}h{rng.randint(0, 59):02d}"))
    a, b = rng.choice(nouns), rng.choice(nouns)
    n, m = rng.randint(1, 99999), rng.randint(1, 9999)
    return "\n" + date + " " + rng.choice((
        f"{a} {rng.choice(verbs)} {n} {b}, {m} left",
        f"#{n} {a} -> {b} ({m})",
        f"{a}={n} {b}={m}",
        f"{n} x {a} at {m} each",
        f"[{a}] {m} of {n} {b} done",
    ))


# the fixed words of the code and ledger lines (their templates are f-strings), for the held-out
# side's list of words training can write (``qwen1m.eval.heldout.training_words``)
LINE_TEMPLATE_WORDS = ("def", "if", "return", "class", "self", "the", "before", "day", "h", "x", "at", "each",
                       "left", "of", "done")

# families only the decoy tasks draw (kept out of FAMILIES so earlier stages' recipes draw as before)
EXTRA_FAMILIES: dict[str, UnitText] = {"ledger": _ledger_line}
POOL_UNITS = 4096  # units encoded per family and TaskContext; a 4K-token row draws ~200 of them


# ---- phrasings -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Phrasing:
    """One wording of a retrieval task; ``{label}``, ``{key}``, ``{value}`` / ``{values}`` and
    ``{type}`` are filled per sample."""

    needle: str
    question: str
    answer: str  # the answer as a sentence; the answer-prefix mode cuts it before the value
    intro: str = ""  # a task line before the document, or none


PASSKEY_LABELS = (
    "pass key", "password", "PIN", "special number", "magic number", "key number", "lucky number",
    "ticket number", "room number", "order number", "serial number", "pass code", "safe number",
)

PASSKEY_PHRASINGS = (
    Phrasing("The {label} is {value}. Remember it. {value} is the {label}.", "What is the {label}?",
             "The {label} is {value}.",
             "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
             "I will quiz you about the important information there."),
    Phrasing("Remember the {label}: {value}.", "What {label} is mentioned in the text?",
             "The {label} mentioned in the text is {value}."),
    Phrasing("The {label} you need is {value}.", "Tell me the {label}.", "The {label} is {value}."),
    Phrasing("{Label}: {value}.", "Find the {label} hidden in the text.", "The {label} is {value}."),
    Phrasing("Here is the {label} - {value}.", "Which number is the {label}?", "The {label} is {value}."),
    Phrasing("Do not forget that the {label} is {value}.", "What was the {label}?", "It was {value}."),
)

NIAH_PHRASINGS = (  # RULER's niah wording first
    Phrasing("One of the special magic {type} for {key} is: {value}.",
             "What are all the special magic {type} for {query} mentioned in the provided text?",
             "The special magic {type} for {query} mentioned in the provided text are {values}.",
             "Some special magic {type} are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the {type} afterwards."),
    Phrasing("{key} is linked to the {type_one} {value}.", "Which {type} are linked to {query}?",
             "The {type} linked to {query} are {values}."),
    Phrasing("Remember that the {type_one} of {key} is {value}.", "What {type} belong to {query}?",
             "The {type} of {query} are {values}."),
    Phrasing("Record for {key}: {value}.", "List the records for {query}.", "The records for {query} are {values}."),
)

# ``{type}`` plural as RULER writes it, and a singular for the needles that take one value
TYPE_ONE = {"numbers": "number", "words": "word", "uuids": "uuid"}

# How the answer is given: after the phrasing's answer prefix (RULER's way), or, as a user asking in
# plain words gets it, the value alone or in a short sentence. Neither plain form restates the
# question's label or key: a model that learns to restate one training wording stumbles on others.
ANSWER_MODES = ("prefix", "bare", "bare", "short")
SHORT_ANSWERS = ("The answer is {v}.", "It is {v}.", "{v}.")
QUESTION_FIRST_P = 0.25  # share of samples that ask before the document
PROCEDURAL_P = 0.5  # share of samples whose wording is assembled from parts (below) rather than a fixed phrasing

# Parts of assembled wordings: the needle relates a label (passkey) or key (niah) to its value in
# either order, the question names the label or key in some frame. Retrieval then has to follow the
# label or key itself, not a template around it.
_OPENERS = ("", "", "Note: ", "Remember, ", "Important: ", "By the way, ", "For the record, ", "Mind this: ")
_PASSKEY_RELATIONS = ("the {label} is {value}.", "{label}: {value}.", "{value} is the {label}.", "{label} = {value}.",
                      "the {label} reads {value}.", "use {value} as the {label}.", "the {label} was set to {value}.")
_PASSKEY_QUESTIONS = ("What is the {label}?", "{Label}?", "Give me the {label}.", "I need the {label}.",
                      "Which value is the {label}?", "Recall the {label} from the text.", "Do you know the {label}?",
                      "What was the {label} again?", "Tell me which number is the {label}.")
_NIAH_RELATIONS = ("{key} -> {value}.", "{value} belongs to {key}.", "the {type_one} for {key} is {value}.",
                   "{key} has the {type_one} {value}.", "{key}: {value}.", "{value} was assigned to {key}.",
                   "{key} goes with {value}.", "under {key} you will find {value}.")
_NIAH_QUESTIONS = ("What goes with {query}?", "Which {type} belong to {query}?", "{query}?",
                   "Give all values for {query}.", "What was assigned to {query}?",
                   "Find every {type_one} for {query}.",
                   "What is under {query}? List all.", "Which values does {query} have?")
_LABEL_NOUNS = ("number", "code", "key", "value", "digits", "figure")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def assembled_passkey_phrasing(rng: random.Random) -> tuple[Phrasing, str]:
    """(a phrasing assembled from parts, its label): the label is a fixed one or a training-half
    adjective or noun before a label noun ("brisk number", "lantern code")."""
    label = rng.choice(PASSKEY_LABELS) if rng.random() < 0.5 else \
        f"{rng.choice(_w('adj') + _w('noun'))} {rng.choice(_LABEL_NOUNS)}"
    needle = _cap(rng.choice(_OPENERS) + rng.choice(_PASSKEY_RELATIONS))
    return Phrasing(needle, rng.choice(_PASSKEY_QUESTIONS), "The answer is {value}."), label


def assembled_niah_phrasing(rng: random.Random) -> Phrasing:
    needle = _cap(rng.choice(_OPENERS) + rng.choice(_NIAH_RELATIONS))
    return Phrasing(needle, rng.choice(_NIAH_QUESTIONS), "The answer is {values}.")


def free_phrasing(rng: random.Random, subject: str) -> Phrasing:
    """A wording with no template at all: random training-half words around ``{subject}`` (the
    label or the key) and ``{value}``, in either order, and a question of random words around the
    subject. What stays constant is only that the question and the needle share the subject, so
    the model must retrieve by it. ``subject`` is "{label}" or "{key}" / "{query}"."""
    pool = _w("noun") + _w("adj") + _w("verb")

    def words_(lo: int, hi: int) -> str:
        return " ".join(rng.choice(pool) for _ in range(rng.randint(lo, hi)))

    query = "{query}" if subject == "{key}" else subject
    parts = [words_(0, 3), subject, words_(1, 3), "{value}"]
    if rng.random() < 0.5:
        parts = [words_(0, 3), "{value}", words_(1, 3), subject]
    needle = _cap(" ".join(p for p in parts if p) + rng.choice((".", ".", ";", "!")))
    question = _cap(" ".join(p for p in (words_(0, 4), query, words_(0, 4)) if p) + "?")
    return Phrasing(needle, question, "The answer is {values}." if subject == "{key}" else "The answer is {value}.")


def decoy_labels(rng: random.Random, label: str, count: int) -> list[str]:
    """``count`` labels for decoy needles: assembled like the real one, none containing it or
    contained in it (a decoy "room number" beside a "room number 2" would make the question ambiguous)."""
    out: list[str] = []
    while len(out) < count:
        other = assembled_passkey_phrasing(rng)[1]
        if label not in other and other not in label and other not in out:
            out.append(other)
    return out


def fill(template: str, **slots: str) -> str:
    """``str.format`` plus ``{Label}``: the label with its first letter capitalised; slots a template
    does not use are ignored."""
    if "label" in slots:
        slots["Label"] = _cap(slots["label"])
    return template.format(**slots)


def split_answer(sentence: str, value_text: str) -> tuple[str, str]:
    """(answer prefix, rest) of an answer sentence, cut before the value."""
    at = sentence.index(value_text)
    return sentence[:at].rstrip(), " " + sentence[at:]
