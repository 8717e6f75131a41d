"""Each bad-checkpoint case gives one clear sentence naming the file/tensor and what was expected."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import save_tiny_checkpoint
from safetensors.torch import load_file, save_file

from qwen1m import LLM
from qwen1m.errors import CheckpointError, ConfigError


def _edit_config(folder, **changes):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def test_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        LLM(tmp_path / "nope", device="cpu")


def test_missing_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        LLM(tmp_path / "m", device="cpu")


def test_invalid_json(tiny_checkpoint):
    (tiny_checkpoint / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON"):
        LLM(tiny_checkpoint, device="cpu")


def test_unknown_architecture(tiny_checkpoint):
    _edit_config(tiny_checkpoint, architectures=["LlamaForCausalLM"])
    with pytest.raises(ConfigError, match="architecture 'LlamaForCausalLM' is not supported"):
        LLM(tiny_checkpoint, device="cpu")


def test_missing_field(tiny_checkpoint):
    _edit_config(tiny_checkpoint, hidden_size=None)
    with pytest.raises(ConfigError, match="missing the field 'hidden_size'"):
        LLM(tiny_checkpoint, device="cpu")


def test_bad_heads(tiny_checkpoint):
    _edit_config(tiny_checkpoint, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        LLM(tiny_checkpoint, device="cpu")


def test_bad_dca_config(tiny_checkpoint):
    _edit_config(tiny_checkpoint, dual_chunk_attention_config={"chunk_size": 64, "local_size": 64})
    with pytest.raises(ConfigError, match="local_size must be in"):
        LLM(tiny_checkpoint, device="cpu")


def test_missing_tensor(tiny_checkpoint):
    path = tiny_checkpoint / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing the tensor 'model.layers.1.mlp.up_proj.weight'"):
        LLM(tiny_checkpoint, device="cpu")


def test_unexpected_tensor(tiny_checkpoint):
    path = tiny_checkpoint / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.safetensors has the unexpected tensor 'model.layers.0.extra"):
        LLM(tiny_checkpoint, device="cpu")


def test_misshaped_tensor(tiny_checkpoint):
    path = tiny_checkpoint / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        LLM(tiny_checkpoint, device="cpu")
    msg = str(err.value)
    assert "'model.layers.0.self_attn.k_proj.weight'" in msg and "model.safetensors" in msg
    assert "[16, 64]" in msg and "[32, 64]" in msg


def test_pickle_weights_refused(tiny_checkpoint):
    (tiny_checkpoint / "model.safetensors").unlink()
    (tiny_checkpoint / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="convert them to model.safetensors"):
        LLM(tiny_checkpoint, device="cpu")


def test_missing_shard(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists the shard '{shard.name}', which is missing"):
        LLM(folder, device="cpu")


def test_dummy_load_needs_only_config(tmp_path, tiny_checkpoint):
    folder = tmp_path / "cfg_only"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    llm = LLM(folder, load_format="dummy", device="cpu")
    logits = llm.logits([1, 2, 3])
    assert logits.shape == (3, 97) and torch.isfinite(logits).all()


def test_unsupported_dtype(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="dtype 'int8' is not supported"):
        LLM(tiny_checkpoint, device="cpu", dtype="int8")
