"""Task generators: deterministic, exactly the requested length, answers in the context, ChatML +
answer prefix at the end; length and depth strings; scorers on known good and bad outputs."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from qwen1m.errors import Qwen1mError
from qwen1m.eval.context import EvalContext
from qwen1m.eval.grid import length_label, parse_depths, parse_lengths
from qwen1m.eval.qa import load_hotpotqa, load_squad
from qwen1m.eval.scoring import sample_score
from qwen1m.eval.tasks import RULER_TASKS, TASKS, make_sample


@pytest.fixture(scope="module")
def ec(train_ec):
    """These tests check the training-template generators (``--families train``); the held-out ones
    are tested in test_heldout_tasks.py."""
    return train_ec


SYNTHETIC = ["passkey"] + [t for t in RULER_TASKS if not TASKS[t].needs]
PREFIX_END = {"passkey": "The pass key is", "vt": "they are:", "cwe": "in the list are:", "fwe": "words are:"}


@pytest.mark.parametrize("task", SYNTHETIC)
@pytest.mark.parametrize("length", [1000, 2048])
def test_generator_exact_deterministic_answers_present(ec, task, length):
    depth = 30.0 if task == "passkey" else None
    s = make_sample(ec, task, length, depth, f"7/{task}/{length}")
    again = make_sample(ec, task, length, depth, f"7/{task}/{length}")
    other = make_sample(ec, task, length, depth, f"8/{task}/{length}")
    assert len(s.ids) == length  # exact: the haystack is cut to what the template leaves
    assert s.ids == again.ids and s.answers == again.answers
    assert s.ids != other.ids
    text = ec.enc.tokenizer.decode(s.ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_end|>\n<|im_start|>assistant\n" in text
    assert text.rstrip().endswith(PREFIX_END.get(task, "mentioned in the provided text are"))
    context = text.split("<|im_start|>user\n", 1)[1].split("<|im_start|>assistant", 1)[0]
    assert s.answers and all(a in context for a in s.answers)


def test_passkey_depth_places_the_needle(ec):
    for depth in (0.0, 50.0, 100.0):
        s = make_sample(ec, "passkey", 2048, depth, "d")
        text = ec.enc.decode(s.ids)
        at = text.index(f"The pass key is {s.answers[0]}.") / len(text)
        assert abs(at - depth / 100) < 0.1


def test_ruler_depths_drawn_from_the_grid_and_multi_needles(ec):
    s = make_sample(ec, "niah_single_2", 2048, None, "g")
    assert s.depth in [round(i * 100 / 39) for i in range(40)]
    mk = make_sample(ec, "niah_multikey_1", 2048, None, "g")
    text = ec.enc.decode(mk.ids)
    assert text.count("One of the special magic numbers for") == 4 and len(mk.answers) == 1
    mq = make_sample(ec, "niah_multiquery", 2048, None, "g")
    assert len(mq.answers) == 4 and len(make_sample(ec, "niah_multivalue", 2048, None, "g").answers) == 4
    k3 = ec.enc.decode(make_sample(ec, "niah_multikey_3", 2048, None, "g").ids)
    assert re.search(r"magic uuids for [0-9a-f]{8}-[0-9a-f]{4}-", k3)  # uuid keys in a needle haystack
    assert k3.count("One of the special magic uuids for") > 10


def test_cwe_and_fwe_answers_are_the_most_frequent(ec):
    for length in (1024, 8192):
        s = make_sample(ec, "cwe", length, None, "c")
        items = ec.enc.decode(s.ids).split("most often.\n")[1].split("\nQuestion")[0].split()
        counts = Counter(w for w in items if not w[0].isdigit())
        assert {w for w, _ in counts.most_common(10)} == set(s.answers)
        assert min(counts[a] for a in s.answers) > max(c for w, c in counts.items() if w not in s.answers)
        f = make_sample(ec, "fwe", length, None, "f")
        words = ec.enc.decode(f.ids).split("coded words.")[1].split("\nQuestion")[0].split()
        assert [w for w, _ in Counter(words).most_common(4)] == ["....", *f.answers]


def test_too_short_is_a_clear_error(ec):
    with pytest.raises(Qwen1mError, match="does not fit in 64 tokens"):
        make_sample(ec, "niah_multikey_3", 64, None, "s")


def _qa_files(tmp_path):
    squad = {"data": [{"title": f"t{a}", "paragraphs": [
        {"context": f"Article {a} paragraph {p}: the river Quillon{a}{p} flows north past many towns.",
         "qas": [{"question": f"Which river is in article {a} paragraph {p}?",
                  "answers": [{"text": f"Quillon{a}{p}"}], "is_impossible": False}]}
        for p in range(3)]} for a in range(40)]}
    hotpot = [{"question": f"Who built tower {i}?", "answer": f"Builder{i}",
               "context": [[f"Tower {i}", [f"Tower {i} was built by Builder{i}. ", "It is tall."]],
                           [f"Town {i}", [f"Town {i} holds tower {i}."]]]} for i in range(40)]
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    (tmp_path / "hotpot.json").write_text(json.dumps(hotpot))
    return tmp_path / "squad.json", tmp_path / "hotpot.json"


def test_qa_from_local_files(ec, tmp_path):
    squad, hotpot = _qa_files(tmp_path)
    qa = {"squad": load_squad(squad), "hotpotqa": load_hotpotqa(hotpot)}
    qa_ec = EvalContext(ec.enc, ec.ctx, qa, families="train")
    for task in ("qa_1", "qa_2"):
        for length in (1024, 3000):  # 3000 tokens needs more than the file's documents: they repeat
            s = make_sample(qa_ec, task, length, None, f"q/{length}")
            assert len(s.ids) == length
            assert s.ids == make_sample(qa_ec, task, length, None, f"q/{length}").ids
            text = ec.enc.decode(s.ids)
            assert "Document 1:\n" in text and text.endswith("Answer:")
            assert any(a in text.split("Question:")[0] for a in s.answers)  # gold document placed whole
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(Qwen1mError, match="SQuAD's format"):
        load_squad(tmp_path / "bad.json")
    with pytest.raises(Qwen1mError, match="does not exist"):
        load_hotpotqa(tmp_path / "missing.json")


def test_lengths_and_depths():
    assert parse_lengths("8k,4k,1m,4096,1000") == [1000, 4096, 8192, 1048576]
    assert [length_label(n) for n in (4096, 1048576, 1000)] == ["4K", "1M", "1000"]
    assert parse_depths("0:100:10") == [float(d) for d in range(0, 101, 10)]
    assert parse_depths("50,0") == [0.0, 50.0]
    for bad in ("4x", "0k", ""):
        with pytest.raises(Qwen1mError, match="--lengths"):
            parse_lengths(bad)
    for bad in ("0:100:0", "0:120:10", "a,b"):
        with pytest.raises(Qwen1mError, match="--depths"):
            parse_depths(bad)


def test_scorers_on_known_outputs():
    assert sample_score("passkey", " 51815.", ["51815"]) == 100.0
    assert sample_score("passkey", " 518150.", ["51815"]) == 0.0  # exact number, not a prefix
    assert sample_score("passkey", " The key is 1. Then 51815", ["51815"]) == 0.0  # first number only
    assert sample_score("passkey", "", ["51815"]) == 0.0
    refs = ["1234567", "7654321", "Amber-Key", "x"]
    assert sample_score("all", " 1234567, 7654321, amber-key and X.", refs) == 100.0  # case-insensitive
    assert sample_score("all", " 1234567 and amber-key.", refs) == 50.0
    assert sample_score("all", " nothing", refs) == 0.0
    assert sample_score("part", " it is 7654321", refs) == 100.0
    assert sample_score("part", " nothing", refs) == 0.0
    with pytest.raises(ValueError):
        sample_score("bleu", "", [""])
