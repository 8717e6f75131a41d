"""Each bad-checkpoint case gives one clear sentence naming the file/tensor and what was expected."""

from __future__ import annotations

import json
import re

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


# ---- broken weight files: one sentence from the library, exit status 2 and no traceback from the CLI ----

def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _retype(path, name, dtype):
    tensors = load_file(path)
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, path, metadata={"format": "pt"})


def _poison(path, name, value):
    tensors = load_file(path)
    tensors[name].view(-1)[5] = value
    save_file(tensors, path, metadata={"format": "pt"})


_BROKEN = {
    "truncated": (_truncate, r"model\.safetensors is not a valid safetensors file \(incomplete metadata, file not "
                             r"fully covered; the file has [\d,]+ bytes\): it is truncated, empty or not safetensors, "
                             r"so download or export it again\."),
    "empty": (lambda p: p.write_bytes(b""), r"model\.safetensors is not a valid safetensors file \(header too small; "
                                            r"the file has 0 bytes\)"),
    "garbage": (lambda p: p.write_bytes(b"<html>404 Not Found</html>" * 40),
                r"model\.safetensors is not a valid safetensors file \(header too large; the file has 1,040 bytes\)"),
    "int8": (lambda p: _retype(p, "model.layers.0.mlp.up_proj.weight", torch.int8),
             r"Tensor 'model\.layers\.0\.mlp\.up_proj\.weight' in .*model\.safetensors has dtype I8; qwen1m loads "
             r"floating-point weights only \(F64, F32, F16, BF16\) and no quantised format\."),
    "fp8": (lambda p: _retype(p, "model.norm.weight", torch.float8_e4m3fn),
            r"Tensor 'model\.norm\.weight' in .* has dtype F8_E4M3; qwen1m loads floating-point weights only"),
    "nan": (lambda p: _poison(p, "model.layers.1.self_attn.v_proj.weight", float("nan")),
            r"Tensor 'model\.layers\.1\.self_attn\.v_proj\.weight' in .*model\.safetensors holds 1 NaN or infinite "
            r"value\(s\) out of 2,048: the checkpoint is corrupt\."),
    "inf": (lambda p: _poison(p, "lm_head.weight", float("-inf")),
            r"Tensor 'lm_head\.weight' in .* holds 1 NaN or infinite value\(s\) out of 6,208"),
}


@pytest.mark.parametrize("case", list(_BROKEN))
def test_broken_weight_file_is_one_sentence(tiny_checkpoint, case):
    breaks, message = _BROKEN[case]
    breaks(tiny_checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        LLM(tiny_checkpoint, device="cpu", dtype="float32")


def test_broken_shard_of_an_index(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    _truncate(shard)
    with pytest.raises(CheckpointError, match=f"{shard.name} is not a valid safetensors file"):
        LLM(folder, device="cpu")


def test_index_that_maps_a_tensor_to_the_wrong_shard(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "sharded", max_shard_size="20KB")
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first, last = sorted(set(data["weight_map"].values()))[0], sorted(set(data["weight_map"].values()))[-1]
    name = next(n for n, f in data["weight_map"].items() if f == first)
    data["weight_map"][name] = last
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"index\.json maps the tensor '{re.escape(name)}' to {last}, which does "
                                              r"not hold it\."):
        LLM(folder, device="cpu")


def test_value_beyond_float16_names_the_dtype(tiny_checkpoint):
    _poison(tiny_checkpoint / "model.safetensors", "model.norm.weight", 1e6)
    with pytest.raises(CheckpointError, match=r"Tensor 'model\.norm\.weight' in .* has values up to 1e\+06, beyond "
                                              r"the range of float16; load the model with dtype='bfloat16'"):
        LLM(tiny_checkpoint, device="cpu", dtype="float16")
    assert LLM(tiny_checkpoint, device="cpu", dtype="float32").logits([1, 2]).isfinite().all()


@pytest.mark.parametrize("case", ["truncated", "nan", "int8"])
def test_cli_exits_2_with_one_line(tiny_checkpoint, case, capsys):
    from qwen1m.cli import main

    _BROKEN[case][0](tiny_checkpoint / "model.safetensors")
    rc = main(["generate", "--model", str(tiny_checkpoint), "--prompt", "hi", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(("field", "value", "message"), [
    ("rms_norm_eps", -1, "field 'rms_norm_eps' must be a positive number, got -1.0."),
    ("rms_norm_eps", 0, "field 'rms_norm_eps' must be a positive number, got 0.0."),
    ("rms_norm_eps", "1e-6", "field 'rms_norm_eps' must be a number, got '1e-6'."),
    ("rope_theta", 0, "field 'rope_theta' must be a positive number, got 0.0."),
    ("tie_word_embeddings", "false", "field 'tie_word_embeddings' must be true or false, got 'false'."),
    ("head_dim", 12.5, "field 'head_dim' must be an integer, got 12.5."),
    ("num_attention_heads", 0, "field 'num_attention_heads' must be positive, got 0."),
    ("rope_scaling", {"rope_type": "yarn", "factor": "x"}, "rope_scaling field 'factor' must be a number, got 'x'."),
])
def test_config_values_out_of_range_name_the_field(tiny_checkpoint, field, value, message):
    _edit_config(tiny_checkpoint, **{field: value})
    with pytest.raises(ConfigError, match=re.escape(message)):
        LLM(tiny_checkpoint, device="cpu")
