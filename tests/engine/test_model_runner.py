"""ModelRunner on a tiny random model, without LLM: the inputs it builds for a step (ids, positions,
slices, sampling rows, block tables, cache slots, DCA key ranges, YaRN factors), written out by hand
here, and the steps it hands to CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from qwen1m.attention.metadata import AttentionMetadata
from qwen1m.cache.paged_kv import PagedKVCache
from qwen1m.config import DCAConfig, ModelConfig
from qwen1m.engine.kv_allocator import KVAllocator
from qwen1m.engine.model_runner import ModelRunner
from qwen1m.engine.scheduler import ScheduledSequence
from qwen1m.engine.sequence import Sequence
from qwen1m.model.qwen2 import Qwen2ForCausalLM
from qwen1m.sampling_params import SamplingParams

BLOCK = 4
DCA = DCAConfig(chunk_size=16, local_size=4, original_max_position_embeddings=8)  # chunk_len s = 12


def make_runner(dca: DCAConfig | None = None, seed: int = 0) -> ModelRunner:
    torch.manual_seed(seed)
    cfg = ModelConfig("Qwen2ForCausalLM", 97, 64, 112, 2, 4, 2, 16, 4096, dca=dca)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    kv_cache = PagedKVCache(2, 64, BLOCK, 2, 16, torch.float32, torch.device("cpu"))
    kv = KVAllocator(kv_cache, torch.device("cpu"), model.backend.key_scale, False, None)
    return ModelRunner(model, kv, lambda t: None, max_num_seqs=8, max_model_len=256)


def make_seq(runner: ModelRunner, tokens: list[int], num_prompt: int, computed: int, name: str,
             **params) -> Sequence:
    """A running sequence with ``computed`` tokens counted as in its cache (their keys are not written:
    these tests look at inputs; the equivalence test below computes them)."""
    seq = Sequence(name, 0, None, list(tokens), num_prompt, SamplingParams(temperature=0, **params), 1000)
    assert runner.kv.allocate(seq)
    seq.num_computed_tokens = computed
    return seq


def test_a_mixed_step_lays_out_decodes_and_prefill_chunks():
    """One decode (prompt 5 + 2 generated, 6 computed), the last chunk of a prompt (6 of 10 computed)
    and the first chunk of a new prompt (5 of 9): tokens flat, sequence after sequence."""
    runner = make_runner()
    dec = make_seq(runner, list(range(10, 17)), 5, 6, "dec")
    tail = make_seq(runner, list(range(20, 30)), 10, 6, "tail")
    head = make_seq(runner, list(range(40, 49)), 9, 0, "head", prompt_logprobs=1)
    head.prompt_logprobs = [None]
    scheduled = [ScheduledSequence(dec, 1), ScheduledSequence(tail, 4), ScheduledSequence(head, 5)]
    inputs = runner.prepare(scheduled)
    assert inputs.ids == [16, 26, 27, 28, 29, 40, 41, 42, 43, 44]
    assert inputs.positions == [6, 6, 7, 8, 9, 0, 1, 2, 3, 4]
    got = [(s.query_start, s.num_query, s.num_cached, s.scale_len, s.prompt_len, s.cache) for s in inputs.slices]
    assert got == [(0, 1, 6, 7, 5, dec.cache), (1, 4, 6, 10, 10, tail.cache), (5, 5, 0, 9, 9, head.cache)]
    # the decode's and the finished prompt's last rows sample; the new prompt's chunk does not
    assert inputs.sample_rows == [0, 4] and inputs.samplers == [dec, tail]
    assert inputs.prefilled == [tail, head] and head.prefill_start_time is not None
    assert [(item.seq, offset) for item, offset in inputs.scoring] == [(head, 5)]  # it asked for prompt logprobs
    assert not inputs.all_decode


@pytest.mark.parametrize("kernel", [False, True])
def test_block_tables_and_slots_of_the_decode_batch(kernel):
    """The rows the backend decodes in one batch get their inputs before the forward: block tables
    (zero-padded to the widest), the slot of each new token, one key range [0, L) without DCA."""
    runner = make_runner()
    runner.model.backend.kernels.decode_kernel = kernel
    prefill = make_seq(runner, list(range(3)), 3, 0, "p")
    short = make_seq(runner, list(range(6)), 5, 5, "short")  # 2 blocks; new token at position 5
    long = make_seq(runner, list(range(14)), 10, 13, "long")  # 4 blocks; new token at position 13
    inputs = runner.prepare([ScheduledSequence(prefill, 3), ScheduledSequence(short, 1), ScheduledSequence(long, 1)])
    meta = runner.metadata(torch.tensor(inputs.positions), inputs.slices)
    if not kernel:  # the CPU's reference path attends sequence by sequence: nothing to build
        assert meta.decode is None
        return
    d = meta.decode
    assert d.rows.tolist() == [3, 4]
    b0, b1 = short.cache.blocks, long.cache.blocks
    assert len(b0) == 2 and len(b1) == 4
    assert d.tables.dtype == torch.int32 and d.tables.tolist() == [b0 + [0, 0], b1]
    assert d.slots.tolist() == [b0[1] * BLOCK + 1, b1[3] * BLOCK + 1]
    assert d.bounds.tolist() == [[[0, 0]], [[6, 14]]]  # [start/end, one range, sequence]
    assert d.scale.shape == (2, 1, 1) and d.scale.flatten().tolist() == [1.0, 1.0]


def test_dca_key_ranges_and_yarn_factors():
    """DCA (s = 12), a sequence of length L (new token included), n = (L - 1) // s: intra [n s, L),
    succ [(n - 1) s, n s) from n = 1, inter [0, (n - 1) s) from n = 2; ranges empty for the whole
    batch are left out."""
    runner = make_runner(DCA)
    lengths = [5, 13, 25, 30]
    seqs = [make_seq(runner, list(range(n)), n - 1, n - 1, f"s{n}") for n in lengths]
    slices = runner.prepare([ScheduledSequence(s, 1) for s in seqs]).slices
    d = runner.decode_inputs(slices)
    starts, ends = d.bounds.tolist()
    assert starts == [[0, 12, 24, 24], [0, 0, 12, 12], [0, 0, 0, 0]]  # intra, succ, inter
    assert ends == [[5, 13, 25, 30], [0, 12, 24, 24], [0, 0, 12, 12]]
    want = torch.tensor([DCA.yarn_scale(n) for n in lengths], dtype=torch.float32)
    assert want[-1] > 1 and torch.equal(d.scale.flatten(), want)
    assert runner.decode_inputs(slices[:2]).bounds.shape == (2, 2, 2)  # no inter range yet: two ranges
    assert runner.decode_inputs(slices[:1]).bounds.shape == (2, 1, 1)  # inside the first chunk: intra only


def _prefill(runner: ModelRunner, seq: Sequence) -> None:
    runner.run([ScheduledSequence(seq, seq.num_tokens)])
    seq.token_ids.append(int(seq.token_ids[-1] * 7 % 97))  # a next token, so that the sequence decodes
    assert runner.kv.grow(seq, seq.num_tokens)


@pytest.mark.parametrize("dca", [None, DCA])
def test_one_mixed_step_equals_each_sequence_alone(dca):
    """A decode (through the batched decode kernel, interpreted here, on the inputs the runner built)
    and a prefill chunk in one step give each sequence the logits it gets alone."""
    def step(names: list[str]) -> dict[str, torch.Tensor]:
        runner = make_runner(dca, seed=3)
        runner.model.backend.kernels.decode_kernel = True
        seqs = {"dec": make_seq(runner, list(range(1, 19)), 18, 0, "dec"),
                "new": make_seq(runner, list(range(50, 61)), 11, 0, "new")}
        _prefill(runner, seqs["dec"])
        logits = []
        compute = runner.model.compute_logits
        runner.model.compute_logits = lambda h: logits.append(compute(h)) or logits[-1]
        launched = runner.run([ScheduledSequence(seqs[n], 1 if n == "dec" else 11) for n in names])
        assert [s.request_id for s in launched.samplers] == names
        assert all(seqs[n].num_computed_tokens == seqs[n].num_tokens for n in names)
        (rows,) = logits  # the sampling rows' logits, in row order
        assert launched.tokens.tolist() == rows.argmax(-1).tolist()
        return dict(zip(names, rows))

    together = step(["dec", "new"])
    alone = {**step(["dec"]), **step(["new"])}
    for name in ("dec", "new"):
        torch.testing.assert_close(together[name], alone[name], atol=1e-5, rtol=1e-5)


class _RecordingGraphs:
    """Stands in for DecodeGraphRunner on the CPU: records what it is handed and computes the logits
    eagerly from exactly those inputs (the static buffers a replay would read)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def fits(self, seqs) -> bool:
        return len(seqs) <= 2

    def run(self, ids, seqs, fresh, device_ids=None):
        self.calls.append((list(ids), fresh))
        meta = AttentionMetadata(torch.tensor([s.num_cached for s in seqs]), seqs, decode=fresh)
        return self.model.compute_logits(self.model(torch.tensor(ids), meta))


