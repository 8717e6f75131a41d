"""Seeded generators of training and evaluation samples, each of an exact token length.

Every generator is ``gen(ctx, rng, length) -> Sample``. Tasks are ChatML exchanges whose loss covers
the answer only; ``lm`` is natural text with the loss on every token. Templates:

- passkey: design §6.1 / landmark-attention ``test_passkey.py`` (task line, "The grass is green..."
  filler, "The pass key is N. Remember it. N is the pass key." at a depth, "What is the pass key?"
  with the answer prefix "The pass key is" opening the assistant turn).
- niah_*: RULER's ``niah.py`` needle, template and answer prefix; haystack "repeat" (the filler),
  "essay" (our corpus in place of Paul Graham's essays) or "needle" (distractor needles).
- vt: RULER's variable tracking (one chain of 4 hops in the filler).
- keyword / position / reorder / fim: Qwen2.5-1M's synthetic tasks (design §5.1) over corpus paragraphs.
"""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from qwen1m.train.corpus import ADJECTIVES, NOUNS
from qwen1m.train.encoding import (
    SYSTEM_PROMPTS,
    Encoder,
    Sample,
    chat_overhead,
    chat_sample,
    cycle_units,
    haystack,
)
from qwen1m.train.families import (
    ANSWER_MODES,
    EXTRA_FAMILIES,
    FAMILIES,
    NIAH_PHRASINGS,
    PASSKEY_LABELS,
    PASSKEY_PHRASINGS,
    POOL_UNITS,
    PROCEDURAL_P,
    QUESTION_FIRST_P,
    SHORT_ANSWERS,
    TEXT_FAMILIES,
    TYPE_ONE,
    Phrasing,
    assembled_niah_phrasing,
    assembled_passkey_phrasing,
    decoy_labels,
    fill,
    free_phrasing,
    split_answer,
)

PASSKEY_TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_ANSWER_PREFIX = "The pass key is"

NIAH_TASK = ("Some special magic {type} are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the {type} afterwards.")
NIAH_NEEDLE = "One of the special magic {type} for {key} is: {value}."
NIAH_QUESTION = "What are all the special magic {type} for {query} mentioned in the provided text?"
NIAH_ANSWER_PREFIX = "The special magic {type} for {query} mentioned in the provided text are"

VT_TASK = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
VT_ANSWER_PREFIX = ("Answer: According to the chain(s) of variable assignment in the text above, "
                    "{n} variables are assigned the value {value}, they are:")

MAX_ANSWER_TOKENS = 48  # quoted sentences are cut here so a task's fixed part stays bounded


@dataclass(slots=True)
class TaskContext:
    """What the generators share: the encoder and the corpus, tokenised once."""

    enc: Encoder
    paragraphs: list[str]
    paragraph_ids: list[list[int]]
    newline: list[int]
    filler_ids: list[list[int]]
    essay_ids: list[list[int]]  # paragraph_ids each followed by a newline
    pools: dict[str, list[list[int]]] = field(default_factory=dict)  # family -> encoded units, built lazily

    @classmethod
    def build(cls, enc: Encoder, paragraphs: list[str]) -> TaskContext:
        ids, nl = enc.encode_batch(paragraphs), enc("\n")
        return cls(enc, paragraphs, ids, nl, [enc(" " + s) for s in PASSKEY_FILLER], [p + nl for p in ids])

    def essay_units(self, rng: random.Random) -> Callable[[], list[int]]:
        return cycle_units(self.essay_ids, rng)

    def repeat_units(self) -> Callable[[], list[int]]:
        return cycle_units(self.filler_ids, random.Random(0), start=0)

    def warm_families(self) -> None:
        """Encode every family's pool now: the trainer calls this before DataLoader workers fork, so
        they share the pools instead of each building them, and step timing is not skewed."""
        for family in (*TEXT_FAMILIES, *EXTRA_FAMILIES):
            self.family_units(family, random.Random(0))

    def family_units(self, family: str, rng: random.Random) -> Callable[[], list[int]]:
        """Units of one training haystack family (``families.FAMILIES``), drawn at random from a pool
        encoded once per context (one ``encode_batch``, not one call per unit)."""
        if family == "essay":
            return self.essay_units(rng)
        if family == "repeat":
            return self.repeat_units()
        pool = self.pools.get(family)
        if pool is None:
            gen, prng = {**TEXT_FAMILIES, **EXTRA_FAMILIES}[family], random.Random(f"train-family/{family}")
            pool = self.pools[family] = self.enc.encode_batch([gen(prng) for _ in range(POOL_UNITS)])
        return lambda: pool[rng.randrange(len(pool))]


