"""What every eval task generator shares: the sample record and the context (tokenizer, essay corpus)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qwen1m.train.corpus import grammar_paragraphs
from qwen1m.train.encoding import Encoder
from qwen1m.train.tasks import TaskContext, _task  # _task: the training prompts' builder, reused as is

ESSAY_PARAGRAPHS = 4000  # ~280K tokens of distinct text for the bundled tokenizer; longer haystacks wrap
ESSAY_SEED = 2024  # the seed train.data's needle prompts use for their essay corpus


@dataclass(slots=True)
class EvalSample:
    ids: list[int]  # the prompt, ending with the answer prefix; exactly the requested length
    answers: list[str]  # references for the task's metric
    depth: float | None = None  # percent, where one depth places the sample's only needle


@dataclass(slots=True)
class EvalContext:
    """What generators share: the tokenizer, the essay corpus and any user QA data, built once."""

    enc: Encoder
    ctx: TaskContext
    qa: dict[str, Any] = field(default_factory=dict)  # "squad" / "hotpotqa" -> eval.qa.QAData

    @classmethod
    def build(cls, tokenizer: Any, qa: dict[str, Any] | None = None) -> EvalContext:
        enc = tokenizer if isinstance(tokenizer, Encoder) else Encoder(tokenizer)
        return cls(enc, TaskContext.build(enc, grammar_paragraphs(ESSAY_PARAGRAPHS, seed=ESSAY_SEED)), qa or {})

    def chat_prompt(self, rng: random.Random, length: int, head: str, units: Callable[[], list[int]],
                    inserts: list[tuple[float, list[int]]], question: str, prefix: str) -> list[int]:
        """head + haystack(units, inserts) + "\\n" + question as the user turn, then the answer prefix;
        exactly ``length`` tokens (the training path's builder, stopped before the answer)."""
        return _task(self.ctx, rng, length, head, units, inserts, question, prefix, "").ids
