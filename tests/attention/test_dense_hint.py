"""dense_hint: a layer whose regions all went dense skips the sparse path in the next steps of that
prompt, until its keys grow past the factor; the output is dense attention either way."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from checkpoints import save_tiny_checkpoint

from qwen1m import LLM
from qwen1m.attention.dense_hint import DenseHints
from qwen1m.attention.metadata import SequenceSlice
from qwen1m.sparse_config import SparseConfig

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class _Blocks:  # what DenseHints reads of a SequenceBlocks
    def __init__(self, first_block):
        self.first_block = first_block


def _seq(num_cached, num_query, first_block=7):
    return SequenceSlice(query_start=0, num_query=num_query, num_cached=num_cached, scale_len=0,
                         cache=_Blocks(first_block), prompt_len=10_000)


MEASURED = (1000, 1000)  # the step that made the decision: keys [1000, 2000)

# (flags of the measured step, the asking step (num_cached, num_query, first block), growth, expected)
RULES = [
    ([1, 1, 1], (2000, 1000, 7), 4.0, True),  # the next step of the same sequence
    ([1, 1, 1], (5000, 3000, 7), 4.0, True),  # up to 4x the measured keys (2000 -> 8000)
    ([1, 1, 1], (7000, 1001, 7), 4.0, False),  # past 4x: measure again
    ([1, 0, 1], (2000, 1000, 7), 4.0, False),  # a region ran sparse
    ([1, 1, 1], (2000, 1000, 8), 4.0, False),  # another sequence
    ([1, 1, 1], (1500, 100, 7), 4.0, False),  # an earlier position (a new request on the same blocks)
    ([1, 1, 1], (2000, 1000, 7), 0.0, False),  # hints off
    ([], (2000, 1000, 7), 4.0, False),  # no problem at all
]


@pytest.mark.parametrize("flags,asking,growth,expected", RULES)
def test_rules(flags, asking, growth, expected):
    hints = DenseHints(growth)
    hints.record(3, _seq(*MEASURED), torch.tensor(flags, dtype=torch.int32))
    assert hints.all_dense(3, _seq(*asking)) is expected
    assert hints.all_dense(4, _seq(*asking)) is False  # other layers know nothing


def test_a_new_record_replaces_the_last_and_reuses_its_buffer():
    hints = DenseHints(4.0)
    hints.record(0, _seq(*MEASURED), torch.ones(3, dtype=torch.int32))
    buf = hints._buffers[0]
    hints.record(0, _seq(2000, 1000), torch.tensor([1, 0], dtype=torch.int32))
    assert hints._buffers[0] is buf and not hints.all_dense(0, _seq(3000, 1000))


DCA = {"chunk_size": 32, "local_size": 8, "original_max_position_embeddings": 32}


def _cases():
    cpu = pytest.mark.skipif(not INTERPRET, reason="the batched path's Triton kernels: TRITON_INTERPRET=1")
    return [pytest.param("cpu", 4.0, marks=cpu), pytest.param("cpu", 0.0, marks=cpu),
            pytest.param("cuda", 4.0, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device,growth", _cases())
def test_a_dense_layer_skips_the_sparse_path_until_its_keys_grow(tmp_path, monkeypatch, device, growth):
    """Budgets that list every key: the batched path decides every region dense. With hints, each
    layer measures at the first sparse step and again only once its keys passed 4x; without (0) it
    measures every step. The logits are dense DCA's either way. On CUDA the batched path is the
    default; on the CPU it is forced (its Triton kernels under the interpreter)."""
    import qwen1m.attention.sparse_batched as sb
    import qwen1m.attention.sparse_prefill as sp

    if device == "cpu":
        monkeypatch.setattr(sp, "_use_batched", lambda *a: True)
    calls, batched = [], sb.sparse_prefill_batched

    def counting(queries, k, v, *, begin, **kw):
        calls.append(begin + queries["intra"].shape[0])  # keys of the measured step
        return batched(queries, k, v, begin=begin, **kw)
    monkeypatch.setattr(sb, "sparse_prefill_batched", counting)
    folder = save_tiny_checkpoint(tmp_path / "m", seed=55, extra_config={"dual_chunk_attention_config": DCA})
    ids = torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    opts = dict(dtype="float32", device=device, max_num_batched_tokens=20, enforce_eager=True)
    dense = LLM(folder, **opts).logits(ids)
    cfg = SparseConfig.uniform(2, 4, 4096, 4096, threshold=16, last_q=8, block_size=16, dense_above_density=0.6)
    llm = LLM(folder, sparse_attention_config=dataclasses.replace(cfg, dense_hint_growth=growth), **opts)
    assert torch.allclose(llm.logits(ids), dense, atol=1e-5)
    steps = list(range(20, 201, 20))  # keys at the end of each prefill step
    if growth:  # 2 layers measure at 20 keys, then past 80 (100), then past 400 (never)
        assert calls == [20, 20, 100, 100]
    else:
        assert calls == [n for n in steps for _ in range(2)]