def chat_task(ctx: TaskContext, rng: random.Random, length: int | None, head: str, units, inserts,
              tail: str, prefix: str, answer: str, system: str | None = None) -> Sample:
    """head + haystack(inserts) + tail as the user turn, then prefix + answer; ``length`` counts all
    tokens of the sample, or of the prompt alone (answer left out) when ``answer`` is empty."""
    enc = ctx.enc
    system = rng.choice(SYSTEM_PROMPTS) if system is None else system
    head_ids, tail_ids, prefix_ids = enc(head), enc("\n" + tail) if tail else [], enc(prefix)
    answer_ids = enc(answer) if answer else []
    fixed = chat_overhead(enc, system) + len(head_ids) + len(tail_ids) + len(prefix_ids) + len(answer_ids)
    if not answer:
        fixed -= 1  # a prompt stops before the answer's closing <|im_end|>
    hay, _ = haystack(units, length - fixed, inserts)
    s = chat_sample(enc, system, head_ids + hay + tail_ids, prefix_ids, answer_ids)
    if not answer:
        del s.ids[-1:], s.mask[-1:]
    return s


def passkey_sample(ctx: TaskContext, rng: random.Random, length: int, depth: float | None = None,
                   key: int | None = None, with_answer: bool = True) -> tuple[Sample, str]:
    key = key if key is not None else rng.randint(10 ** (d := rng.randint(2, 6)), 10 ** (d + 1) - 1)
    depth = rng.random() if depth is None else depth
    needle = ctx.enc(" " + PASSKEY_NEEDLE.format(key=key))
    s = chat_task(ctx, rng, length, PASSKEY_TASK, ctx.repeat_units(), [(depth, needle)], PASSKEY_QUESTION,
              PASSKEY_ANSWER_PREFIX, f" {key}." if with_answer else "")
    return s, str(key)


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


_NIAH_VALUES: dict[str, Callable[[random.Random], str]] = {
    "numbers": lambda rng: str(rng.randint(10 ** 6, 10 ** 7 - 1)),
    "words": _word_key,
    "uuids": lambda rng: str(uuid.UUID(int=rng.getrandbits(128), version=4)),
}


def niah_sample(ctx: TaskContext, rng: random.Random, length: int, depth: float | None = None,
                haystack_kind: str | None = None, value_type: str | None = None, num_keys: int = 1,
                num_values: int = 1, num_queries: int = 1, with_answer: bool = True) -> tuple[Sample, list[str]]:
    """RULER niah: ``num_keys`` keys (the first ``num_queries`` are asked), ``num_values`` per key."""
    kind = haystack_kind or rng.choice(("repeat", "essay", "needle"))
    vtype = value_type or rng.choice(("numbers", "numbers", "words", "uuids"))
    keys: list[str] = []
    while len(keys) < num_keys:
        if (k := _word_key(rng)) not in keys:
            keys.append(k)
    values = [[_NIAH_VALUES[vtype](rng) for _ in range(num_values)] for _ in keys]
    inserts = [(depth if depth is not None and num_keys * num_values == 1 else rng.random(),
                ctx.enc(" " + NIAH_NEEDLE.format(type=vtype, key=k, value=v)))
               for k, vs in zip(keys, values) for v in vs]
    if kind == "repeat":
        units = ctx.repeat_units()
    elif kind == "essay":
        units = ctx.essay_units(rng)
    else:
        def units() -> list[int]:
            k = _word_key(rng)
            while k in keys:
                k = _word_key(rng)
            return ctx.enc(" " + NIAH_NEEDLE.format(type=vtype, key=k, value=_NIAH_VALUES[vtype](rng)))
    query = ", ".join(keys[:num_queries - 1]) + (" and " if num_queries > 1 else "") + keys[num_queries - 1]
    answers = [v for vs in values[:num_queries] for v in vs]
    s = chat_task(ctx, rng, length, NIAH_TASK.format(type=vtype) + "\n", units, inserts,
              NIAH_QUESTION.format(type=vtype, query=query), NIAH_ANSWER_PREFIX.format(type=vtype, query=query),
              " " + ", ".join(answers) + "." if with_answer else "")
    return s, answers


