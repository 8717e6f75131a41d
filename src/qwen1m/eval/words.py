"""RULER's aggregation tasks: common words extraction (cwe) and frequent words extraction (fwe).

cwe (RULER ``common_words_extraction.py``, synthetic.yaml: freq_cw 30, freq_ucw 3, num_cw 10): a
numbered list "1. w 2. w ..." where 10 common words appear 30 times each and as many uncommon words
as fill the length appear 3 times each, shuffled; the answer is the 10 common words. Below ~6K
tokens 300 common items do not fit, so their count drops to what fills half the list (at least 6).
fwe (RULER ``freq_words_extraction.py``, alpha 2.0): coded words of 6 letters whose counts follow a
Zipf law, count(rank k) = N * k^-alpha / zeta(alpha), shuffled; rank 1 is the noise word "....",
and the answer is ranks 2-4.

Differences from RULER: our words are seeded pseudo-words (syllables, so that 1M-token lists still
find enough distinct ones) in place of wonderwords' lists, and cwe has no few-shot example. The list
is built a little longer than the prompt can hold and the haystack cut drops its tail: a few
occurrences at the end are lost, which leaves common words well above uncommon ones.
"""

from __future__ import annotations

import math
import random
import string

from qwen1m.eval.context import EvalContext, EvalSample
from qwen1m.train.encoding import cycle_units

CWE_TASK = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n")
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_ANSWER_PREFIX = "Answer: The top 10 words that appear most often in the list are:"
CWE_FREQ_COMMON, CWE_FREQ_UNCOMMON, CWE_NUM_COMMON = 30, 3, 10  # RULER synthetic.yaml

FWE_TASK = ("Read the following coded text and track the frequency of each coded word. "
            "Find the three most frequently appeared coded words.")
FWE_QUESTION = ("Question: Do not provide any explanation. Please ignore the dots '....'. "
                "What are the three most frequently appeared words in the above coded text?")
FWE_ANSWER_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"
FWE_ALPHA, FWE_VOCAB, FWE_WORD_LEN = 2.0, 2000, 6  # RULER synthetic.yaml / freq_words_extraction.py defaults
FWE_NOISE = "...."

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70: 348,600 words of 2-3 syllables


def pseudo_words(rng: random.Random):
    """Distinct lowercase pseudo-words of 2-3 syllables, drawn forever."""
    seen: set[str] = set()
    while True:
        w = "".join(rng.choices(_SYLLABLES, k=rng.randint(2, 3)))
        if w not in seen:
            seen.add(w)
            yield w


def cwe(ec: EvalContext, rng: random.Random, length: int, depth: float | None) -> EvalSample:
    enc = ec.enc
    words = pseudo_words(rng)
    common = [next(words) for _ in range(CWE_NUM_COMMON)]
    per_item = sum(len(enc(" 100.")) + len(enc(" " + w)) for w in common) / len(common)
    # short prompts cannot hold 10 x 30 items: common words then take at most half of the list,
    # still at least twice as frequent as the uncommon ones
    freq = max(2 * CWE_FREQ_UNCOMMON, min(CWE_FREQ_COMMON, int(length / per_item / 2 / CWE_NUM_COMMON)))
    items = [w for w in common for _ in range(freq)]
    total = sum(len(enc(f" {i + 1}.")) + len(enc(" " + w)) for i, w in enumerate(items))
    while total < length:  # enough items to fill any haystack of this prompt; the cut drops the rest
        w = next(words)
        for _ in range(CWE_FREQ_UNCOMMON):
            items.append(w)
            total += len(enc(f" {len(items)}.")) + len(enc(" " + w))
    rng.shuffle(items)
    units = [enc(f" {i + 1}.") + enc(" " + w) for i, w in enumerate(items)]
    ids = ec.chat_prompt(rng, length, CWE_TASK, cycle_units(units, rng, start=0), [], CWE_QUESTION,
                         CWE_ANSWER_PREFIX)
    return EvalSample(ids, common)


def fwe(ec: EvalContext, rng: random.Random, length: int, depth: float | None) -> EvalSample:
    enc = ec.enc
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < FWE_VOCAB:
        w = "".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LEN))
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    vocab[0] = FWE_NOISE
    zeta = sum(k ** -FWE_ALPHA for k in range(1, 100_000))  # zeta(2) to 1e-5
    share = [k ** -FWE_ALPHA / zeta for k in range(1, FWE_VOCAB + 1)]
    per_word = sum(s * len(enc(" " + w)) for s, w in zip(share, vocab)) / sum(share)
    n_words = math.ceil(1.1 * length / per_word) + 100
    while True:
        counts = [int(n_words * s) for s in share]
        if sum(c * len(enc(" " + w)) for c, w in zip(counts, vocab)) >= length:
            break
        n_words = int(n_words * 1.2)
    text = [w for w, c in zip(vocab, counts) for _ in range(c)]
    rng.shuffle(text)
    units = [enc(" " + w) for w in text]
    ids = ec.chat_prompt(rng, length, FWE_TASK, cycle_units(units, rng, start=0), [], FWE_QUESTION,
                         FWE_ANSWER_PREFIX)
    return EvalSample(ids, vocab[1:4])
