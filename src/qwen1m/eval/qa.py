"""RULER's qa_1 (SQuAD) and qa_2 (HotpotQA) from the user's own local JSON files; nothing is downloaded.

Readers follow RULER's ``qa.py``: SQuAD (v1.1 or v2.0 dev JSON) contributes every paragraph as a
document and every answerable question with its gold paragraph (the article's other paragraphs come
first among the distractors); HotpotQA (the distractor dev JSON) contributes each question's 10
titled paragraphs. A prompt holds the gold documents plus distractors up to the length, shuffled,
each as "Document i:\\n...". The last document is cut to make the length exact (gold documents are
always placed among the whole ones); if the file runs out of documents, they repeat.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from qwen1m.errors import Qwen1mError
from qwen1m.eval.context import EvalContext, EvalSample
from qwen1m.train.encoding import SYSTEM_PROMPTS, HaystackTooShort, chat_overhead, cycle_units

QA_TASK = ("Answer the question based on the given documents. Only give me the answer and do not output any "
           "other words.\n\nThe following are given documents.\n\n")
QA_QUESTION = ("Answer the question based on the given documents. Only give me the answer and do not output "
               "any other words.\n\nQuestion: {query}")
QA_ANSWER_PREFIX = "Answer:"
LABEL_TOKENS = 12  # an upper bound of "Document 123456:\n" in tokens, so the placed documents fit whole


@dataclass(frozen=True, slots=True)
class QA:
    query: str
    outputs: list[str]
    gold: list[int]  # indices into QAData.docs
    near: list[int]  # preferred distractors (the same SQuAD article)


@dataclass(frozen=True, slots=True)
class QAData:
    docs: list[str]
    qas: list[QA]


def _read(path: str | Path, what: str):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Qwen1mError(f"--{what} {path} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Qwen1mError(f"--{what} {path} is not a JSON file ({e}).") from None


def load_squad(path: str | Path) -> QAData:
    data = _read(path, "squad")
    try:
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        index = {c: i for i, c in enumerate(docs)}
        qas = []
        for d in data["data"]:
            article = [index[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                for q in p["qas"]:
                    if not q.get("is_impossible", False) and q["answers"]:
                        i = index[p["context"]]
                        qas.append(QA(q["question"], [a["text"] for a in q["answers"]], [i],
                                      [j for j in article if j != i]))
    except (KeyError, TypeError):
        raise Qwen1mError(f"--squad {path} is not in SQuAD's format (data[].paragraphs[].context/qas[]).") from None
    if not qas:
        raise Qwen1mError(f"--squad {path} holds no answerable question.")
    return QAData(docs, qas)


def load_hotpotqa(path: str | Path) -> QAData:
    data = _read(path, "hotpotqa")
    try:
        docs = sorted({f"{t}\n{''.join(s)}" for d in data for t, s in d["context"]})
        index = {c: i for i, c in enumerate(docs)}
        qas = [QA(d["question"], [d["answer"]], [index[f"{t}\n{''.join(s)}"] for t, s in d["context"]], [])
               for d in data]
    except (KeyError, TypeError, ValueError):
        raise Qwen1mError(f"--hotpotqa {path} is not in HotpotQA's format (question/answer/context).") from None
    if not qas:
        raise Qwen1mError(f"--hotpotqa {path} holds no question.")
    return QAData(docs, qas)


def _qa(ec: EvalContext, rng: random.Random, length: int, data: QAData) -> EvalSample:
    enc = ec.enc
    q = rng.choice(data.qas)
    question = QA_QUESTION.format(query=q.query)
    fixed = (max(chat_overhead(enc, s) for s in SYSTEM_PROMPTS) + len(enc(QA_TASK)) + len(enc("\n" + question))
             + len(enc(QA_ANSWER_PREFIX)))
    budget = length - fixed
    cost = lambda i: len(enc(data.docs[i] + "\n\n")) + LABEL_TOKENS  # noqa: E731
    used = sum(cost(i) for i in q.gold)
    if used > budget:
        raise HaystackTooShort(f"the gold documents alone take {used} tokens")
    taken = set(q.gold) | set(q.near)
    rest = [i for i in range(len(data.docs)) if i not in taken]
    rng.shuffle(rest)
    order = rng.sample(q.near, len(q.near)) + rest or list(q.gold)  # RULER: the article's paragraphs first
    whole: list[int] = []
    for k in itertools.count():  # ends: every cost is >= LABEL_TOKENS; wraps (repeats) if documents run out
        i = order[k % len(order)]
        if used + cost(i) > budget:
            break
        whole.append(i)
        used += cost(i)
    extra = [order[len(whole) % len(order)]]  # the first document that does not fit whole: the cut lands here
    placed = whole + list(q.gold)
    rng.shuffle(placed)
    units = [enc(f"Document {n + 1}:\n") + enc(data.docs[i] + "\n\n") for n, i in enumerate(placed + extra)]
    ids = ec.chat_prompt(rng, length, QA_TASK, cycle_units(units, rng, start=0), [], question, QA_ANSWER_PREFIX)
    return EvalSample(ids, q.outputs)


def qa_squad(ec: EvalContext, rng: random.Random, length: int, depth: float | None) -> EvalSample:
    return _qa(ec, rng, length, ec.qa["squad"])


def qa_hotpotqa(ec: EvalContext, rng: random.Random, length: int, depth: float | None) -> EvalSample:
    return _qa(ec, rng, length, ec.qa["hotpotqa"])
