"""Tensor parallelism on CPU (gloo): TP=2 equals TP=1 with DCA and sparse prefill; clear errors."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from checkpoints import save_tiny_checkpoint

from qwen1m import LLM, SamplingParams
from qwen1m.errors import ConfigError, Qwen1mError
from qwen1m.sparse_config import SparseConfig

DCA = {"chunk_size": 32, "local_size": 8, "original_max_position_embeddings": 32}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tp"), seed=71,
                                extra_config={"dual_chunk_attention_config": DCA})


def _sparse():  # real sparsity: small budgets, low threshold, per-head budgets that differ
    # every region sparse: the dense fallback decides per rank from the rank's own heads, so with it a
    # region may run dense on one rank and sparse on another (both valid, not bit-comparable to TP=1)
    cfg = SparseConfig.uniform(2, 4, 3, 4, threshold=16, last_q=8, block_size=8, sink_tokens=1, local_diagonals=2)
    return cfg.__class__(((3, 5, 2, 4), (4, 3, 6, 2)), ((4, 2, 6, 3), (3, 5, 2, 4)), cfg.scores, threshold=16,
                         last_q=8, block_size=8, sink_tokens=1, local_diagonals=2, dense_above_density=1.0)


def test_tp2_equals_tp1_with_dca_and_sparse(ckpt):
    ids = torch.randint(0, 97, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    opts = dict(dtype="float32", device="cpu", sparse_attention_config=_sparse(), max_num_batched_tokens=24)
    one = LLM(ckpt, **opts)
    ref_logits = one.logits(ids)
    ref_tokens = [o.outputs[0].token_ids for o in one.generate([ids, ids[:40]], params)]
    follow_up = ids[:90] + [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]  # the same length: the same YaRN m
    ref_follow_up = one.generate([follow_up], params)[0].outputs[0].token_ids
    # prefix caching on: the workers read the driver's block tables, shared blocks included
    two = LLM(ckpt, tensor_parallel_size=2, enable_prefix_caching=True, **opts)
    try:
        assert two.model.config.num_key_value_heads == 1 and two.model.config.num_attention_heads == 2
        logits = two.logits(ids)
        assert ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item() < 1e-5
        assert [o.outputs[0].token_ids for o in two.generate([ids, ids[:40]], params)] == ref_tokens
        again = two.generate([follow_up], params)[0]
        assert again.num_cached_tokens == 88 and again.outputs[0].token_ids == ref_follow_up
        assert two.sparse_config is not None and two.model.backend.sparse.budgets(0) == ([3, 5], [4, 2])
    finally:
        two.shutdown()


def test_worker_crash_is_a_clear_error_not_a_hang(ckpt):
    llm = LLM(ckpt, tensor_parallel_size=2, dtype="float32", device="cpu")
    try:
        worker = llm._tp.workers[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        start = time.monotonic()
        with pytest.raises(Qwen1mError, match="worker rank 1 has exited"):
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
        assert time.monotonic() - start < 60  # a hang guard (the error comes at once), not a speed check
    finally:
        llm.shutdown()


def test_tensor_parallel_size_must_divide_kv_heads(ckpt):
    with pytest.raises(ConfigError, match="tensor_parallel_size=3 does not divide the model's num_key_value_heads=2"):
        LLM(ckpt, tensor_parallel_size=3, dtype="float32", device="cpu")


def test_a_second_tp_engine_after_the_first_is_dropped(ckpt):
    import gc

    first = LLM(ckpt, tensor_parallel_size=2, dtype="float32", device="cpu")
    a = first.logits([5, 6, 7])
    del first
    gc.collect()  # the finalizer stops the workers and frees the process group
    second = LLM(ckpt, tensor_parallel_size=2, dtype="float32", device="cpu")
    try:
        assert torch.equal(second.logits([5, 6, 7]), a)
    finally:
        second.shutdown()


def test_under_torchrun(ckpt, tmp_path):
    import json

    from torchrun import DONE, run_torchrun

    script = tmp_path / "run.py"
    out = tmp_path / "out.json"
    script.write_text(
        "import json, sys\n"
        "from qwen1m import LLM, SamplingParams\n"
        f"llm = LLM({str(ckpt)!r}, tensor_parallel_size=2, dtype='float32', device='cpu')\n"
        "o = llm.generate([[3, 1, 4, 1, 5, 9, 2, 6]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))\n"
        f"json.dump(o[0].outputs[0].token_ids, open({str(out)!r}, 'w'))\n"
        "llm.shutdown()\n"
        f"print({DONE!r}, flush=True)\n"
    )
    run_torchrun(script, timeout=120)
    ref = LLM(ckpt, dtype="float32", device="cpu").generate(
        [[3, 1, 4, 1, 5, 9, 2, 6]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert json.loads(out.read_text()) == ref[0].outputs[0].token_ids
