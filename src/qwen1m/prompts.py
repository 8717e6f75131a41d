"""The prompts and sampling parameters of one ``LLM.generate`` call, checked whole before any is queued.

A call is all or nothing: every prompt is type-checked, encoded and checked against the engine
(length, vocabulary) first, so a bad prompt at index 3 leaves nothing of prompts 0..2 behind in the
engine. Each refusal is a ``RequestError`` naming the prompt's index and what was wrong with it.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral

from qwen1m.errors import RequestError
from qwen1m.sampling_params import SamplingParams

_EXPECTED = "a string, a list of strings, a list of token ids or a list of token-id lists"


def _is_token(t: object) -> bool:
    return isinstance(t, Integral) and not isinstance(t, bool)  # bool is an int, but never a token id


def as_prompt_list(prompts: object) -> list[str | list[int]]:
    """One prompt or a list of them, as a list; each item a str or a list of ints (numpy ints become int).
    An empty list stays empty (``generate([])`` returns [], as in vLLM)."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, list):
        raise RequestError(f"prompts must be {_EXPECTED}, got a {type(prompts).__name__}.")
    if prompts and isinstance(prompts[0], Integral):  # one prompt of token ids (a bool first item lands here too)
        prompts = [prompts]
    checked: list[str | list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            checked.append(p)
            continue
        if not isinstance(p, list):
            raise RequestError(f"prompt {i} is a {type(p).__name__}; expected a string or a list of integer "
                               "token ids.")
        bad = next((j for j, t in enumerate(p) if not _is_token(t)), None)
        if bad is not None:
            t = p[bad]
            raise RequestError(f"prompt {i}: item {bad} is {t!r} (a {type(t).__name__}), not an integer token id.")
        checked.append([int(t) for t in p])
    return checked


def as_params_list(params: object, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if not isinstance(params, (list, tuple)):
        raise RequestError(f"sampling_params must be a SamplingParams or a list of them, got a "
                           f"{type(params).__name__}.")
    if len(params) != n:
        raise RequestError(f"got {len(params)} SamplingParams for {n} prompts.")
    bad = next((i for i, p in enumerate(params) if not isinstance(p, SamplingParams)), None)
    if bad is not None:
        raise RequestError(f"sampling_params[{bad}] is a {type(params[bad]).__name__}, not a SamplingParams.")
    return list(params)


def encode_prompts(
    prompts: list[str | list[int]], tokenizer, check: Callable[[list[int], str], None]
) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) of every prompt; ``check(ids, label)`` refuses a prompt the engine
    cannot take (empty, too long, an id outside the vocabulary) with a sentence starting with label."""
    encoded = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise RequestError(f"prompt {i} is text, but this model has no tokenizer.json, so prompts must be "
                                   "lists of token ids.")
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as e:  # the tokenizer would fail with a bare TypeError
                raise RequestError(f"prompt {i} is not valid Unicode text: character {e.start} is the lone "
                                   f"surrogate U+{ord(p[e.start]):04X}.") from None
            text, ids = p, tokenizer.encode(p)
        else:
            text, ids = None, p
        check(ids, f"prompt {i}")
        encoded.append((text, ids))
    return encoded
