"""Engine logprobs (``{token id: Logprob}`` per position) -> OpenAI's two shapes.

Completions: parallel lists ``tokens``, ``token_logprobs``, ``top_logprobs`` (token text -> logprob,
the chosen token and the top-k, as vLLM sends them; tokens with the same text keep the larger) and
``text_offset``. Chat: ``content``, one
``{token, logprob, bytes, top_logprobs}`` per token, ``top_logprobs`` the k most likely by rank.
A logprob of -inf (a token the model rules out) is sent as -9999.0, as vLLM does: JSON has no
infinity.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from qwen1m.outputs import TokenLogprobs
from qwen1m.server.protocol import ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs

FLOOR = -9999.0  # vLLM's stand-in for -inf


def _finite(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


def _token(entries: TokenLogprobs | None, token: int, text_of: Callable[[int], str]) -> str:
    found = entries.get(token) if entries else None
    text = found.decoded_token if found is not None else None
    return text if text is not None else text_of(token)


def completion_logprobs(entries: list[TokenLogprobs | None], token_ids: list[int], offset: int,
                        text_of: Callable[[int], str]) -> CompletionLogprobs:
    """entries[i] scores token_ids[i] (None: nothing does, the first prompt token); offset: where the
    first token's text starts in the choice's text."""
    out = CompletionLogprobs()
    for entry, token in zip(entries, token_ids):
        text = _token(entry, token, text_of)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_finite(entry[token].logprob))
        top: dict[str, float] = {}
        for t, lp in entry.items():  # keyed by text: tokens that share one (partial UTF-8) keep the best
            text = _token(entry, t, text_of)
            top[text] = max(top.get(text, FLOOR), _finite(lp.logprob))
        out.top_logprobs.append(top)
    return out


def chat_logprobs(entries: list[TokenLogprobs], token_ids: list[int], count: int,
                  text_of: Callable[[int], str]) -> ChatLogprobs:
    """count: top_logprobs asked for (the chosen token is listed among them only if it is one)."""
    content = []
    for entry, token in zip(entries, token_ids):
        top = sorted(entry.items(), key=lambda item: item[1].rank)
        top = [item for item in top if item[1].rank <= count][:count]
        content.append(ChatTokenLogprob(
            **_chat_item(entry, token, entry[token].logprob, text_of),
            top_logprobs=[ChatTopLogprob(**_chat_item(entry, t, lp.logprob, text_of)) for t, lp in top]))
    return ChatLogprobs(content=content)


def _chat_item(entry: TokenLogprobs, token: int, logprob: float, text_of: Callable[[int], str]) -> dict:
    text = _token(entry, token, text_of)
    return dict(token=text, logprob=_finite(logprob), bytes=list(text.encode("utf-8", errors="replace")))
