"""Model level: a tiny checkpoint with a small dual_chunk_attention_config gives the oracle's logits.

The oracle is transformers' own Qwen2 forward with its attention function swapped (through its public
AttentionInterface) for a float64 dense DCA oracle: transformers rotates q_i at i and k_j at j, so the
DCA score for the pair is <R(r(i,j) - (i - j)) q_rot_i, k_rot_j> with r(i,j) from design §2.2's table,
and the YaRN temperature multiplies every logit by m(L)^2. Nothing of qwen1m's DCA code is used.
"""

from __future__ import annotations

import math

import pytest
import torch
from checkpoints import save_tiny_checkpoint

from qwen1m import LLM, DCAConfig, SamplingParams

C, W = 16, 4  # tiny chunk_size / local_size: s = 12, so 50 tokens cross 4 DCA chunks


def _relative_distance(i: int, j: int, c: int, w: int) -> int:
    s = c - w
    ni, nj, ip, jp = i // s, j // s, i % s, j % s
    if ni == nj:
        return ip - jp
    if nj == ni - 1:
        return min(ip + s, c) - jp
    return c - jp


def _rotate(x: torch.Tensor, angle_pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [..., D] rotated by RoPE at (possibly negative) positions angle_pos [...] (float64)."""
    freqs = angle_pos[..., None].double() * inv_freq.double()
    emb = torch.cat((freqs, freqs), dim=-1)
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * emb.cos() + rot * emb.sin()


def _make_oracle(c: int, w: int, yarn_orig: int):
    def dca_oracle_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        # query [B, H, T, D] rotated at true positions; key/value [B, KVH, T, D]
        _, num_heads, t, d = query.shape
        group = num_heads // key.shape[1]
        inv_freq = 1.0 / (module.config.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2).double() / d))
        m = max(1.0, 0.1 * math.log(t / yarn_orig) + 1.0) if yarn_orig else 1.0
        i = torch.arange(t)[:, None].expand(t, t)
        j = torch.arange(t)[None, :].expand(t, t)
        delta = torch.tensor([[_relative_distance(a, b, c, w) - (a - b) if b <= a else 0 for b in range(t)]
                              for a in range(t)])
        q = query[0].double()  # [H, T, D]
        k = key[0].double().repeat_interleave(group, dim=0)
        v = value[0].double().repeat_interleave(group, dim=0)
        q_pairs = _rotate(q[:, :, None, :].expand(num_heads, t, t, d), delta[None].expand(num_heads, t, t), inv_freq)
        scores = (q_pairs * k[:, None, :, :]).sum(-1) * scaling * m * m
        scores = scores.masked_fill((j > i)[None], float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v  # [H, T, D]
        return out.transpose(0, 1)[None].to(query.dtype), None

    return dca_oracle_attention


def _oracle_logits(folder, ids, c, w, yarn_orig):
    from transformers import AttentionInterface, Qwen2ForCausalLM

    name = f"qwen1m_dca_oracle_{c}_{w}_{yarn_orig}"
    AttentionInterface.register(name, _make_oracle(c, w, yarn_orig))
    model = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation=name).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("yarn_orig", [0, 16])
def test_dca_model_logits_match_oracle(tmp_path, yarn_orig):
    dca = {"chunk_size": C, "local_size": W, "original_max_position_embeddings": yarn_orig}
    folder = save_tiny_checkpoint(tmp_path / "dca", seed=4, extra_config={"dual_chunk_attention_config": dca})
    ids = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(2)).tolist()
    llm = LLM(folder, dtype="float32", device="cpu", max_num_batched_tokens=7)  # chunks straddle DCA chunks
    assert llm.config.dca == DCAConfig(C, W, yarn_orig)
    ours = llm.logits(ids)
    ref = _oracle_logits(folder, ids, C, W, yarn_orig)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-4
    # and the oracle really differs from plain RoPE past c tokens (so this test can fail)
    plain = LLM(folder, dtype="float32", device="cpu", dca=None).logits(ids)
    assert ((plain[C:] - ref[C:]).abs().max() / ref.abs().max()).item() > 1e-3


def test_dca_option_on_plain_checkpoint_equals_config_key(tmp_path):
    plain = save_tiny_checkpoint(tmp_path / "plain", seed=6)
    keyed = save_tiny_checkpoint(tmp_path / "keyed", seed=6, extra_config={
        "dual_chunk_attention_config": {"chunk_size": C, "local_size": W, "original_max_position_embeddings": C}})
    ids = list(range(3, 43))
    a = LLM(plain, dtype="float32", device="cpu", dca=DCAConfig(C, W, C)).logits(ids)
    b = LLM(keyed, dtype="float32", device="cpu").logits(ids)
    assert torch.equal(a, b)


def test_dca_generation_decode_equals_recompute(tmp_path):
    """Decode through the DCA cache path equals re-scoring the whole sequence (no YaRN so m is constant)."""
    folder = save_tiny_checkpoint(tmp_path / "dca", seed=8, extra_config={
        "dual_chunk_attention_config": {"chunk_size": C, "local_size": W}})
    llm = LLM(folder, dtype="float32", device="cpu", max_num_batched_tokens=5)
    prompt = list(range(10, 30))
    out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    tokens = prompt + out.outputs[0].token_ids
    assert llm.logits(tokens)[len(prompt) - 1:-1].argmax(-1).tolist() == out.outputs[0].token_ids


def test_request_beyond_max_position_embeddings_is_refused(tmp_path):
    from qwen1m.errors import ConfigError, RequestError

    folder = save_tiny_checkpoint(tmp_path / "dca", max_position_embeddings=64, extra_config={
        "dual_chunk_attention_config": {"chunk_size": C, "local_size": W}})
    llm = LLM(folder, dtype="float32", device="cpu")
    with pytest.raises(RequestError, match="the prompt has 70 tokens but max_model_len is 64"):
        llm.generate([list(range(70))], SamplingParams(max_tokens=1))
    with pytest.raises(ConfigError, match="exceeds max_position_embeddings=64"):
        LLM(folder, dtype="float32", device="cpu", max_model_len=100)
