"""A tokenizer's tokens as bytes, sorted into an implicit trie, and the tokens a JSON state allows.

Built once per tokenizer (``token_table``, cached): every token's bytes (byte-level BPE tokens map
back through GPT-2's byte alphabet, as Qwen's are; other tokenizers' tokens are decoded alone and
dropped when they are not whole characters), added tokens (<|im_end|>, <tool_call>, ...) left out.
Sorted, the tokens sharing a prefix form one contiguous range, so the trie needs no nodes: a
child's range is one ``bisect`` away.

``allowed(state)`` walks that trie with the grammar's automaton from ``state``: a branch is entered
only if its byte is viable, so a state that admits a few bytes (after a value: ``,`` ``}`` ``]``)
costs a few bisects, not a pass over 152K tokens. Inside a string nearly every token is viable; the
walk then takes the whole range in one vector operation (tokens with no quote, backslash or control
byte left keep the state) and steps only the few others. The result, each allowed token with the
closing cost of the state it leads to, is cached per state (LRU), so a state seen before costs one
dict lookup.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections import OrderedDict

import numpy as np
import torch

from qwen1m.constrained import json_grammar as g
from qwen1m.errors import ConfigError

CACHED_STATES = 256  # allowed sets (and masks) kept per tokenizer; a string state's set is ~1 MB at 152K tokens


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte is written as -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes(tokenizer) -> dict[int, bytes]:
    """id -> the bytes the token adds to a decoded text, for every token but the added ones."""
    import tokenizers

    backend = getattr(tokenizer, "backend", tokenizer)  # a qwen1m Tokenizer or a tokenizers.Tokenizer
    added = set(backend.get_added_tokens_decoder())
    vocab = backend.get_vocab(with_added_tokens=False)
    out: dict[int, bytes] = {}
    if isinstance(backend.decoder, tokenizers.decoders.ByteLevel):
        alphabet = _byte_decoder()
        for text, i in vocab.items():
            if i not in added and text and all(c in alphabet for c in text):
                out[i] = bytes(alphabet[c] for c in text)
    else:  # best effort: a token decoded alone, kept only when it is whole characters
        for i in vocab.values():
            text = backend.decode([i], skip_special_tokens=False)
            if i not in added and text and "\ufffd" not in text:
                out[i] = text.encode("utf-8")
    return out


class TokenTable:
    def __init__(self, tokenizer):
        pairs = sorted((b, i) for i, b in token_bytes(tokenizer).items())
        self.keys = [b for b, _ in pairs]
        self.id_list = [i for _, i in pairs]
        self.ids = torch.tensor(self.id_list, dtype=torch.long)
        self.bytes_of = {i: b for b, i in pairs}
        # per token: where its last quote, backslash or control byte is (-1: none). From a string
        # state at byte d, a token whose last such byte is before d stays inside the string.
        self.last_impure = np.array([_last_impure(b) for b in self.keys], dtype=np.int64)
        missing = bytes(b for b in g.CLOSING_BYTES if bytes([b]) not in self.bytes_of.values())
        if missing:
            raise ConfigError(f"JSON mode needs a token for each of the characters {missing.decode()!r} alone, "
                              "which this tokenizer lacks (byte-level BPE tokenizers such as Qwen's have them).")
        self._cache: OrderedDict = OrderedDict()
        self._masks: OrderedDict = OrderedDict()  # (state, vocab) -> blocked_mask's answer
        self._lock = threading.Lock()

    def allowed(self, state: g.State) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, closing cost after each) of the tokens that may come next in ``state``."""
        with self._lock:
            hit = self._cache.get(state)
            if hit is not None:
                self._cache.move_to_end(state)
                return hit
        ids: list[int] = []
        costs: list[int] = []
        vectors: list[tuple[torch.Tensor, int]] = []  # (ids, their common cost) from string ranges
        self._walk(0, len(self.keys), 0, state, ids, costs, vectors)
        all_ids = torch.cat([torch.tensor(ids, dtype=torch.long)] + [v for v, _ in vectors])
        all_costs = torch.cat([torch.tensor(costs, dtype=torch.long)] +
                              [torch.full((len(v),), c, dtype=torch.long) for v, c in vectors])
        with self._lock:
            self._cache[state] = (all_ids, all_costs)
            if len(self._cache) > CACHED_STATES:
                self._cache.popitem(last=False)
        return all_ids, all_costs

    def blocked_mask(self, state: g.State, vocab: int) -> tuple[torch.Tensor, int]:
        """(bool mask [vocab], True for the tokens NOT allowed; the largest closing cost among the
        allowed): a step whose budget covers that cost masks the logits in one operation (cached)."""
        key = (state, vocab)
        with self._lock:
            hit = self._masks.get(key)
            if hit is not None:
                self._masks.move_to_end(key)
                return hit
        ids, costs = self.allowed(state)
        mask = torch.ones(vocab, dtype=torch.bool)
        mask[ids[ids < vocab]] = False
        entry = (mask, int(costs.max()) if len(costs) else 0)
        with self._lock:
            self._masks[key] = entry
            if len(self._masks) > CACHED_STATES:
                self._masks.popitem(last=False)
        return entry

    def _walk(self, lo: int, hi: int, depth: int, state: g.State, ids: list[int], costs: list[int],
              vectors: list) -> None:
        """Tokens keys[lo:hi] share their first ``depth`` bytes, after which the automaton is in ``state``."""
        keys = self.keys
        while lo < hi and len(keys[lo]) == depth:  # the prefix itself is a token (sorted first)
            ids.append(self.id_list[lo])
            costs.append(g.closing_cost(state))
            lo += 1
        if lo >= hi:
            return
        if state[0] in g.STRING_MODES:
            pure = self.last_impure[lo:hi] < depth
            vectors.append((self.ids[lo:hi][torch.from_numpy(pure)], g.closing_cost(state)))
            for k in np.flatnonzero(~pure) + lo:
                after = g.advance(state, keys[k], depth)
                if after is not None:
                    ids.append(self.id_list[k])
                    costs.append(g.closing_cost(after))
            return
        while lo < hi:
            b = keys[lo][depth]
            end = hi if b == 255 else bisect.bisect_left(keys, keys[lo][:depth] + bytes([b + 1]), lo, hi)
            nxt = g.step(state, b)
            if nxt is not None:
                self._walk(lo, end, depth + 1, nxt, ids, costs, vectors)
            lo = end


def _last_impure(data: bytes) -> int:
    found = -1
    for m in g.IMPURE.finditer(data):
        found = m.start()
    return found


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def token_table(tokenizer) -> TokenTable:
    """The tokenizer's table, built on first use (about a second for 152K tokens) and kept while the
    tokenizer lives."""
    with _TABLES_LOCK:
        table = _TABLES.get(tokenizer)
        if table is None:
            table = _TABLES[tokenizer] = TokenTable(tokenizer)
        return table