def niah_any(ctx: TaskContext, rng: random.Random, length: int) -> Sample:
    variant = rng.choice(("single", "single", "multikey", "multivalue", "multiquery"))
    if length < 1024:  # four uuid needles alone take ~200 tokens
        variant = "single"
    kw = {"multikey": dict(num_keys=4), "multivalue": dict(num_values=4),
          "multiquery": dict(num_keys=4, num_queries=4)}.get(variant, {})
    return niah_sample(ctx, rng, length, **kw)[0]


LINE_FAMILIES = frozenset({"table", "code", "ledger"})  # units are lines: a needle there starts a line of its own


def retrieval_sample(ctx: TaskContext, rng: random.Random, length: int, phrasing: Phrasing,
                     units: Callable[[], list[int]], needles: list[tuple[float, str]], question: str,
                     answer: str, value_text: str, sep: str = " ", answer_mode: str | None = None,
                     question_first: bool | None = None) -> Sample:
    """A retrieval exchange in one of the ways a user asks: the question after the document or before
    it, the phrasing's task line or none, and the answer after an answer prefix, as a sentence or
    bare. ``needles`` are (depth, sentence); ``value_text`` is the part of ``answer`` asked for."""
    mode = answer_mode or rng.choice(ANSWER_MODES)
    if mode == "prefix":
        prefix, said = split_answer(answer, value_text)
    else:
        prefix, said = "", value_text if mode == "bare" else rng.choice(SHORT_ANSWERS).format(v=value_text)
    intro = phrasing.intro + "\n" if phrasing.intro and rng.random() < 0.5 else ""
    first = rng.random() < QUESTION_FIRST_P if question_first is None else question_first
    head, tail = (intro + question + "\n\n", "") if first else (intro, question)
    inserts = [(d, ctx.enc(sep + n)) for d, n in needles]
    return chat_task(ctx, rng, length, head, units, inserts, tail, prefix, said)


def passkey_varied(ctx: TaskContext, rng: random.Random, length: int, free: bool = False) -> Sample:
    """A number hidden in any training family, labelled and asked for in any training phrasing
    (``free``: in random words around the label, ``families.free_phrasing``)."""
    if free:
        label = assembled_passkey_phrasing(rng)[1]
        ph = free_phrasing(rng, "{label}")
    elif rng.random() < PROCEDURAL_P:
        ph, label = assembled_passkey_phrasing(rng)
    else:
        ph, label = rng.choice(PASSKEY_PHRASINGS), rng.choice(PASSKEY_LABELS)
    key = str(rng.randint(10 ** (d := rng.randint(2, 6)), 10 ** (d + 1) - 1))
    family = rng.choice(FAMILIES)
    return retrieval_sample(ctx, rng, length, ph, ctx.family_units(family, rng),
                            [(rng.random(), fill(ph.needle, label=label, value=key))], fill(ph.question, label=label),
                            fill(ph.answer, label=label, value=key), key,
                            sep="\n" if family in LINE_FAMILIES else " ")


DECOY_FAMILIES = (*FAMILIES, "ledger", "ledger", "table")  # numbers everywhere: the label must decide


