"""Tiny random Hugging Face checkpoints written with transformers' save_pretrained (test helpers)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_qwen_config(arch: str = "qwen2", **overrides):
    from transformers import Qwen2Config, Qwen3Config

    kwargs = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    if arch == "qwen3":
        kwargs["head_dim"] = 32  # Qwen3 decouples head_dim from hidden_size / heads
    kwargs.update(overrides)
    return (Qwen3Config if arch == "qwen3" else Qwen2Config)(**kwargs)


def save_tiny_checkpoint(folder: Path, arch: str = "qwen2", seed: int = 0, extra_config: dict | None = None,
                         max_shard_size: str | None = None, **overrides) -> Path:
    """A real checkpoint folder (config.json + safetensors) of a random tiny model; returns the folder."""
    import json

    from transformers import Qwen2ForCausalLM, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_qwen_config(arch, **overrides)
    model = (Qwen3ForCausalLM if arch == "qwen3" else Qwen2ForCausalLM)(cfg).float().eval()
    with torch.no_grad():  # random biases and norms so that every weight matters in the parity test
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    if extra_config:
        path = folder / "config.json"
        data = json.loads(path.read_text())
        data.update(extra_config)
        path.write_text(json.dumps(data, indent=2))
    return folder
