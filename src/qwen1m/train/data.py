"""Training batches: a seeded task mixture packed to the stage length, and the evaluation prompts.

A batch row is either one sample of the full stage length or, with probability ``short_fraction``,
several shorter samples packed back to back (Qwen2.5-1M's later stages: 75% full length, 25% shorter).
Each row's RNG is seeded from (seed, stage, step, row), so any step can be regenerated on its own:
resuming, sharding across data workers and re-running give the same tokens.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from qwen1m.train.corpus import grammar_paragraphs
from qwen1m.train.encoding import Encoder, HaystackTooShort, Sample
from qwen1m.train.scoring import passkey_correct, string_match_all, string_match_part
from qwen1m.train.tasks import MIN_TASK_LENGTH, TASKS, TaskContext, niah_sample, passkey_sample

__all__ = [
    "Encoder", "Sample", "TaskContext", "TASKS", "sample_task", "pack", "make_batch", "BatchStream",
    "passkey_prompt", "needle_prompt", "passkey_correct", "string_match_all", "string_match_part",
]


def sample_task(ctx: TaskContext, rng: random.Random, length: int, mix: Mapping[str, float]) -> Sample:
    """One sample of exactly ``length`` tokens from a task drawn by ``mix`` weights."""
    names = [n for n in mix if mix[n] > 0]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} in the data mix (known: {', '.join(TASKS)}).")
    name = rng.choices(names, weights=[mix[n] for n in names])[0]
    if length < MIN_TASK_LENGTH:
        name = "lm"
    try:
        s = TASKS[name](ctx, rng, length)
    except HaystackTooShort:  # e.g. vt's five assignments and templates in a 256-token piece
        s = TASKS["lm"](ctx, rng, length)
    assert len(s.ids) == length == len(s.mask), (name, len(s.ids), length)
    return s


def pack(ctx: TaskContext, rng: random.Random, length: int, mix: Mapping[str, float],
         short_fraction: float = 0.0) -> Sample:
    """A row of exactly ``length`` tokens: one sample, or (``short_fraction`` of rows) shorter samples
    with log-uniform lengths in [MIN_TASK_LENGTH, length / 2] packed to fill it."""
    if rng.random() >= short_fraction or length < 2 * MIN_TASK_LENGTH:
        return sample_task(ctx, rng, length, mix)
    row = Sample()
    while (left := length - len(row)) > 0:
        if left < 2 * MIN_TASK_LENGTH:
            n = left
        else:
            hi = min(length // 2, left - MIN_TASK_LENGTH)
            n = int(math.exp(rng.uniform(math.log(MIN_TASK_LENGTH), math.log(hi))))
        piece = sample_task(ctx, rng, n, mix)
        row.ids.extend(piece.ids)
        row.mask.extend(piece.mask)
    return row


def make_batch(ctx: TaskContext, seed: int, stage: int, step: int, batch_size: int, length: int,
               mix: Mapping[str, float], short_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids [batch, length] int64, loss mask [batch, length] bool)."""
    rows = [pack(ctx, random.Random(f"{seed}/{stage}/{step}/{b}"), length, mix, short_fraction)
            for b in range(batch_size)]
    ids = torch.tensor([r.ids for r in rows], dtype=torch.long)
    mask = torch.tensor([r.mask for r in rows], dtype=torch.bool)
    return ids, mask


class BatchStream(torch.utils.data.IterableDataset):
    """Batches for steps [start, stop) of one stage; DataLoader workers take every n-th step and the
    loader returns them in step order."""

    def __init__(self, ctx: TaskContext, seed: int, stage: int, start: int, stop: int, batch_size: int,
                 length: int, mix: Mapping[str, float], short_fraction: float):
        self.ctx, self.seed, self.stage = ctx, seed, stage
        self.start, self.stop, self.batch_size, self.length = start, stop, batch_size, length
        self.mix, self.short_fraction = dict(mix), short_fraction

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + wid, self.stop, nw):
            ids, mask = make_batch(self.ctx, self.seed, self.stage, step, self.batch_size, self.length,
                                   self.mix, self.short_fraction)
            yield step, ids, mask


def _prompt_ctx(tokenizer: Any, with_corpus: bool = False) -> TaskContext:
    enc = tokenizer if isinstance(tokenizer, Encoder) else Encoder(tokenizer)
    return TaskContext.build(enc, grammar_paragraphs(400, seed=2024) if with_corpus else [])


def passkey_prompt(tokenizer: Any, length_tokens: int, depth: float, seed: int) -> tuple[list[int], str]:
    """The design §6.1 passkey prompt as ChatML token ids of exactly ``length_tokens`` tokens, ending with
    the answer prefix "The pass key is"; the needle sits at ``depth`` (0 = start, 1 = end) of the
    filler. Returns (ids, the 5-digit pass key). Score with ``passkey_correct(output, key)``.

    ``tokenizer``: a ``tokenizers.Tokenizer``, a model folder, or an object with ``encode``."""
    rng = random.Random(f"passkey/{seed}")
    key = rng.randint(10_000, 99_999)
    s, answer = passkey_sample(_prompt_ctx(tokenizer), rng, length_tokens, depth, key, with_answer=False)
    return s.ids, answer


def needle_prompt(tokenizer: Any, length_tokens: int, depth: float, seed: int,
                  haystack: str = "repeat", value_type: str = "numbers") -> tuple[list[int], list[str]]:
    """RULER niah_single (``haystack`` "repeat" = niah_single_1, "essay" = niah_single_2 over our corpus),
    exactly ``length_tokens`` tokens ending with the answer prefix. Returns (ids, [value]); score with
    ``string_match_all``."""
    rng = random.Random(f"niah/{seed}")
    ctx = _prompt_ctx(tokenizer, with_corpus=haystack == "essay")
    s, answers = niah_sample(ctx, rng, length_tokens, depth, haystack, value_type, with_answer=False)
    return s.ids, answers
