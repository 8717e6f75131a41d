"""What every eval task generator shares: the sample record and the context (tokenizer, essay corpus)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qwen1m.train.corpus import grammar_paragraphs
from qwen1m.train.encoding import Encoder
from qwen1m.train.tasks import TaskContext, chat_task  # the training prompts' builder, reused as is

ESSAY_PARAGRAPHS = 4000  # ~280K tokens of distinct text for the bundled tokenizer; longer haystacks wrap
ESSAY_SEED = 2024  # the seed train.data's needle prompts use for their essay corpus


@dataclass(slots=True)
class EvalSample:
    ids: list[int]  # the prompt, ending with the answer prefix; exactly the requested length
    answers: list[str]  # references for the task's metric
    depth: float | None = None  # percent, where one depth places the sample's only needle
    family: str | None = None  # the haystack family (held-out tasks)
    phrasing: int | None = None  # index of the held-out phrasing


@dataclass(slots=True)
class EvalContext:
    """What generators share: the tokenizer, the essay corpus and any user QA data, built once."""

    enc: Encoder
    ctx: TaskContext
    qa: dict[str, Any] = field(default_factory=dict)  # "squad" / "hotpotqa" -> eval.qa.QAData
    families: str = "heldout"  # "heldout" (eval.heldout) or "train" (the training templates)
    pools: dict[str, list[list[int]]] = field(default_factory=dict)  # held-out family -> encoded units

    def heldout_units(self, family: str, rng: random.Random) -> Callable[[], list[int]]:
        """Units of a held-out family: drawn at random from its pool, or in order for the refrain."""
        from qwen1m.eval.heldout import POOL_UNITS, unit_texts
        from qwen1m.train.encoding import cycle_units

        pool = self.pools.get(family)
        if pool is None:
            pool = self.pools[family] = self.enc.encode_batch(unit_texts(family, POOL_UNITS))
        if family == "refrain":
            return cycle_units(pool, rng, start=0)
        return lambda: pool[rng.randrange(len(pool))]

    @classmethod
    def build(cls, tokenizer: Any, qa: dict[str, Any] | None = None, families: str = "heldout") -> EvalContext:
        if families not in ("heldout", "train"):
            raise ValueError(f"families must be 'heldout' or 'train', got {families!r}.")
        enc = tokenizer if isinstance(tokenizer, Encoder) else Encoder(tokenizer)
        return cls(enc, TaskContext.build(enc, grammar_paragraphs(ESSAY_PARAGRAPHS, seed=ESSAY_SEED)), qa or {},
                   families)

    def chat_prompt(self, rng: random.Random, length: int, head: str, units: Callable[[], list[int]],
                    inserts: list[tuple[float, list[int]]], question: str, prefix: str) -> list[int]:
        """head + haystack(units, inserts) + "\\n" + question as the user turn, then the answer prefix;
        exactly ``length`` tokens (the training path's builder, stopped before the answer)."""
        return chat_task(self.ctx, rng, length, head, units, inserts, question, prefix, "").ids

    def plain_chat_prompt(self, rng: random.Random, length: int, units: Callable[[], list[int]],
                          inserts: list[tuple[float, list[int]]], question: str, question_first: bool) -> list[int]:
        """The tokens of ``llm.chat([{"role": "user", "content": document + "\\n" + question}])`` (or the
        question, a blank line, then the document) with no system message, so Qwen2.5's template adds
        its default one; no task line, no answer prefix. Exactly ``length`` tokens."""
        from qwen1m.eval.heldout import DEFAULT_SYSTEM

        head, tail = (question + "\n\n", "") if question_first else ("", question)
        return chat_task(self.ctx, rng, length, head, units, inserts, tail, "", "", system=DEFAULT_SYSTEM).ids
