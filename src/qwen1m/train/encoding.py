"""Token-level building blocks of the training data: samples, ChatML turns, haystacks.

Everything is assembled from token-id pieces rather than by tokenising one long string, so a
sample's length is exact by construction (the sum of its pieces) and a needle's position is known.
Pieces that start a new word carry their leading space or newline, which keeps the concatenation
close to what tokenising the decoded text would give.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from qwen1m.train.tokenizer_train import ENDOFTEXT, IM_END, IM_START

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    # Qwen2.5's chat template inserts this one when the caller gives no system message.
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
)


class HaystackTooShort(ValueError):
    """The requested length cannot hold a task's fixed text; callers fall back to plain text."""


@dataclass(slots=True)
class Sample:
    """ids[i] is a token; mask[i] = 1 when predicting ids[i] (from ids[:i]) is trained."""

    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)

    def add(self, ids: Sequence[int], loss: bool) -> Sample:
        self.ids.extend(ids)
        self.mask.extend([int(loss)] * len(ids))
        return self

    def __len__(self) -> int:
        return len(self.ids)


class Encoder:
    """Text -> ids with a cache for the short pieces that recur (templates, filler sentences).

    ``tokenizer`` is a ``tokenizers.Tokenizer``, a model folder or tokenizer.json path, or any object
    with ``encode(text) -> list[int]`` (qwen1m's own Tokenizer)."""

    def __init__(self, tokenizer: Any):
        if isinstance(tokenizer, (str, Path)):
            from tokenizers import Tokenizer

            path = Path(tokenizer)
            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
        self.tokenizer = tokenizer
        self._is_hf = type(tokenizer).__module__.startswith("tokenizers")
        self._cached = lru_cache(maxsize=65536)(self._encode)
        self.im_start, self.im_end, self.eot = (self.special(t) for t in (IM_START, IM_END, ENDOFTEXT))

    def _encode(self, text: str) -> tuple[int, ...]:
        if self._is_hf:
            return tuple(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return tuple(self.tokenizer.encode(text))

    def __call__(self, text: str) -> list[int]:
        return list(self._cached(text))

    def special(self, token: str) -> int:
        ids = self._encode(token)
        if len(ids) != 1:
            raise ValueError(f"the tokenizer has no special token {token} (it encodes to {len(ids)} ids).")
        return ids[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._is_hf:
            return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        return [list(self._encode(t)) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def chat_prefix(enc: Encoder, system: str) -> list[int]:
    """``<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n``"""
    return [enc.im_start, *enc("system\n" + system), enc.im_end, *enc("\n"), enc.im_start, *enc("user\n")]


def chat_assistant_start(enc: Encoder) -> list[int]:
    """``<|im_end|>\\n<|im_start|>assistant\\n``: closes the user turn, opens the answer."""
    return [enc.im_end, *enc("\n"), enc.im_start, *enc("assistant\n")]


def chat_sample(
    enc: Encoder, system: str, user: list[int], answer_prefix: list[int], answer: list[int]
) -> Sample:
    """A ChatML exchange; the loss covers the answer and the closing <|im_end|> only."""
    s = Sample().add(chat_prefix(enc, system), False).add(user, False)
    s.add(chat_assistant_start(enc), False).add(answer_prefix, False)
    return s.add(answer, True).add([enc.im_end], True)


def chat_overhead(enc: Encoder, system: str) -> int:
    """Tokens that ``chat_sample`` adds around user, answer prefix and answer."""
    return len(chat_prefix(enc, system)) + len(chat_assistant_start(enc)) + 1


def haystack(
    units: Callable[[], list[int]], n_tokens: int, inserts: Sequence[tuple[float, list[int]]]
) -> tuple[list[int], list[int]]:
    """Exactly ``n_tokens`` ids: filler units drawn from ``units()`` until the budget is met (the last
    one truncated), with each insert placed at the unit boundary nearest ``depth * filler length``.

    Returns (ids, start offset of each insert in ids, in the order given).
    """
    budget = n_tokens - sum(len(ids) for _, ids in inserts)
    if budget < 0:
        raise HaystackTooShort(f"haystack of {n_tokens} tokens cannot hold inserts of {n_tokens - budget} tokens.")
    filler: list[int] = []
    bounds = [0]
    while len(filler) < budget:
        filler.extend(units())
        bounds.append(min(len(filler), budget))
    del filler[budget:]
    order = sorted(range(len(inserts)), key=lambda i: inserts[i][0])
    cuts = [min(bounds, key=lambda b: abs(b - inserts[i][0] * budget)) for i in order]
    out: list[int] = []
    starts = [0] * len(inserts)
    prev = 0
    for i, cut in zip(order, cuts):
        out.extend(filler[prev:cut])
        starts[i] = len(out)
        out.extend(inserts[i][1])
        prev = cut
    out.extend(filler[prev:])
    return out, starts


def cycle_units(pieces: Sequence[list[int]], rng: random.Random, start: int | None = None) -> Callable[[], list[int]]:
    """A unit source walking ``pieces`` in order from a random (or given) start, wrapping around."""
    pos = [rng.randrange(len(pieces)) if start is None else start]

    def next_unit() -> list[int]:
        unit = pieces[pos[0] % len(pieces)]
        pos[0] += 1
        return unit

    return next_unit
