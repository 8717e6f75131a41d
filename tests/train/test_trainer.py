"""A toy recipe trains end to end on CPU, lowers the loss, resumes, and writes checkpoints that
qwen1m and transformers load with equal logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qwen1m.errors import ConfigError
from qwen1m.train.recipe import load_recipe, parse_recipe
from qwen1m.train.trainer import lr_at, run_recipe

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "recipes" / "toy.json"


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy")
    run_recipe(TOY, out, device="cpu", resume=False)
    return out


def test_toy_recipe_lowers_loss_and_logs(toy_run):
    log = json.loads((toy_run / "train_log.json").read_text())
    assert [s["name"] for s in log["stages"]] == ["stage1", "stage2"]
    first = log["log"][0]["loss"]
    last_stage1 = [e["loss"] for e in log["log"] if e["stage"] == "stage1"][-1]
    assert last_stage1 < first - 0.5
    for name, theta in (("stage1", 10000.0), ("stage2", 100000.0)):
        cfg = json.loads((toy_run / name / "config.json").read_text())
        assert cfg["rope_theta"] == theta
        for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert (toy_run / name / f).is_file()
    final = json.loads((toy_run / "final" / "config.json").read_text())
    assert final["dual_chunk_attention_config"] == {
        "chunk_size": 512, "local_size": 16, "original_max_position_embeddings": 512}
    assert "<|im_start|>" in json.loads((toy_run / "final" / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.parametrize("stage", ["stage1", "final"])
def test_checkpoint_loads_in_qwen1m_and_transformers_with_equal_logits(toy_run, stage):
    transformers = pytest.importorskip("transformers")
    from qwen1m import LLM

    folder = toy_run / stage
    ids = [0, 5, 17, 42, 100, 7, 300, 2, 11, 250]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = LLM(str(folder), dtype="float32", device="cpu", dca=None).logits(ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_resume_continues_a_finished_stage(toy_run, tmp_path):
    # A run stopped after stage 1: state.pt says stage 0 is done, so only stage 2 trains again.
    out = tmp_path / "resumed"
    shutil.copytree(toy_run, out)
    state = torch.load(out / "state.pt", weights_only=False)
    assert state["stage"] == 1 and state["stage_done"]
    final = run_recipe(TOY, out, device="cpu", resume=True)
    assert (final / "model.safetensors").is_file()
    log = json.loads((out / "train_log.json").read_text())
    assert [s["name"] for s in log["stages"]] == ["stage1", "stage2"]  # nothing trained twice


def test_recipe_errors_name_the_field(tmp_path):
    d = json.loads(TOY.read_text())
    d["stages"][0]["mix"] = {"nonsense": 1}
    with pytest.raises(ConfigError, match="mix"):
        parse_recipe(d)
    d = json.loads(TOY.read_text())
    d["stages"][0]["seq_lenn"] = 3
    with pytest.raises(ConfigError, match="seq_lenn"):
        parse_recipe(d)
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.json")


def test_cosine_schedule():
    st = load_recipe(TOY).stages[0]
    lrs = [lr_at(st, s, 12) for s in range(12)]
    assert lrs[0] < lrs[1] == pytest.approx(st.lr)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] >= st.lr * st.min_lr_ratio


def test_init_from_continues_a_checkpoint(toy_run, tmp_path):
    # One stage from the toy's final checkpoint at lr 0: the weights come out unchanged (so they were
    # loaded, not re-initialised), and the checkpoint's tokenizer is reused.
    from safetensors.torch import load_file

    d = json.loads(TOY.read_text())
    d["stages"] = [{**d["stages"][-1], "name": "cont", "lr": 0.0, "steps": 2, "time_s": None}]
    d["stages"][0].pop("time_s")
    d["init_from"] = str(toy_run / "final")
    final = run_recipe(parse_recipe(d), tmp_path / "cont", device="cpu", resume=False)
    before, after = load_file(str(toy_run / "final" / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=0, rtol=0)
    assert (final / "tokenizer.json").read_text() == (toy_run / "final" / "tokenizer.json").read_text()
    d["init_from"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="init_from"):
        parse_recipe(d)
    d["init_from"] = str(toy_run / "final")
    d["model"] = {**d["model"], "hidden_size": d["model"]["hidden_size"] * 2}
    with pytest.raises(ConfigError, match="does not match"):
        run_recipe(parse_recipe(d), tmp_path / "bad", device="cpu", resume=False)
