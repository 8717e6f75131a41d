"""The runner with a stand-in LLM (no model): batching, records, resume after an interruption."""

from __future__ import annotations

import json
import re

import pytest

from qwen1m.errors import Qwen1mError
from qwen1m.eval.report import markdown, summary_rows
from qwen1m.eval.runner import ResultStore, passkey_jobs, ruler_jobs, run_suite
from qwen1m.outputs import CompletionOutput, RequestOutput


class EchoLLM:
    """Answers every prompt with the 5-digit number in it (the passkey: held-out haystacks hold no other),
    or raises on call ``fail_on``, like a run killed mid-way."""

    def __init__(self, enc, fail_on: int | None = None):
        self.enc, self.fail_on, self.calls = enc, fail_on, []

    def generate(self, prompts, params, progress=None):
        self.calls.append(len(prompts))
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise KeyboardInterrupt
        outs = []
        for i, ids in enumerate(prompts):
            text = self.enc.decode(ids)
            keys = re.findall(r"(?<!\d)\d{5}(?!\d)", text)
            key = keys[-1] if len(keys) == 1 else "?"
            outs.append(RequestOutput(str(i), None, ids, [CompletionOutput(0, f" {key}.", [])], finished=True))
        return outs


def _run(ec, path, modes, fail_on=None, batch_size=4):
    jobs = passkey_jobs([1024, 2048], [0.0, 100.0], 3)
    store = ResultStore(path, {"suite": "passkey", "model": "m", "seed": 0})
    llms = []

    def make(mode):
        llms.append(EchoLLM(ec.enc, fail_on))
        return llms[-1]

    run_suite(jobs, modes, make, ec, store, seed=0, batch_size=batch_size)
    return store, llms


def test_batches_records_and_report(ec, tmp_path):
    store, llms = _run(ec, tmp_path / "passkey.json", ["rope", "dca"])
    assert [llm.calls for llm in llms] == [[4, 4, 4]] * 2  # 12 jobs per mode, batches of <= 4
    data = json.loads((tmp_path / "passkey.json").read_text())
    assert len(data["samples"]) == 24
    r = data["samples"][0]
    assert {"task", "mode", "length", "depth", "expected", "got", "score", "correct", "n_tokens"} <= r.keys()
    # held-out prompts (the default) leave 24 tokens for an answer in plain words
    assert all(r["correct"] and r["n_tokens"] == r["length"] - 24 for r in data["samples"])
    assert {r["family"] for r in data["samples"]} <= {"reports", "dictionary", "logs", "refrain"}
    assert all(r["families"] == "heldout" and r["phrasing"] in (0, 1, 2) for r in data["samples"])
    assert summary_rows(data["samples"]) == {"rope": {1024: 100.0, 2048: 100.0}, "dca": {1024: 100.0, 2048: 100.0}}
    md = markdown(data["samples"], "passkey", data["meta"])
    assert "| rope | 100.0 | 100.0 | 100.0 |" in md and "| 100% | 100.0 | 100.0 |" in md


def test_resume_after_interruption(ec, tmp_path):
    path = tmp_path / "passkey.json"
    with pytest.raises(KeyboardInterrupt):
        _run(ec, path, ["rope"], fail_on=2)  # the first batch is saved, the second is lost
    saved = json.loads(path.read_text())["samples"]
    assert len(saved) == 4
    store, llms = _run(ec, path, ["rope"])
    assert llms[0].calls == [4, 4]  # only the 8 missing samples are generated again
    assert len(store.records) == 12 and saved == store.records[:4]
    store, llms = _run(ec, path, ["rope"])
    assert llms == []  # nothing left: no LLM is even built


def test_resume_refuses_another_model(ec, tmp_path):
    path = tmp_path / "passkey.json"
    _run(ec, path, ["rope"])
    with pytest.raises(Qwen1mError, match="model='m'"):
        ResultStore(path, {"suite": "passkey", "model": "other", "seed": 0})


def test_ruler_jobs_cover_tasks_lengths_samples():
    jobs = ruler_jobs(["vt", "cwe"], [1024, 2048], 2)
    assert len(jobs) == 8 and len({j.seed(0) for j in jobs}) == 8
    assert all(j.depth is None for j in jobs)


def test_heatmaps_skip_without_matplotlib(ec, tmp_path, monkeypatch, caplog):
    from qwen1m.eval.report import passkey_heatmaps

    store, _ = _run(ec, tmp_path / "passkey.json", ["rope"])
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert passkey_heatmaps(store.records, tmp_path) == []
    assert "matplotlib is not installed" in caplog.text and not list(tmp_path.glob("*.png"))


def test_write_report_without_heatmaps_writes_only_the_tables(ec, tmp_path):
    from qwen1m.eval.report import write_report

    store, _ = _run(ec, tmp_path / "passkey.json", ["rope"])
    paths = write_report(store.records, "passkey", {"suite": "passkey", "model": "m", "seed": 0}, tmp_path,
                         heatmaps=False)
    assert paths == [tmp_path / "passkey.md"] and not list(tmp_path.glob("*.png"))
