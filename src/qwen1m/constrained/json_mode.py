"""JSON mode: a logits processor under which a model can only write one JSON object.

At each step the processor finds the grammar state its sequence's output so far leads to
(``json_grammar``), asks the tokenizer's table which tokens may come next (``token_table``: a trie
walk, cached per state) and sets every other logit to -inf. Two more rules make the output always
parse:

- EOS is allowed only once the top-level object is complete, and then it is the only choice.
- The budget: a token is allowed only if the object can still be closed in the tokens left after
  it (``closing_cost`` bytes, one token each at worst: single-byte tokens always exist). As the end
  of ``max_tokens`` nears, the choices narrow to the ways of closing, so even a small max_tokens
  ends on a complete object. The shortest object, "{}", may take two tokens: ``MIN_MAX_TOKENS``.

The processor must be told the request's ``max_tokens`` (the same value as in SamplingParams). It
keeps each sequence's state keyed by its output so far, so one processor serves the ``n``
completions of a request. Stop strings and stop token ids still apply and can cut the object
short: leave them unset with JSON mode.
"""

from __future__ import annotations

import torch

from qwen1m.constrained import json_grammar as g
from qwen1m.constrained.token_table import token_table
from qwen1m.errors import RequestError

MIN_MAX_TOKENS = 2  # "{" and "}" as two tokens
MAX_TRACKED = 4096  # outputs whose state is remembered; past this the memo restarts (states replay)


class JSONObjectProcessor:
    """``proc(output_token_ids, logits[vocab]) -> logits`` (SamplingParams.logits_processors)."""

    def __init__(self, tokenizer, max_tokens: int, eos_token_ids):
        self.table = token_table(tokenizer)
        self.max_tokens = max_tokens
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
        if not len(self.eos):
            raise RequestError("JSON mode needs the model's EOS token id to end the output; this tokenizer has none.")
        self._states: dict[tuple[int, ...], g.State] = {(): g.INITIAL}

    def state(self, output_token_ids: list[int]) -> g.State:
        """The grammar state after these tokens (the last call's state advanced by one token)."""
        key = tuple(output_token_ids)
        state = self._states.get(key)
        if state is None:
            prev = self._states.get(key[:-1])
            state = self._advance(prev, key[-1]) if prev is not None else self._replay(key)
            if len(self._states) >= MAX_TRACKED:
                self._states = {(): g.INITIAL}
            self._states[key] = state
        return state

    def _advance(self, state: g.State, token: int) -> g.State:
        if state[0] == g.DONE:
            return state  # EOS (ignore_eos keeps sampling it): the object is already complete
        data = self.table.bytes_of.get(token)
        after = None if data is None else g.advance(state, data)
        if after is None:  # only when something after this processor changed the choice
            raise RequestError(f"JSON mode: token {token} cannot continue the JSON object; leave logit_bias "
                               "and other logits processors out of JSON-mode requests.")
        return after

    def _replay(self, tokens: tuple[int, ...]) -> g.State:
        state = g.INITIAL
        for t in tokens:
            state = self._advance(state, t)
        return state

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        state = self.state(output_token_ids)
        left = self.max_tokens - len(output_token_ids) - 1  # tokens after this one
        if state[0] != g.DONE:
            blocked, max_cost = self.table.blocked_mask(state, logits.shape[-1])
            if max_cost <= left:  # the budget rules nothing out: the state's cached mask, one operation
                return logits.masked_fill(blocked.to(logits.device), float("-inf"))
            ids, costs = self.table.allowed(state)
            keep = ids[costs <= left].to(logits.device)
        else:
            keep = self.eos.to(logits.device)
        keep = keep[keep < logits.shape[-1]]
        masked = torch.full_like(logits, float("-inf"))
        masked[keep] = logits[keep]
        return masked


def json_object_processor(tokenizer, max_tokens: int, *, eos_token_ids=None) -> JSONObjectProcessor:
    """A processor that makes the output one JSON object within ``max_tokens`` tokens.

    eos_token_ids: the ids that end generation (default: the tokenizer's). Raises RequestError when
    max_tokens is below ``MIN_MAX_TOKENS``.
    """
    if not isinstance(max_tokens, int) or max_tokens < MIN_MAX_TOKENS:
        raise RequestError(f"JSON mode (response_format json_object) needs max_tokens of at least {MIN_MAX_TOKENS}, "
                           f"enough for the shortest object '{{}}', got {max_tokens!r}.")
    if eos_token_ids is None:
        eos_token_ids = tokenizer.eos_token_ids
    return JSONObjectProcessor(tokenizer, max_tokens, eos_token_ids)