def passkey_decoys(ctx: TaskContext, rng: random.Random, length: int, family: str | None = None) -> Sample:
    """A labelled number among 1-4 decoys: other labels, other numbers, in the same wording, over
    number-heavy families as often as not. Only the asked label's value is right, so the model must
    match the label, not take the first (or any) number it sees."""
    if rng.random() < 0.5:
        label = assembled_passkey_phrasing(rng)[1]
        ph = free_phrasing(rng, "{label}")
    else:
        ph, label = assembled_passkey_phrasing(rng)

    def number() -> str:
        return str(rng.randint(10 ** (d := rng.randint(2, 6)), 10 ** (d + 1) - 1))

    key = number()
    needles = [(rng.random(), fill(ph.needle, label=label, value=key))]
    for other in decoy_labels(rng, label, rng.randint(1, 4)):
        value = number()
        while value == key:
            value = number()
        needles.append((rng.random(), fill(ph.needle, label=other, value=value)))
    family = family or rng.choice(DECOY_FAMILIES)
    return retrieval_sample(ctx, rng, length, ph, ctx.family_units(family, rng), needles,
                            fill(ph.question, label=label), fill(ph.answer, label=label, value=key), key,
                            sep="\n" if family in LINE_FAMILIES else " ")


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def niah_varied(ctx: TaskContext, rng: random.Random, length: int, free: bool = False) -> Sample:
    """RULER's niah variants (single / multikey / multivalue / multiquery, word or uuid keys, number,
    word or uuid values, distractor needles) over any training family, in any training phrasing."""
    variant = rng.choice(("single", "single", "multikey", "multivalue", "multiquery"))
    if length < 1024:
        variant = "single"
    num_keys = 4 if variant in ("multikey", "multiquery") else 1
    num_values = 4 if variant == "multivalue" else 1
    num_queries = 4 if variant == "multiquery" else 1
    vtype = rng.choice(("numbers", "words", "uuids", "uuids"))
    new_key = _uuid if rng.random() < 0.25 else _word_key
    if free:
        ph = free_phrasing(rng, "{key}")
    else:
        ph = assembled_niah_phrasing(rng) if rng.random() < PROCEDURAL_P else rng.choice(NIAH_PHRASINGS)
    keys: list[str] = []
    while len(keys) < num_keys:
        if (k := new_key(rng)) not in keys:
            keys.append(k)
    values = [[_NIAH_VALUES[vtype](rng) for _ in range(num_values)] for _ in keys]

    def needle(k: str, v: str) -> str:
        return fill(ph.needle, type=vtype, type_one=TYPE_ONE[vtype], key=k, value=v)

    family = rng.choice((*FAMILIES, "needle", "needle"))
    sep = "\n" if family in LINE_FAMILIES else " "
    if family == "needle":  # distractors: the same needle with other keys
        def units() -> list[int]:
            k = new_key(rng)
            while k in keys:
                k = new_key(rng)
            return ctx.enc(" " + needle(k, _NIAH_VALUES[vtype](rng)))
    else:
        units = ctx.family_units(family, rng)
    query = ", ".join(keys[:num_queries - 1]) + (" and " if num_queries > 1 else "") + keys[num_queries - 1]
    answers = [v for vs in values[:num_queries] for v in vs]
    joined = ", ".join(answers)
    answer = fill(ph.answer, type=vtype, query=query, values=joined)
    return retrieval_sample(ctx, rng, length, ph, units,
                            [(rng.random(), needle(k, v)) for k, vs in zip(keys, values) for v in vs],
                            fill(ph.question, type=vtype, type_one=TYPE_ONE[vtype], query=query), answer, joined,
                            sep=sep)


def lm_families(ctx: TaskContext, rng: random.Random, length: int) -> Sample:
    """Plain text of one training family, loss on every token: the model learns to read each kind."""
    family = rng.choice(tuple(f for f in FAMILIES if f != "repeat") if ctx.paragraphs else tuple(TEXT_FAMILIES))
    ids, _ = haystack(ctx.family_units(family, rng), length - 1, [])
    return Sample([ctx.enc.eot, *ids], [0] + [1] * len(ids))


