"""A shipped English word list, split once into a training half and a held-out half.

Training data draws its word-list text, code identifiers and table cells from the ``train`` half;
the held-out evaluation families (``qwen1m.eval.heldout``) draw theirs from the ``heldout`` half.
The split is by a hash of the word alone, so a word that is both a noun and a verb sits in one half,
and it never changes with the Python version, the seed or the order of the file.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources

TRAIN, HELDOUT = "train", "heldout"
POS = ("adj", "noun", "verb")


def split_of(word: str) -> str:
    """Which half ``word`` belongs to: a fixed hash, about half each way."""
    return HELDOUT if hashlib.sha1(f"qwen1m-split/{word}".encode()).digest()[0] & 1 else TRAIN


@cache
def _entries() -> tuple[tuple[str, str], ...]:
    text = resources.files("qwen1m.data").joinpath("wordlist.txt").read_text(encoding="utf-8")
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            pos, word = line.split()
            out.append((pos, word))
    return tuple(out)


@cache
def words(pos: str, split: str) -> tuple[str, ...]:
    """The words of one part of speech ("adj", "noun", "verb") in one half, in file order."""
    if pos not in POS or split not in (TRAIN, HELDOUT):
        raise ValueError(f"unknown part of speech {pos!r} or split {split!r}.")
    return tuple(w for p, w in _entries() if p == pos and split_of(w) == split)


def all_words(split: str) -> frozenset[str]:
    return frozenset(w for pos in POS for w in words(pos, split))
