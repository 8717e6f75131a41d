"""Tool calls in a model's output: Qwen2.5's (Hermes') ``<tool_call>`` blocks -> OpenAI ``tool_calls``.

A Qwen2.5 model asked to call a tool writes, around or instead of its text::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

``parse_tool_calls`` splits a finished output into the text outside the blocks and the calls;
``ToolCallStreamParser`` does the same on a stream of text deltas, holding back what might still
become a ``<tool_call>`` tag, so that a client never sees a tag's first characters as content. A
block whose body is not a JSON object with a string ``name`` stays in the content as written: the
client then sees what the model wrote rather than a call that was never made. Only closed blocks
are calls; an unclosed one at the end (the output hit max_tokens) is content.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

START, END = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's function.arguments)
    id: str

    def openai(self, index: int | None = None) -> dict[str, Any]:
        """The call as OpenAI writes it (``index`` in stream deltas only)."""
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def parse_block(body: str) -> ToolCall | None:
    """The call a block's body describes, or None when it is not ``{"name": str, "arguments": {...}}``."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))  # some fine-tunes write "parameters"
    if isinstance(arguments, str):  # already a JSON string: keep it if it is one
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(data["name"], json.dumps(arguments, ensure_ascii=False), new_call_id())


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished output. With calls, the content is the text outside them,
    stripped, or None when nothing is left; without, the text as it is."""
    parser = ToolCallStreamParser()
    events = parser.feed(text) + parser.finish()
    calls = [e for e in events if isinstance(e, ToolCall)]
    if not calls:
        return text, []
    content = "".join(e for e in events if isinstance(e, str)).strip()
    return content or None, calls


def _partial_tag_at_end(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolCallStreamParser:
    """Text deltas in, events out: ``str`` (content to send) and ``ToolCall`` (a closed, valid block).

    Outside a block, text is sent at once except a tail that could be the start of ``<tool_call>``;
    inside one, nothing is sent until ``</tool_call>`` closes it. ``finish`` returns what is held.
    """

    def __init__(self) -> None:
        self._buffer = ""  # text not sent yet: a possible tag start, or an open block (from its tag)
        self._inside = False
        self.num_calls = 0

    def feed(self, delta: str) -> list[str | ToolCall]:
        self._buffer += delta
        events: list[str | ToolCall] = []
        while True:
            if not self._inside:
                at = self._buffer.find(START)
                if at < 0:
                    keep = _partial_tag_at_end(self._buffer, START)
                    self._emit(events, self._buffer[:len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    return events
                self._emit(events, self._buffer[:at])
                self._buffer, self._inside = self._buffer[at:], True
            end = self._buffer.find(END)
            if end < 0:
                return events
            block, self._buffer = self._buffer[:end + len(END)], self._buffer[end + len(END):]
            self._inside = False
            call = parse_block(block[len(START):-len(END)])
            if call is None:
                self._emit(events, block)
            else:
                self.num_calls += 1
                events.append(call)

    def finish(self) -> list[str | ToolCall]:
        """What is still held (a partial tag, an unclosed block), as content."""
        events: list[str | ToolCall] = []
        self._emit(events, self._buffer)
        self._buffer, self._inside = "", False
        return events

    @staticmethod
    def _emit(events: list, text: str) -> None:
        if text:
            events.append(text)
