"""``qwen1m eval passkey`` / ``qwen1m eval ruler`` end to end on the bundled model at short lengths."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

import qwen1m.eval.cli as eval_cli
from qwen1m.cli import main


@pytest.fixture
def built(monkeypatch):
    """The LLMs the command builds, by mode, wrapped around the real loader."""
    llms = []
    real = eval_cli.load_llm

    def load(config):
        llms.append(real(config))
        return llms[-1]

    monkeypatch.setattr(eval_cli, "load_llm", load)
    return llms


def test_passkey_end_to_end_then_resume(tmp_path, capsys, built):
    argv = ["eval", "passkey", "--lengths", "1024,2048", "--depths", "0,100", "--samples", "2",
            "--modes", "rope,dca", "--out", str(tmp_path), "--families", "train"]
    if importlib.util.find_spec("matplotlib") is None:
        argv.append("--no-heatmaps")  # else refused before the run (test_passkey_without_matplotlib_...)
    assert main(argv) == 0
    data = json.loads((tmp_path / "passkey.json").read_text())
    samples = data["samples"]
    assert len(samples) == 2 * 2 * 2 * 2  # modes x lengths x depths x samples
    assert {(r["mode"], r["length"], r["depth"]) for r in samples} == {
        (m, n, d) for m in ("rope", "dca") for n in (1024, 2048) for d in (0.0, 100.0)}
    assert all(r["n_tokens"] == r["length"] - 12 and r["expected"][0].isdigit() for r in samples)  # + answer
    # the bundled model is at 92-100% on passkey up to its 4K training length: 0 would mean broken wiring
    assert sum(r["correct"] for r in samples) >= 12
    md = (tmp_path / "passkey.md").read_text()
    assert "| mode | Avg | 1K | 2K |" in md and "## dca: passkey accuracy by depth x length" in md
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    if importlib.util.find_spec("matplotlib") is not None:
        assert pngs == ["passkey_heatmap_dca.png", "passkey_heatmap_rope.png"]
    else:
        assert pngs == []
    assert [type(llm.config.dca).__name__ for llm in built] == ["NoneType", "DCAConfig"]
    assert all(llm.sparse_config is None for llm in built)
    out = capsys.readouterr().out
    assert "rope" in out and "wrote" in out

    built.clear()
    assert main(argv) == 0  # everything is in the JSON: resumes to nothing, builds no model
    assert built == [] and json.loads((tmp_path / "passkey.json").read_text())["samples"] == samples
    assert main(argv[:5] + ["0"] + argv[6:]) == 0  # --depths 0: a subset, all in the JSON already
    md = (tmp_path / "passkey.md").read_text()
    assert built == [] and "| 0% |" in md and "| 100% |" not in md  # the report covers the asked grid only


def test_ruler_end_to_end_skips_qa_without_files(tmp_path, capsys, built):
    argv = ["eval", "ruler", "--tasks", "niah_single_1,vt,fwe,qa_2", "--lengths", "1024,2048", "--samples", "2",
            "--modes", "rope,dca", "--out", str(tmp_path), "--families", "train"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "skipping qa_2" in err and "--hotpotqa" in err
    samples = json.loads((tmp_path / "ruler.json").read_text())["samples"]
    assert len(samples) == 3 * 2 * 2 * 2
    assert {r["task"] for r in samples} == {"niah_single_1", "vt", "fwe"}
    single = [r for r in samples if r["task"] == "niah_single_1"]
    assert sum(r["score"] for r in single) / len(single) >= 50  # 100% in the model card at 1x
    md = (tmp_path / "ruler.md").read_text()
    assert "| niah_single_1 |" in md and "## Summary (all tasks)" in md and "## Summary (niah_* only)" in md


def test_dca_sparse_mode_uses_the_scaled_default(tmp_path, built):
    argv = ["eval", "passkey", "--lengths", "1024", "--depths", "50", "--samples", "2", "--modes", "dca+sparse",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    sparse = built[0].sparse_config
    assert sparse.threshold == 512 < 1024  # sparse prefill runs on every tested prompt
    assert set(sparse.budgets(0)[0]) == {64} and set(sparse.budgets(0)[1]) == {256}
    meta = json.loads((tmp_path / "passkey.json").read_text())["meta"]
    assert meta["sparse"] == {"vertical": [64], "slash": [256], "threshold": 512}


@pytest.mark.parametrize("argv, message", [
    (["eval", "passkey", "--lengths", "4k,256k"], "262144 tokens, beyond the model's max_model_len 131072"),
    (["eval", "ruler", "--lengths", "2k", "--max-model-len", "2000"], "beyond the model's max_model_len 2000"),
    (["eval", "passkey", "--modes", "rope,yarn"], "--modes 'rope,yarn'"),
    (["eval", "ruler", "--tasks", "niah_single_9"], "unknown task(s) ['niah_single_9']"),
    (["eval", "passkey", "--lengths", "1k", "--no-dca"], "--modes chooses"),
])
def test_errors_name_the_numbers(tmp_path, capsys, built, argv, message):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert built == []


def test_passkey_without_matplotlib_stops_before_the_run(tmp_path, capsys, built, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["eval", "passkey", "--lengths", "1k", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("error: eval passkey draws heatmaps with matplotlib, which is not installed: "
                                       "pip install 'qwen1m[eval]', or pass --no-heatmaps.\n")
    assert built == [] and not list(tmp_path.iterdir())  # no model built, nothing written
    # --no-heatmaps passes the check: the run goes on to its next check (here a length that is too long)
    assert main(["eval", "passkey", "--lengths", "256k", "--no-heatmaps", "--out", str(tmp_path)]) == 2
    assert "beyond the model's max_model_len" in capsys.readouterr().err


def test_progress_is_written_as_lines_off_a_terminal():
    import io
    from types import SimpleNamespace

    stream = io.StringIO()  # not a terminal, like a log file or CI
    show = eval_cli._progress_bar(stream)
    for done in range(1, 11):
        show(SimpleNamespace(mode="dca", done_samples=done, total_samples=10, tokens=done * 100, total_tokens=1000,
                             eta_s=1.0))
    lines = stream.getvalue().split("\n")
    assert "\r" not in stream.getvalue() and lines[-1] == ""
    assert lines[0].startswith("dca") and "1/10 samples" in lines[0]  # the first update at once
    assert "10/10 samples, 100% of prompt tokens, done" in lines[-2]  # and the last, whatever the rate
    assert len(lines) - 1 < 10  # the updates between are rate-limited