def vt_sample(ctx: TaskContext, rng: random.Random, length: int, hops: int = 4,
              with_answer: bool = True) -> tuple[Sample, list[str]]:
    names: list[str] = []
    while len(names) < hops + 1:
        if (n := "".join(rng.choices(string.ascii_uppercase, k=5))) not in names:
            names.append(n)
    value = str(rng.randint(10 ** 4, 10 ** 5 - 1))
    lines = [f" VAR {names[0]} = {value}."] + [f" VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = sorted(rng.random() for _ in lines)
    inserts = [(d, ctx.enc(line)) for d, line in zip(depths, lines)]
    s = chat_task(ctx, rng, length, VT_TASK + "\n", ctx.repeat_units(), inserts, VT_QUESTION.format(value=value),
              VT_ANSWER_PREFIX.format(n=len(names), value=value),
              " " + " ".join(names) + "." if with_answer else "")
    return s, names


def _first_sentence(text: str) -> str:
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def _labelled_paragraphs(ctx: TaskContext, rng: random.Random, budget: int) -> tuple[list[list[int]], list[int]]:
    """Units "Paragraph i:\\n<text>\\n" from a random corpus offset that fit in ``budget`` tokens
    (the last may be cut by the haystack); returns the units and their corpus indices."""
    start = rng.randrange(len(ctx.paragraphs))
    units, index, used = [], [], 0
    while used < budget:
        j = (start + len(units)) % len(ctx.paragraphs)
        units.append(ctx.enc(f"Paragraph {len(units) + 1}:\n") + ctx.paragraph_ids[j] + ctx.newline)
        index.append(j)
        used += len(units[-1])
    return units, index


def _complete(units: list[list[int]], budget: int) -> int:
    """How many leading units fit whole in ``budget`` tokens."""
    total = 0
    for i, u in enumerate(units):
        total += len(u)
        if total > budget:
            return i
    return len(units)


def _paragraph_task(ctx: TaskContext, rng: random.Random, length: int, kind: str) -> Sample:
    """keyword / position / reorder over labelled paragraphs; the answer budget is reserved first so
    the chosen paragraphs are whole in the final haystack."""
    est = length - 260 - MAX_ANSWER_TOKENS  # 260 bounds chat + head + question + excerpts
    units, index = _labelled_paragraphs(ctx, rng, max(est, 1))
    n_whole = _complete(units, est)
    if n_whole < 2:
        return lm_sample(ctx, rng, length)
    if kind == "keyword":
        t = rng.randrange(n_whole)
        kw = _word_key(rng)
        units[t] = units[t][:-len(ctx.newline)] + ctx.enc(f" The keyword {kw} is written here.") + ctx.newline
        head = "Read the numbered paragraphs below.\n"
        q, prefix, answer = f"Which paragraph mentions the keyword {kw}?", "The keyword is in paragraph", f" {t + 1}."
    elif kind == "position":
        t = rng.randrange(n_whole)
        shift, where = rng.choice(((0, "paragraph {i}"), (1, "the paragraph after paragraph {i}"),
                                   (-1, "the paragraph before paragraph {i}")))
        t = min(max(t, 1), n_whole - 2) if shift else t
        i = t - shift + 1
        text = _first_sentence(ctx.paragraphs[index[t]])
        head = "Read the numbered paragraphs below.\n"
        q, prefix = f"Quote the first sentence of {where.format(i=i)}.", "The first sentence is:"
        answer = ctx.enc.decode(ctx.enc(" " + text)[:MAX_ANSWER_TOKENS])
    else:  # reorder
        m = min(4, n_whole)
        picked = sorted(rng.sample(range(n_whole), m))
        shown = picked[:]
        rng.shuffle(shown)
        labels = "ABCD"[:m]
        excerpts = "\n".join(f"[{labels[k]}] " + ctx.enc.decode(
            ctx.enc(_first_sentence(ctx.paragraphs[index[p]]))[:24]) for k, p in enumerate(shown))
        head = "Read the numbered paragraphs below.\n"
        q = f"Here are {m} excerpts in shuffled order:\n{excerpts}\nIn which order do they appear in the text above?"
        prefix, answer = "The order is", " " + ", ".join(labels[shown.index(p)] for p in picked) + "."
    return chat_task(ctx, rng, length, head, cycle_units(units, rng, start=0), [], q, prefix, answer)


def fim_sample(ctx: TaskContext, rng: random.Random, length: int) -> Sample:
    """Fill-in-the-middle: a span of the document is replaced by [MISSING]; the answer restores it."""
    span_len = rng.randint(4, 32)
    marker = ctx.enc(" [MISSING]")
    doc_len = length - 120 - span_len
    if doc_len < 4 * span_len:
        return lm_sample(ctx, rng, length)
    doc = lm_sample(ctx, rng, doc_len + span_len).ids[1:]
    at = rng.randint(doc_len // 10, doc_len - doc_len // 10)
    span = doc[at: at + span_len]
    holed = doc[:at] + marker + doc[at + span_len:]
    head = "Fill in the part of the text below that was replaced by [MISSING].\n"
    answer = ctx.enc.decode(span)
    return chat_task(ctx, rng, length, head, cycle_units([holed], rng, start=0), [],
                 "Write the missing part.", "The missing part is:", " " + answer.strip())


def lm_sample(ctx: TaskContext, rng: random.Random, length: int) -> Sample:
    """Natural text from a random paragraph on, loss on every token; starts with <|endoftext|>."""
    units = ctx.essay_units(rng)
    ids, _ = haystack(units, length - 1, [])
    return Sample([ctx.enc.eot, *ids], [0] + [1] * len(ids))


TASKS: dict[str, Callable[[TaskContext, random.Random, int], Sample]] = {
    "lm": lm_sample,
    "passkey": lambda ctx, rng, n: passkey_sample(ctx, rng, n)[0],
    "niah": niah_any,
    "vt": lambda ctx, rng, n: vt_sample(ctx, rng, n)[0],
    "keyword": lambda ctx, rng, n: _paragraph_task(ctx, rng, n, "keyword"),
    "position": lambda ctx, rng, n: _paragraph_task(ctx, rng, n, "position"),
    "reorder": lambda ctx, rng, n: _paragraph_task(ctx, rng, n, "reorder"),
    "fim": fim_sample,
    # the transfer tasks: many haystack families and phrasings (families.py)
    "passkey_varied": passkey_varied,
    "niah_varied": niah_varied,
    "lm_families": lm_families,
    "passkey_free": lambda ctx, rng, n: passkey_varied(ctx, rng, n, free=True),
    "niah_free": lambda ctx, rng, n: niah_varied(ctx, rng, n, free=True),
    "passkey_decoys": passkey_decoys,
}
# Below this many tokens a task's fixed part does not fit; the packer uses ``lm`` instead.
MIN_TASK_LENGTH = 256


def tokenizer_texts(paragraphs: list[str], seed: int = 0, repeats: int = 200) -> list[str]:
    """The corpus plus the task templates, chat roles and key words, so that the BPE learns the
    phrases every prompt repeats (a template costs fewer tokens, a haystack holds more filler)."""
    rng = random.Random(seed)
    fixed = [PASSKEY_TASK, " ".join(PASSKEY_FILLER), PASSKEY_NEEDLE.format(key=""), PASSKEY_QUESTION,
             PASSKEY_ANSWER_PREFIX, VT_TASK, *SYSTEM_PROMPTS, "system\n", "user\n", "assistant\n",
             "Read the numbered paragraphs below.", "Paragraph 1:\n", "Quote the first sentence of",
             "Fill in the part of the text below that was replaced by [MISSING].",
             "In which order do they appear in the text above?"]
    for t in ("numbers", "words", "uuids"):
        fixed += [NIAH_TASK.format(type=t), NIAH_NEEDLE.format(type=t, key="", value=""),
                  NIAH_QUESTION.format(type=t, query=""), NIAH_ANSWER_PREFIX.format(type=t, query="")]
    fixed += [VT_QUESTION.format(value=""), VT_ANSWER_PREFIX.format(n="", value="")]
    keys = [" " + " ".join(_word_key(rng) for _ in range(20)) for _ in range(repeats * 5)]
    return paragraphs + fixed * repeats + keys
