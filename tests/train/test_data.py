"""Generators: deterministic for a seed, exact lengths, needles at the requested depth, scorers."""

from __future__ import annotations

import random

import pytest

from qwen1m.train.data import TASKS, make_batch, needle_prompt, pack, passkey_prompt
from qwen1m.train.encoding import HaystackTooShort, haystack
from qwen1m.train.scoring import passkey_correct, string_match_all, string_match_part
from qwen1m.train.tasks import PASSKEY_ANSWER_PREFIX, PASSKEY_NEEDLE, PASSKEY_TASK

LENGTHS = (256, 300, 1000, 2048)


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", LENGTHS)
def test_task_exact_length_and_deterministic(small_ctx, task, length):
    try:
        a = TASKS[task](small_ctx, random.Random(7), length)
    except HaystackTooShort:  # the packer then uses plain text; only vt is this long
        assert task == "vt" and length < 400
        return
    b = TASKS[task](small_ctx, random.Random(7), length)
    assert len(a.ids) == len(a.mask) == length
    assert a.ids == b.ids and a.mask == b.mask
    assert any(a.mask), "every sample trains on something"
    if task != "lm" and a.ids[0] == small_ctx.enc.im_start:
        # chat tasks: the loss covers the answer and the closing <|im_end|> only
        assert a.ids[-1] == small_ctx.enc.im_end and a.mask[-1] == 1
        first = a.mask.index(1)
        assert all(a.mask[first:]) and not any(a.mask[:first])


def test_task_answer_is_what_the_prompt_asks(small_ctx):
    s = TASKS["passkey"](small_ctx, random.Random(3), 600)
    text = small_ctx.enc.decode(s.ids)
    answer = small_ctx.enc.decode([t for t, m in zip(s.ids, s.mask) if m])
    key = answer.strip().rstrip(".")
    assert PASSKEY_NEEDLE.format(key=key) in text
    assert text.endswith(PASSKEY_ANSWER_PREFIX + answer)


@pytest.mark.parametrize("short_fraction", (0.0, 1.0))
def test_pack_fills_the_row(small_ctx, short_fraction):
    mix = {name: 1.0 for name in TASKS}
    for seed in range(4):
        row = pack(small_ctx, random.Random(seed), 1500, mix, short_fraction)
        assert len(row.ids) == len(row.mask) == 1500
    if short_fraction:  # several samples: more than one chat opening in the row
        assert row.ids.count(small_ctx.enc.im_start) + row.ids.count(small_ctx.enc.eot) > 3


def test_batches_regenerate_by_step(small_ctx):
    mix = {"passkey": 1.0, "lm": 1.0, "niah": 1.0}
    ids1, mask1 = make_batch(small_ctx, 0, 1, 5, 3, 512, mix, 0.25)
    ids2, mask2 = make_batch(small_ctx, 0, 1, 5, 3, 512, mix, 0.25)
    ids3, _ = make_batch(small_ctx, 0, 1, 6, 3, 512, mix, 0.25)
    assert ids1.shape == (3, 512) and mask1.dtype.is_floating_point is False
    assert (ids1 == ids2).all() and (mask1 == mask2).all() and not (ids1 == ids3).all()


def test_haystack_places_inserts_at_depth():
    units = iter([[1, 2, 3]] * 10_000).__next__
    needle = [9, 9]
    for depth in (0.0, 0.25, 0.5, 0.9, 1.0):
        ids, (start,) = haystack(units, 1001, [(depth, needle)])
        assert len(ids) == 1001 and ids[start:start + 2] == needle
        assert abs(start - depth * 999) <= 3  # within one filler unit of the requested depth


@pytest.mark.parametrize("depth", (0.0, 0.3, 0.7, 1.0))
@pytest.mark.parametrize("length", (500, 1777))
def test_passkey_prompt_length_depth_and_seed(small_ctx, depth, length):
    enc = small_ctx.enc
    ids, key = passkey_prompt(enc, length, depth, seed=11)
    assert len(ids) == length and len(key) == 5
    assert passkey_prompt(enc, length, depth, seed=11) == (ids, key)
    text = enc.decode(ids)
    assert text.endswith("What is the pass key?\nassistant\n" + PASSKEY_ANSWER_PREFIX)
    # the needle's position within the filler matches the requested depth (to a sentence or so)
    hay = text[text.index(PASSKEY_TASK) + len(PASSKEY_TASK): text.index("\nWhat is the pass key?")]
    needle = " " + PASSKEY_NEEDLE.format(key=key)
    at = hay.index(needle)
    rel = at / (len(hay) - len(needle))
    assert abs(rel - depth) <= 25 / (len(hay) - len(needle)) + 1e-9  # one filler sentence is < 25 chars


def test_needle_prompt(small_ctx):
    ids, answers = needle_prompt(small_ctx.enc, 900, 0.5, seed=1, haystack="essay")
    assert len(ids) == 900 and len(answers) == 1 and len(answers[0]) == 7
    assert answers[0] in small_ctx.enc.decode(ids)
    assert needle_prompt(small_ctx.enc, 900, 0.5, seed=1, haystack="essay") == (ids, answers)


def test_scorers():
    assert passkey_correct(" 12345.", "12345")
    assert passkey_correct("The pass key is 12345", "12345")
    assert not passkey_correct(" 123456.", "12345")
    assert not passkey_correct(" 1234.", "12345")
    assert not passkey_correct("no idea", "12345")
    preds = ["The numbers are 111 and 222.", "only 111"]
    refs = [["111", "222"], ["111", "222"]]
    assert string_match_all(preds, refs) == pytest.approx(75.0)
    assert string_match_part(preds, refs) == pytest.approx(100.0)
    assert string_match_all(["FOO-bar"], [["foo-BAR"]]) == 100.0
    assert string_match_part(["nothing"], [["a", "b"]]) == 0.0


@pytest.mark.parametrize("seed", range(8))
def test_passkey_decoys_answer_only_the_asked_label(small_ctx, seed):
    """Over a haystack with no digits ("words"), the prompt holds 2-5 numbers: the asked one and 1-4
    decoys, all different; the answer is the asked one, so a model must match the label."""
    import re

    from qwen1m.train.tasks import passkey_decoys

    s = passkey_decoys(small_ctx, random.Random(seed), 900, family="words")
    loss_from = s.mask.index(1)
    prompt, answer = small_ctx.enc.decode(s.ids[:loss_from]), small_ctx.enc.decode(s.ids[loss_from:])
    numbers = re.findall(r"\d+", prompt)
    key = re.search(r"\d+", answer).group()
    assert 2 <= len(numbers) <= 5 and len(set(numbers)) == len(numbers)
    assert key in numbers