def test_all_decode_steps_that_fit_go_to_the_graphs_with_the_runner_inputs():
    """An all-decode step that fits a bucket is replayed, handed the decode inputs the runner built
    (DCA, s = 12: lengths 15 and 7), with eager's tokens; prefills and a step too large run eagerly."""
    def setup(graphs: bool):
        runner = make_runner(DCA, seed=5)
        runner.model.backend.kernels.decode_kernel = True
        if graphs:
            runner.graph_runner = _RecordingGraphs(runner.model)
        seqs = [make_seq(runner, list(range(k, k + n)), n, 0, f"s{k}") for k, n in ((1, 14), (30, 6), (60, 9))]
        for seq in seqs:
            _prefill(runner, seq)
        return runner, seqs

    runner, seqs = setup(graphs=True)
    eager, eager_seqs = setup(graphs=False)
    assert runner.graph_runner.calls == []  # prefills never replay
    got = runner.run([ScheduledSequence(s, 1) for s in seqs[:2]])
    want = eager.run([ScheduledSequence(s, 1) for s in eager_seqs[:2]])
    assert got.tokens.tolist() == want.tokens.tolist()
    (ids, fresh), = runner.graph_runner.calls
    assert ids == [seqs[0].token_ids[-1], seqs[1].token_ids[-1]]
    b0, b1 = seqs[0].cache.blocks, seqs[1].cache.blocks
    assert fresh.rows.tolist() == [0, 1] and fresh.tables.tolist() == [b0, b1 + [0, 0]]
    assert fresh.slots.tolist() == [b0[3] * BLOCK + 2, b1[1] * BLOCK + 2]  # positions 14 and 6
    assert fresh.bounds.tolist() == [[[12, 0], [0, 0]], [[15, 7], [12, 0]]]  # intra, succ (no inter)
    for runner_seqs in (seqs, eager_seqs):
        for seq in runner_seqs[:2]:
            seq.token_ids.append(1)
            assert seq.cache.blocks and len(seq.cache.blocks) * BLOCK >= seq.num_tokens
    got = runner.run([ScheduledSequence(s, 1) for s in seqs])  # three rows: no bucket fits
    want = eager.run([ScheduledSequence(s, 1) for s in eager_seqs])
    assert len(runner.graph_runner.calls) == 1 and got.tokens.tolist() == want.tokens.tolist()
