"""Model level sparse prefill: full budgets == dense logits (DCA on and off); telemetry; config loading."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import save_tiny_checkpoint

from qwen1m import LLM, SamplingParams
from qwen1m.errors import ConfigError
from qwen1m.sparse_config import SparseConfig

DCA = {"chunk_size": 32, "local_size": 8, "original_max_position_embeddings": 32}


def _sparse(vertical, slash, **kw):
    """Every region sparse unless a test asks otherwise: these tests are about the sparse method."""
    kw.setdefault("dense_above_density", 1.0)
    return SparseConfig.uniform(2, 4, vertical, slash, threshold=16, last_q=8, block_size=8, **kw)


def _count_sparse_calls(monkeypatch) -> list[int]:
    import qwen1m.attention.sparse_prefill as sp

    calls, get = [], sp.get_sparse_fn

    def counting(device):
        fn = get(device)

        def wrapped(*a, **kw):
            calls.append(1)
            return fn(*a, **kw)
        return wrapped
    monkeypatch.setattr(sp, "get_sparse_fn", counting)
    return calls


@pytest.mark.parametrize("dca", [None, DCA])
def test_dense_regions_run_dense(tmp_path, dca, monkeypatch):
    """Budgets that list every key (density 1 > 0.6): every region takes the dense kernel, logits equal
    dense; tiny budgets (density well under 0.6): the sparse kernel runs and the result differs."""
    extra = {"dual_chunk_attention_config": dca} if dca else None
    folder = save_tiny_checkpoint(tmp_path / "m", seed=54, extra_config=extra)
    ids = torch.randint(0, 97, (120,), generator=torch.Generator().manual_seed(2)).tolist()
    dense = LLM(folder, dtype="float32", device="cpu", max_num_batched_tokens=40).logits(ids)
    calls = _count_sparse_calls(monkeypatch)
    full = LLM(folder, dtype="float32", device="cpu", max_num_batched_tokens=40, sparse_telemetry=True,
               sparse_attention_config=_sparse(4096, 4096, dense_above_density=0.6))
    assert torch.allclose(full.logits(ids), dense, atol=1e-5) and not calls
    assert all(abs(r["density"] - 1.0) < 1e-9 for r in full.sparse_report().values())
    small = LLM(folder, dtype="float32", device="cpu", max_num_batched_tokens=40, sparse_dense_above=0.6,
                sparse_attention_config=_sparse(2, 2, sink_tokens=1, local_diagonals=2))
    assert small.sparse_config.dense_above_density == 0.6
    assert not torch.allclose(small.logits(ids), dense, atol=1e-4) and calls


@pytest.mark.parametrize("dca", [None, DCA])
def test_full_budgets_equal_dense_logits(tmp_path, dca):
    extra = {"dual_chunk_attention_config": dca} if dca else None
    folder = save_tiny_checkpoint(tmp_path / "m", seed=51, extra_config=extra)
    ids = torch.randint(0, 97, (90,), generator=torch.Generator().manual_seed(0)).tolist()
    dense = LLM(folder, dtype="float32", device="cpu", max_num_batched_tokens=13).logits(ids)
    sparse_llm = LLM(folder, dtype="float32", device="cpu", max_num_batched_tokens=13,
                     sparse_attention_config=_sparse(4096, 4096), sparse_telemetry=True)
    sparse = sparse_llm.logits(ids)
    assert ((sparse - dense).abs().max() / dense.abs().max()).item() < 1e-5
    report = sparse_llm.sparse_report()
    assert set(report) == {0, 1}
    assert all(abs(r["density"] - 1.0) < 1e-9 and min(r["recall"]) > 1 - 1e-5 for r in report.values())


def test_small_budgets_change_the_result_and_report_density(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "m", seed=52, extra_config={"dual_chunk_attention_config": DCA})
    ids = torch.randint(0, 97, (160,), generator=torch.Generator().manual_seed(1)).tolist()
    dense = LLM(folder, dtype="float32", device="cpu").logits(ids)
    llm = LLM(folder, dtype="float32", device="cpu", sparse_telemetry=True,
              sparse_attention_config=_sparse(2, 2, sink_tokens=1, local_diagonals=2))
    sparse = llm.logits(ids)
    assert not torch.allclose(sparse, dense, atol=1e-4)
    report = llm.sparse_report()
    for r in report.values():
        assert r["density"] < 0.8 and all(0 < x <= 1 + 1e-6 for x in r["recall"])
    llm.model.backend.telemetry.reset()  # a report per request: nothing recorded after a reset
    assert llm.sparse_report() == {}
    llm.logits(ids)
    again = llm.sparse_report()
    assert {k: v["density"] for k, v in again.items()} == {k: v["density"] for k, v in report.items()}
    # short prompts (<= threshold) and decode stay dense
    short = ids[:16]
    assert torch.allclose(llm.logits(short), LLM(folder, dtype="float32", device="cpu").logits(short), atol=1e-6)
    out = llm.generate([ids], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_sparse_config_file_in_the_model_folder_is_used(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "m", seed=53)
    (folder / "sparse_attention_config.json").write_text(json.dumps(_sparse(10, 20).to_json()))
    llm = LLM(folder, dtype="float32", device="cpu")
    assert llm.sparse_config is not None and llm.sparse_config.budgets(1) == ([10] * 4, [20] * 4)
    assert LLM(folder, dtype="float32", device="cpu", sparse_attention_config=None).sparse_config is None
    (folder / "sparse_attention_config.json").write_text(json.dumps(_sparse(10, 20).to_json()[:1]))
    with pytest.raises(ConfigError, match="has 1 layer entries but the model has 2 layers"):
        LLM(folder, dtype="float32", device="cpu")
