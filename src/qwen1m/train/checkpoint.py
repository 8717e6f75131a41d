"""Hugging Face checkpoint folders and resumable training state.

A stage's folder holds config.json (that stage's rope_theta), model.safetensors (bf16, tied
``lm_head.weight`` left out as transformers does), tokenizer.json, tokenizer_config.json (ChatML
template) and generation_config.json; qwen1m and transformers both load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from qwen1m.train.tokenizer_train import ENDOFTEXT, IM_END, write_tokenizer_files

# The 1M models' ratios (Qwen2.5-7B-Instruct-1M: chunk 262144, local 8192, max positions 1010000).
DCA_LOCAL_DIVISOR = 32  # local_size = chunk_size / 32
DCA_MAX_POSITION_FACTOR = 32  # max_position_embeddings of a DCA checkpoint = 32 x training length


def model_config(model: dict[str, Any], vocab_size: int, seq_len: int, rope_theta: float,
                 bos_id: int, eos_id: int, dca: bool) -> dict[str, Any]:
    """config.json for a Qwen2 model of the recipe's ``model`` shape at one stage."""
    hidden, heads = model["hidden_size"], model["num_attention_heads"]
    cfg: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": model["intermediate_size"],
        "num_hidden_layers": model["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": model.get("num_key_value_heads", heads),
        "head_dim": model.get("head_dim", hidden // heads),
        "hidden_act": "silu",
        "rms_norm_eps": model.get("rms_norm_eps", 1e-6),
        "rope_theta": float(rope_theta),
        "max_position_embeddings": seq_len,
        "tie_word_embeddings": model.get("tie_word_embeddings", True),
        "attention_dropout": 0.0,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": model["num_hidden_layers"],
        "initializer_range": model.get("initializer_range", 0.02),
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "bfloat16",
    }
    if dca:
        cfg["max_position_embeddings"] = DCA_MAX_POSITION_FACTOR * seq_len
        cfg["dual_chunk_attention_config"] = {
            "chunk_size": seq_len,
            "local_size": seq_len // DCA_LOCAL_DIVISOR,
            "original_max_position_embeddings": seq_len,
        }
    return cfg


def save_hf_folder(model: torch.nn.Module, folder: str | Path, config: dict[str, Any],
                   tokenizer: Tokenizer, chat_template: str) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        tensors[name] = t.detach().to("cpu", torch.bfloat16).contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos = [tokenizer.token_to_id(IM_END), tokenizer.token_to_id(ENDOFTEXT)]
    gen = {"bos_token_id": tokenizer.token_to_id(ENDOFTEXT), "eos_token_id": eos,
           "pad_token_id": tokenizer.token_to_id(ENDOFTEXT), "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    write_tokenizer_files(tokenizer, folder, chat_template, config["max_position_embeddings"])
    return folder


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write the resumable state (model, optimizer, stage, step, log)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None
