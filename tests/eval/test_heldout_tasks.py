"""Held-out task generators (the eval default): exact length, deterministic, the answers in the
document, every family and phrasing used, and the prompt is what ``llm.chat`` sends for the message."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from qwen1m.eval.heldout import DEFAULT_SYSTEM, FAMILIES, NIAH_PHRASINGS, PASSKEY_PHRASINGS, passkey_document
from qwen1m.eval.tasks import HELDOUT_TASKS, make_sample
from qwen1m.llm import bundled_model_path
from qwen1m.tokenizer import Tokenizer

HELDOUT_SYNTHETIC = [t for t, spec in HELDOUT_TASKS.items() if not spec.needs]


@pytest.mark.parametrize("task", HELDOUT_SYNTHETIC)
def test_exact_deterministic_answers_in_the_document(ec, task):
    depth = 30.0 if task == "passkey" else None
    s = make_sample(ec, task, 1500, depth, f"7/{task}")
    again = make_sample(ec, task, 1500, depth, f"7/{task}")
    assert len(s.ids) == 1500 and s.ids == again.ids and s.answers == again.answers
    assert s.ids != make_sample(ec, task, 1500, depth, f"8/{task}").ids
    text = ec.enc.tokenizer.decode(s.ids, skip_special_tokens=False)
    context = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    assert s.answers and all(a in context for a in s.answers)
    if task in ("passkey", "vt") or task.startswith("niah"):
        # plain chat: Qwen2.5's default system turn, no task line, no answer prefix
        assert text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n")
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert "special magic" not in text and "pass key" not in text


def test_passkey_draws_every_family_and_phrasing(ec):
    samples = [make_sample(ec, "passkey", 1200, 50.0, f"s{i}") for i in range(60)]
    assert Counter(s.family for s in samples).keys() == set(FAMILIES)
    assert {s.phrasing for s in samples} == set(range(len(PASSKEY_PHRASINGS)))
    for s in samples:
        text = ec.enc.decode(s.ids)
        ph = PASSKEY_PHRASINGS[s.phrasing]
        needle = ph.needle.format(value=s.answers[0])
        assert text.count(s.answers[0]) == 1 and needle in text and ph.question in text
        if not ph.question_first:  # the key sits at the asked depth of the document
            doc = text.split(DEFAULT_SYSTEM, 1)[1]
            assert abs(doc.index(needle) / len(doc) - 0.5) < 0.15


def test_niah_keys_values_and_distractors(ec):
    mk = make_sample(ec, "niah_multikey_3", 2048, None, "k")
    text = ec.enc.decode(mk.ids)
    assert mk.family == "needle" and len(mk.answers) == 1
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", mk.answers[0])
    frame = NIAH_PHRASINGS[mk.phrasing].needle.split("{")[0] or NIAH_PHRASINGS[mk.phrasing].needle.split("}")[1]
    assert text.count(frame.strip()) > 10  # distractor needles in the same held-out wording
    mq = make_sample(ec, "niah_multiquery", 2048, None, "q")
    assert len(mq.answers) == 4 and mq.family in ("reports", "dictionary", "logs")


def test_demo_document_is_the_requested_size_and_holds_the_key():
    tok = Tokenizer.from_folder(bundled_model_path())
    for family in FAMILIES:
        message, key = passkey_document(tok.encode, family, 3000, 0.3, seed=1)
        n = len(tok.encode(message))
        assert 2900 <= n <= 3100 and message.count(key) == 1
        prompt = tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)
        assert prompt.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}")
    with pytest.raises(ValueError, match="unknown held-out family 'essay'"):
        passkey_document(tok.encode, "essay", 3000, 0.3, seed=1)
