"""Static RoPE scaling (YaRN, linear) as transformers applies it."""

from __future__ import annotations

import pytest
import torch
from checkpoints import save_tiny_checkpoint

from qwen1m import LLM


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "linear", "factor": 2.0},
])
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    from transformers import Qwen2ForCausalLM

    folder = save_tiny_checkpoint(tmp_path / "ckpt", rope_scaling=scaling, seed=2)
    ids = torch.randint(0, 97, (80,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = LLM(folder, dtype="float32", device="cpu").logits(ids)
    with torch.no_grad():
        ref = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(torch.tensor([ids])).logits[0]
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-4
    plain = save_tiny_checkpoint(tmp_path / "plain", seed=2)
    assert not torch.allclose(LLM(plain, dtype="float32", device="cpu").logits(ids), ours, atol=1e-3)
