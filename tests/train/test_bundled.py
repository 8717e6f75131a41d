"""The shipped model: its size and config, and passkey answers at its training length."""

from __future__ import annotations

import json

import pytest
import torch

from qwen1m.config import load_model_config
from qwen1m.llm import bundled_model_path
from qwen1m.model.loader import load_model
from qwen1m.train.data import passkey_prompt
from qwen1m.train.encoding import Encoder
from qwen1m.train.evaluate import teacher_forced_accuracy
from qwen1m.train.scoring import passkey_correct

MAX_BYTES = 16_000_000  # the bundled model's budget: at most 16 MB on disk


@pytest.fixture(scope="module")
def folder():
    return bundled_model_path()


def test_bundled_files_size_and_config(folder):
    assert (folder / "model.safetensors").stat().st_size <= MAX_BYTES
    cfg = load_model_config(folder)
    raw = json.loads((folder / "config.json").read_text())
    assert raw["architectures"] == ["Qwen2ForCausalLM"] and cfg.attention_bias
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.dca is not None and cfg.dca.local_size * 32 == cfg.dca.chunk_size
    assert cfg.dca.original_max_position_embeddings == cfg.dca.chunk_size
    log = json.loads((folder / "train_log.json").read_text())
    lengths = [s["seq_len"] for s in log["stages"]]
    thetas = [s["rope_theta"] for s in log["stages"]]
    assert len(lengths) >= 3 and lengths == sorted(lengths) and thetas == sorted(thetas)
    assert lengths[-1] == cfg.dca.chunk_size


def test_bundled_passkey_at_training_length_teacher_forced(folder):
    """Three depths (start, middle, end) at the training length, plain RoPE: all right."""
    cfg = load_model_config(folder)
    model = load_model(folder, cfg, torch.float32, torch.device("cpu")).eval()
    acc = teacher_forced_accuracy(model, Encoder(folder), "passkey", cfg.dca.chunk_size, n=3, batch_size=3)
    assert acc == 100.0


def test_bundled_passkey_generate_through_the_engine(folder):
    """``LLM()`` with no model loads the bundled one and answers a passkey prompt (DCA from config)."""
    from qwen1m import LLM, SamplingParams

    llm = LLM(device="cpu")
    ids, key = passkey_prompt(Encoder(folder), 2048, 0.3, seed=5)
    out = llm.generate([ids], SamplingParams(max_tokens=8, temperature=0.0))[0].outputs[0].text
    assert passkey_correct(out, key), (out, key)


@pytest.mark.parametrize("family, phrasing", [("reports", 0), ("refrain", 1), ("dictionary", 2)])
def test_bundled_finds_a_key_in_heldout_text_asked_in_plain_words(family, phrasing):
    """Text and wording it never trained on, asked through the chat template with no answer prefix
    (``eval.heldout``): the case the stage-4 model failed (0 of 110 at 4K on the H200)."""
    from qwen1m import LLM, SamplingParams
    from qwen1m.eval.heldout import passkey_document

    llm = LLM(device="cpu")
    message, key = passkey_document(llm.tokenizer.encode, family, 2000, 0.3, seed=phrasing, phrasing=phrasing)
    out = llm.chat([{"role": "user", "content": message}], SamplingParams(max_tokens=16, temperature=0.0))
    assert passkey_correct(out[0].outputs[0].text, key), (out[0].outputs[0].text, key)
