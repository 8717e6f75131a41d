"""Engine equivalences: chunked == one-shot prefill, batched == alone; sampling and stop rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoints import save_tiny_checkpoint
from tokenizer_utils import make_tokenizer_folder

from qwen1m import LLM, SamplingParams
from qwen1m.errors import RequestError

DCA = {"chunk_size": 16, "local_size": 4, "original_max_position_embeddings": 16}
CHATML = (Path(__file__).parents[1] / "fixtures" / "chatml_template.jinja").read_text()


@pytest.fixture(scope="module")
def dca_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("dca"), seed=11,
                                extra_config={"dual_chunk_attention_config": DCA})


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    """A tiny random model with a real tokenizer (vocab sized to the tokenizer)."""
    folder = tmp_path_factory.mktemp("text")
    make_tokenizer_folder(folder, CHATML)
    from qwen1m.tokenizer import Tokenizer

    vocab = Tokenizer.from_folder(folder).vocab_size
    save_tiny_checkpoint(folder, seed=12, vocab_size=vocab)
    return folder


@pytest.mark.parametrize("budget", [1, 7, 64, 1000])
def test_chunked_prefill_equals_one_shot(dca_checkpoint, budget):
    ids = torch.randint(0, 97, (45,), generator=torch.Generator().manual_seed(3)).tolist()
    ref_llm = LLM(dca_checkpoint, dtype="float32", device="cpu", max_num_batched_tokens=4096)
    llm = LLM(dca_checkpoint, dtype="float32", device="cpu", max_num_batched_tokens=budget)
    ref, ours = ref_llm.logits(ids), llm.logits(ids)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-5
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    assert (llm.generate([ids], params)[0].outputs[0].token_ids
            == ref_llm.generate([ids], params)[0].outputs[0].token_ids)


def test_batched_generation_equals_alone(dca_checkpoint):
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (3, 9, 17, 25, 31, 40, 2, 12)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    llm = LLM(dca_checkpoint, dtype="float32", device="cpu", max_num_batched_tokens=24)
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert together == alone


def test_seeded_sampling_is_reproducible_and_filters_apply(dca_checkpoint):
    llm = LLM(dca_checkpoint, dtype="float32", device="cpu")
    prompt = [4, 8, 15, 16, 23, 42]
    sp = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, seed=7, ignore_eos=True)
    a = llm.generate([prompt], sp)[0].outputs[0].token_ids
    b = llm.generate([prompt], sp)[0].outputs[0].token_ids
    assert a == b
    greedy = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    top1 = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=2.0, top_k=1, seed=3, ignore_eos=True))
    assert top1[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids
    minp = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=2.0, min_p=1.0, seed=9, ignore_eos=True))
    assert minp[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids
    n3 = llm.generate([prompt], SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=1, ignore_eos=True))[0]
    assert [o.index for o in n3.outputs] == [0, 1, 2] and all(len(o.token_ids) == 6 for o in n3.outputs)


def test_stop_token_and_stop_string(text_checkpoint):
    llm = LLM(text_checkpoint, dtype="float32", device="cpu")
    prompt = "The quick brown fox"
    full = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    assert full.text == llm.tokenizer.decode(full.token_ids)
    stop_id = full.token_ids[5]
    first = full.token_ids.index(stop_id)
    out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == full.token_ids[:first + 1] and out.stop_reason == stop_id
    windows = [full.text[i:i + 2] for i in range(len(full.text) // 3, len(full.text) - 1)]
    stop_text = next(w for w in windows if "\ufffd" not in w and w.strip())
    out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                stop=[stop_text]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_text
    assert out.text == full.text[:full.text.find(stop_text)]
    assert len(out.token_ids) < len(full.token_ids)
    # streamed deltas never show a stop string's beginning that is later cut away
    stream = llm.generate(["The quick brown fox"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                                stop=[stop_text]), stream=True)
    assert "".join(o.new_text[0] for o in stream) == out.text


def test_streaming_deltas_concatenate_to_the_text(text_checkpoint):
    llm = LLM(text_checkpoint, dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=15, temperature=0, ignore_eos=True)
    pieces, last = [], None
    for out in llm.generate_stream("Long context models", params):
        pieces.append(out.new_text[0])
        last = out
    assert last.finished and "".join(pieces) == last.outputs[0].text
    assert last.outputs[0].text == llm.generate(["Long context models"], params)[0].outputs[0].text


def test_chat_applies_template(text_checkpoint):
    llm = LLM(text_checkpoint, dtype="float32", device="cpu")
    msgs = [{"role": "user", "content": "hello"}]
    out = llm.chat(msgs, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    expected = llm.tokenizer.encode("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    assert out.prompt_token_ids == expected


def test_bad_requests_are_refused_and_engine_keeps_serving(dca_checkpoint):
    llm = LLM(dca_checkpoint, dtype="float32", device="cpu", max_model_len=64)
    with pytest.raises(RequestError, match="the prompt has 64 tokens but max_model_len is 64"):
        llm.generate([list(range(64))], SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="token id 500 is outside the vocabulary"):
        llm.generate([[1, 500]], SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)
    with pytest.raises(RequestError, match="prompts must be lists of token ids"):
        llm.generate(["text"], SamplingParams(max_tokens=2))
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=61, temperature=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 61  # capped by max_model_len - prompt


def test_outputs_carry_the_prompt_ids_and_the_engine_forgets_finished_requests(dca_checkpoint):
    """RequestOutput.prompt_token_ids is the prompt at every step (not the growing token list), and a
    finished or aborted request leaves nothing behind in the engine."""
    llm = LLM(dca_checkpoint, dtype="float32", device="cpu")
    engine = llm.engine
    prompt = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(8)).tolist()
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    rid = engine.add_request(prompt, params)
    dropped = engine.add_request(prompt[:10], params)
    engine.abort_request(dropped)
    seen = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid and out.prompt_token_ids == prompt
            seen.append(list(out.outputs[0].token_ids))
    assert [len(t) for t in seen] == [1, 2, 3, 4, 5] and all(a == b[:len(a)] for a, b in zip(seen, seen[1:]))
    assert not engine.requests and not engine.output._prompt_ids


def test_logits_processors_rewrite_the_row_before_sampling(tiny_checkpoint):
    """A processor that allows one token forces it, greedy or sampled (JSON mode's seam)."""
    from qwen1m import LLM, SamplingParams

    llm = LLM(str(tiny_checkpoint), dtype="float32")
    seen = []

    def only_seven(output_ids, logits):
        seen.append(list(output_ids))
        masked = torch.full_like(logits, float("-inf"))
        masked[7] = 0.0
        return masked

    for temperature in (0.0, 1.0):
        params = SamplingParams(max_tokens=3, temperature=temperature, ignore_eos=True,
                                logits_processors=[only_seven])
        out = llm.generate([[1, 2, 3]], params)[0].outputs[0]
        assert out.token_ids == [7, 7, 7]
    assert seen[:3] == [[], [7], [7, 7]]
