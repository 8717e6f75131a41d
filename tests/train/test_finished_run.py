"""Rerunning ``qwen1m train`` on a finished run says so and trains nothing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qwen1m.cli import main

TOY = Path(__file__).resolve().parents[2] / "recipes" / "toy.json"


def micro_recipe(path: Path) -> Path:
    """The toy recipe cut to a few steps per stage: a complete two-stage run in seconds."""
    recipe = json.loads(TOY.read_text())
    recipe["corpus"] = {"num_grammar": 60, "stdlib": False}
    recipe["stages"][0].update(steps=2, seq_len=128)
    recipe["stages"][1].update(steps=3, seq_len=256)
    path.write_text(json.dumps(recipe))
    return path


def test_a_finished_run_is_complete_with_nothing_to_do(tmp_path, capsys, caplog):
    recipe, out = micro_recipe(tmp_path / "micro.json"), tmp_path / "run"
    argv = ["train", "--recipe", str(recipe), "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    log_before = (out / "train_log.json").read_text()
    weights = (out / "final" / "model.safetensors").read_bytes()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qwen1m.train"):
        assert main(argv) == 0
    assert f"the run in {out} is complete (stage 2 of 2, step 3); nothing to do" in caplog.messages
    assert not any("resuming" in m or "data ready" in m for m in caplog.messages)  # nothing rebuilt
    assert f"final checkpoint: {out / 'final'}" in capsys.readouterr().out
    assert (out / "train_log.json").read_text() == log_before
    assert (out / "final" / "model.safetensors").read_bytes() == weights
