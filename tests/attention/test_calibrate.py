"""Sparsity refinement: recall equals the dense softmax mass of the chosen keys; refine raises only
the heads below target; the CLI writes a loadable config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoints import save_tiny_checkpoint
from tokenizer_utils import make_tokenizer_folder

from qwen1m.attention.calibrate import RecallProbe, refine
from qwen1m.attention.reference import attend
from qwen1m.attention.sparse_prefill import sparse_attend_gather, sparse_prefill_attention
from qwen1m.attention.vertical_slash import vertical_slash_mask
from qwen1m.cli import main
from qwen1m.sparse_config import SparseConfig, load_sparse_config


def test_recall_is_the_dense_softmax_mass_of_the_selected_keys():
    g = torch.Generator().manual_seed(0)
    total, heads, kv_heads, d = 64, 4, 2, 16
    q = torch.randn(total, heads, d, generator=g, dtype=torch.float64)
    k = torch.randn(total, kv_heads, d, generator=g, dtype=torch.float64)
    v = torch.randn(total, kv_heads, d, generator=g, dtype=torch.float64)
    cfg = SparseConfig.uniform(1, heads, 3, 3, last_q=8, block_size=8, sink_tokens=1, local_diagonals=2)
    used = []

    def spy(qq, kk, vv, index, *, softmax_scale, causal):
        used.append((index, qq.shape[0], kk.shape[0], causal))
        return sparse_attend_gather(qq, kk, vv, index, softmax_scale=softmax_scale, causal=causal)

    _, sparse_lse = sparse_prefill_attention({"intra": q}, k, v, begin=0, chunk_len=None, softmax_scale=0.3,
                                             vertical_sizes=[3] * heads, slash_sizes=[3] * heads, cfg=cfg,
                                             sparse_fn=spy)
    _, full_lse = attend(q, k, v, softmax_scale=0.3, causal=True)
    recall = torch.exp(sparse_lse.double() - full_lse)
    (index, num_q, num_kv, causal), = used
    mask = vertical_slash_mask(index, num_q, num_kv, causal)  # [heads, q, kv]
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(2, dim=1)) * 0.3
    scores = scores.masked_fill(torch.ones(total, total, dtype=torch.bool).triu(1), float("-inf"))
    mass = (torch.softmax(scores, -1) * mask).sum(-1)
    assert torch.allclose(recall, mass, atol=1e-5)
    assert (recall < 0.999).any()  # the budgets really drop keys


def test_refine_raises_only_heads_below_target():
    base = SparseConfig.uniform(2, 3, 10, 20)
    probe = RecallProbe(base, step=5, max_steps=3)
    # layer 0: head 0 fine at base; head 1 reaches 0.9 at k=2; head 2 never does
    probe.sums[0] = torch.tensor([[0.95, 0.5, 0.1], [0.97, 0.8, 0.2], [0.99, 0.92, 0.3], [1.0, 0.99, 0.4]])
    probe.counts[0] = 1
    probe.sums[1] = torch.full((4, 3), 0.95)
    probe.counts[1] = 1
    cfg, summary = refine(probe, 0.9)
    assert cfg.vertical_sizes[0] == (10, 20, 25) and cfg.slash_sizes[0] == (20, 30, 35)
    assert cfg.vertical_sizes[1] == (10, 10, 10)
    assert cfg.scores[0] == pytest.approx((0.95, 0.92, 0.4))
    assert (summary[0].raised, summary[0].below_target, summary[1].raised) == (2, 1, 0)


def test_calibrate_cli_writes_a_loadable_config(tmp_path):
    folder = tmp_path / "m"
    make_tokenizer_folder(folder, (Path(__file__).parents[1] / "fixtures" / "chatml_template.jinja").read_text())
    from qwen1m.tokenizer import Tokenizer

    save_tiny_checkpoint(folder, seed=61, vocab_size=Tokenizer.from_folder(folder).vocab_size)
    text = tmp_path / "doc.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "sparse.json"
    rc = main(["calibrate", "--model", str(folder), "--data", str(text), "--length", "120", "--samples", "2",
               "--base-vertical", "2", "--base-slash", "2", "--step", "16", "--max-steps", "4",
               "--target-recall", "0.9", "--out", str(out), "--device", "cpu", "--max-num-batched-tokens", "40"])
    assert rc == 0
    cfg = load_sparse_config(out, 2, 4)
    data = json.loads(out.read_text())
    assert all(v[0] == "vertical_and_slash" and 0 < v[3] <= 1.0 + 1e-6 for layer in data for v in layer.values())
    assert any(v > 2 for row in cfg.vertical_sizes for v in row)  # tiny base budgets had to grow
