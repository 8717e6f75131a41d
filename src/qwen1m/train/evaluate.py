"""Passkey and single-needle accuracy of a trained checkpoint at multiples of its training length.

Two paths:
- ``llm_accuracy``: the engine (``qwen1m.LLM``, DCA on or off), greedy ``generate`` scored with
  ``passkey_correct`` / ``string_match_all``: what a user sees.
- ``teacher_forced_accuracy``: the training forward (plain RoPE, batched) fed prompt + gold answer;
  a sample counts when every answer token is the argmax at its position, i.e. when greedy decoding
  would emit the answer. One forward per sample: cheap enough for the training job's own check.

Depths are spread evenly: sample i of n sits at depth i / (n - 1).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from qwen1m.train.data import needle_prompt, passkey_prompt
from qwen1m.train.encoding import Encoder
from qwen1m.train.scoring import passkey_correct, string_match_all

log = logging.getLogger(__name__)


def depths(n: int) -> list[float]:
    return [i / (n - 1) if n > 1 else 0.5 for i in range(n)]


def make_prompts(tokenizer: Any, task: str, length: int, n: int, seed: int = 0) -> list[tuple[list[int], list[str]]]:
    """n prompts of exactly ``length`` tokens: (ids, reference answers)."""
    out = []
    for i, d in enumerate(depths(n)):
        if task == "passkey":
            ids, key = passkey_prompt(tokenizer, length, d, seed * 100_000 + i)
            out.append((ids, [key]))
        else:
            ids, answers = needle_prompt(tokenizer, length, d, seed * 100_000 + i, haystack="repeat")
            out.append((ids, answers))
    return out


def score(task: str, outputs: list[str], refs: list[list[str]]) -> float:
    if task == "passkey":
        return 100.0 * sum(passkey_correct(o, r[0]) for o, r in zip(outputs, refs)) / max(1, len(outputs))
    return string_match_all(outputs, refs)


@torch.no_grad()
def teacher_forced_accuracy(model: torch.nn.Module, tokenizer: Any, task: str, length: int, n: int,
                            batch_size: int = 8, seed: int = 0) -> float:
    """Percent of prompts that greedy decoding answers right, with plain RoPE, in one forward each.

    The prompt is followed by the gold tokens " {answer}"; a sample counts when each of them is the
    argmax at its position (so greedy decoding emits them) and, for passkey, the next argmax is not a
    digit (so the number ends there): exactly ``passkey_correct`` on a greedy output that starts with
    the number. For niah it is a lower bound of ``string_match_all`` (the value must come first)."""
    enc = tokenizer if isinstance(tokenizer, Encoder) else Encoder(tokenizer)
    dev = next(model.parameters()).device
    digits = {enc(str(d))[0] for d in range(10)}
    prompts = make_prompts(enc, task, length, n, seed)
    hits = 0
    for b in range(0, n, batch_size):
        chunk = prompts[b: b + batch_size]
        answers = [enc(" " + r[0]) for _, r in chunk]
        width = max(len(a) for a in answers) + 1
        rows = [ids + a + [enc.eot] * (width - len(a)) for (ids, _), a in zip(chunk, answers)]
        x = torch.tensor(rows, device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            hidden = _hidden(model, x)
            logits = model.lm_head(hidden[:, length - 1: length - 1 + width])  # only the answer rows
        for p, a in zip(logits.argmax(-1).tolist(), answers):
            hits += p[: len(a)] == a and (task != "passkey" or p[len(a)] not in digits)
    return 100.0 * hits / n


def _hidden(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """forward_train without the LM head: [B, T] -> [B, T, hidden] (logits of every row would not fit)."""
    h = model.model.embed_tokens(x)
    for layer in model.model.layers:
        h = layer.forward_train(h, model.rotary)
    return model.model.norm(h)


def llm_accuracy(folder: str | Path, task: str, lengths: list[int], n: int, dca: bool,
                 device: str = "auto", time_budget_s: float = float("inf"), seed: int = 0) -> list[dict]:
    """Greedy generation through ``qwen1m.LLM`` at each length (DCA from the checkpoint, or off).
    Stops starting new lengths once ``time_budget_s`` is spent; returns one record per length."""
    from qwen1m import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(str(folder), device=device, dca="auto" if dca else None, max_model_len=max(lengths) + 16)
    enc = Encoder(Path(folder))
    params = SamplingParams(max_tokens=12, temperature=0.0)
    records = []
    for length in lengths:
        if time.perf_counter() - t0 > time_budget_s:
            records.append({"task": task, "length": length, "dca": dca, "skipped": "time budget"})
            continue
        t = time.perf_counter()
        prompts = make_prompts(enc, task, length, n, seed)
        outs = llm.generate([p for p, _ in prompts], params)
        texts = [o.outputs[0].text for o in outs]
        acc = score(task, texts, [r for _, r in prompts])
        records.append({"task": task, "length": length, "dca": dca, "n": n, "accuracy": acc,
                        "seconds": round(time.perf_counter() - t, 1), "example": texts[0][:40]})
        log.info("%s dca=%s length %d: %.1f%% (%d samples, %.1fs)", task, dca, length, acc, n,
                 time.perf_counter() - t)
    del llm  # its KV cache takes most of the GPU: free it before the next LLM is built
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return records

