"""The held-out evaluation families can never reach the training data: disjoint word lists, no
shared wording, separate seeds, and no import path from training to the held-out generators."""

from __future__ import annotations

import ast
import pkgutil
import random
import re
from pathlib import Path

import pytest

import qwen1m.train
from qwen1m.data.words import HELDOUT, POS, TRAIN, all_words, split_of, words
from qwen1m.eval import heldout, heldout_tasks
from qwen1m.train import corpus, families, tasks
from qwen1m.train.corpus import build_corpus
from qwen1m.train.encoding import Encoder
from qwen1m.train.tasks import TASKS, TaskContext
from qwen1m.train.tokenizer_train import train_tokenizer

SLOT = re.compile(r"\{[^}]*\}")


def _norm(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _trigrams(template: str) -> set[tuple[str, ...]]:
    """Three-word windows of a template's fixed text (slots split it into fragments)."""
    out = set()
    for fragment in SLOT.split(template):
        w = _norm(fragment)
        out.update(tuple(w[i:i + 3]) for i in range(len(w) - 2))
    return out


def _training_templates() -> list[str]:
    t = [*corpus._TEMPLATES, *families._WORDTEXT, *families.SHORT_ANSWERS, *families._OPENERS,
         *families._PASSKEY_RELATIONS, *families._PASSKEY_QUESTIONS, *families._NIAH_RELATIONS,
         *families._NIAH_QUESTIONS, *families.PASSKEY_LABELS, *tasks.PASSKEY_FILLER]
    for ph in (*families.PASSKEY_PHRASINGS, *families.NIAH_PHRASINGS):
        t += [ph.needle, ph.question, ph.answer, ph.intro]
    t += [tasks.PASSKEY_TASK, tasks.PASSKEY_NEEDLE, tasks.PASSKEY_QUESTION, tasks.PASSKEY_ANSWER_PREFIX,
          tasks.NIAH_TASK, tasks.NIAH_NEEDLE, tasks.NIAH_QUESTION, tasks.NIAH_ANSWER_PREFIX, tasks.VT_TASK,
          tasks.VT_QUESTION, tasks.VT_ANSWER_PREFIX]
    return t


def _heldout_templates() -> list[str]:
    log_line = "{t} {level} {svc}-svc: handled {n} {item} requests in {ms} ms"
    t = [*heldout._REPORTS, *heldout_tasks.VT_QUESTIONS, log_line]
    for ph in (*heldout.PASSKEY_PHRASINGS, *heldout.NIAH_PHRASINGS):
        t += [ph.needle, ph.question]
    return t


HELDOUT_LABELS = ("secret code", "memo number", "locker combination", "badge holder", "the catalog", "the ledger")


def test_word_list_halves_are_disjoint_stable_and_large():
    train, held = all_words(TRAIN), all_words(HELDOUT)
    assert not train & held
    assert len(train) > 3500 and len(held) > 3500
    assert {p: (len(words(p, TRAIN)), len(words(p, HELDOUT))) for p in POS} == {
        "adj": (448, 443), "noun": (3238, 3279), "verb": (510, 523)}  # a changed hash or file shows here
    assert [split_of(w) for w in ("secret", "access", "catalog", "ledger")] == [HELDOUT, TRAIN, HELDOUT, TRAIN]


def test_heldout_vocabulary_avoids_every_training_word():
    lists = (corpus.FIRST_NAMES, corpus.LAST_NAMES, corpus.PLACES, corpus.BUILDINGS, corpus.ADJECTIVES,
             corpus.NOUNS, corpus.ANIMALS, corpus.COLORS, corpus.MATERIALS, corpus.WEEKDAYS, corpus.JOBS)
    training = all_words(TRAIN) | {w for ws in lists for x in ws for w in _norm(x)}
    training |= {w for t in _training_templates() for w in _norm(SLOT.sub(" ", t))}
    for pos in POS:
        held = set(heldout.vocab(pos))
        assert len(held) > 300 and not held & training
    # every word a held-out family writes outside its own fixed text comes from that vocabulary
    fixed = {w for t in _heldout_templates() for w in _norm(SLOT.sub(" ", t))} | {"info", "warn", "debug", "an"}
    allowed = set(heldout.vocab("adj") + heldout.vocab("noun") + heldout.vocab("verb")) | fixed
    for family in heldout.FAMILIES:
        text = " ".join(heldout.unit_texts(family, 500))
        assert set(_norm(text)) <= allowed, family


def test_no_training_family_writes_a_heldout_word():
    """Sampled units of every training family, their fixed text included (the code and ledger lines
    are f-strings), hold no word of the held-out vocabulary."""
    held = set(heldout.vocab("adj") + heldout.vocab("noun") + heldout.vocab("verb"))
    for family, gen in {**families.TEXT_FAMILIES, **families.EXTRA_FAMILIES}.items():
        rng = random.Random(f"disjoint/{family}")
        written = {w for _ in range(3000) for w in _norm(gen(rng))}
        assert not written & held, (family, sorted(written & held)[:10])


def test_heldout_wordings_share_no_fragment_with_training_templates():
    training = set().union(*map(_trigrams, _training_templates()))
    for t in _heldout_templates():
        assert not _trigrams(t) & training, t


@pytest.fixture(scope="module")
def training_text() -> str:
    """The text training sees: the corpus the trainer builds (grammar stories and the stdlib
    docstrings) and samples of every training task over every haystack family."""
    paragraphs = build_corpus(seed=0, num_grammar=1500, stdlib=True)
    enc = Encoder(train_tokenizer(tasks.tokenizer_texts(paragraphs[:400], repeats=2), vocab_size=600))
    ctx = TaskContext.build(enc, paragraphs)
    samples = [enc.decode(TASKS[name](ctx, random.Random(f"disjoint/{i}"), 1500).ids)
               for name in TASKS for i in range(12)]
    return " ".join(_norm(" ".join(paragraphs + samples)))


def test_no_heldout_fragment_label_or_sentence_occurs_in_training_text(training_text):
    padded = f" {training_text} "  # (membership is computed first: pytest would diff the whole text)
    grams = {" ".join(g) for t in _heldout_templates() for g in _trigrams(t)}
    units = [" ".join(_norm(u)) for family in ("reports", "dictionary") for u in heldout.unit_texts(family, 50)]
    found = [x for x in [*grams, *HELDOUT_LABELS, *units] if f" {x} " in padded]
    assert found == []


def test_training_code_cannot_reach_the_heldout_generators():
    """Nothing under qwen1m.train imports qwen1m.eval, and held-out seeds live in their own namespace."""
    root = Path(qwen1m.train.__file__).parent
    for info in pkgutil.iter_modules([str(root)]):
        tree = ast.parse((root / f"{info.name}.py").read_text())
        imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m.startswith("qwen1m.eval")], info.name
        assert heldout.SEED_NAMESPACE not in (root / f"{info.name}.py").read_text()
    # seeded under the namespace: the same units every run, none of them a training family's
    assert heldout.unit_texts("reports", 3) == heldout.unit_texts("reports", 3)
    train_units = {families.TEXT_FAMILIES[f](random.Random(f"train-family/{f}")) for f in families.TEXT_FAMILIES}
    assert not train_units & set(heldout.unit_texts("reports", 200) + heldout.unit_texts("dictionary", 200))
