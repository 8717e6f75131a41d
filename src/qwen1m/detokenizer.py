"""Streaming detokenization: turn generated ids into text one token at a time.

Byte-level BPE tokens are byte strings, so one character can be split across tokens (a CJK
character is 3 UTF-8 bytes, an emoji 4, and Qwen's vocabulary often stores them as 2+1 or 1+1+2).
Decoding such a partial sequence gives U+FFFD, which must never reach the client. The approach is
vLLM's: keep two offsets into the generated ids,

    ids:     ... | prefix_offset ...... read_offset ...... len(ids)
                   [ already emitted   ][ not yet emitted ]

decode the window ``ids[prefix_offset:]`` and the already-emitted part ``ids[prefix_offset:read_offset]``,
and emit the difference only when it does not end in U+FFFD. The window always starts at a token
where the emitted text ended on a whole character, so each step decodes a few tokens instead of the
whole output, and the concatenated outputs equal ``decode(all_ids)``.
"""

from __future__ import annotations

from qwen1m.tokenizer import Tokenizer

_REPLACEMENT_CHAR = "\ufffd"  # what UTF-8 decoding with errors="replace" yields for incomplete bytes


class IncrementalDetokenizer:
    """Feed generated ids with ``add``; each call returns only the newly completed text."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window; text before it is final
        self._read_offset = 0  # ids[:read_offset] have had their text emitted

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character at the very end decodes to U+FFFD)."""
        return self._advance(final=True)

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        emitted = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window = self._decode(self._ids[self._prefix_offset :])
        new_text = window[len(emitted) :]
        if not new_text:
            # Only skipped special tokens arrived: nothing to show, but they are consumed.
            self._read_offset = len(self._ids)
            return ""
        if new_text.endswith(_REPLACEMENT_CHAR) and not final:
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens) if ids else ""
