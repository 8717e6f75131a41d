"""The <tool_call> parser over fixed outputs, whole and fed as stream deltas split anywhere."""

from __future__ import annotations

import json

import pytest

from qwen1m.server.tool_parser import ToolCall, ToolCallStreamParser, parse_tool_calls

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
BROKEN = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>'
NAMELESS = '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>'

# output -> (content, [(name, arguments)])
CASES = [
    ("Just text, no calls.", "Just text, no calls.", []),
    (WEATHER, None, [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    (WEATHER + "\n" + TIME, None, [("get_weather", {"city": "Paris", "unit": "celsius"}),
                                   ("get_time", {"zone": "CET"})]),
    ("Let me check.\n" + WEATHER, "Let me check.", [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    (WEATHER + "\nDone.", "Done.", [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    (BROKEN, BROKEN, []),  # malformed JSON stays as content, as written
    (NAMELESS, NAMELESS, []),
    (BROKEN + "\n" + TIME, BROKEN, [("get_time", {"zone": "CET"})]),
    ("a < b <tool_c", "a < b <tool_c", []),  # a partial tag at the end is text
    ("x " + WEATHER[:-4], "x " + WEATHER[:-4], []),  # unclosed (cut by max_tokens): content
    ('<tool_call>{"name": "f", "arguments": "{\\"k\\": 1}"}</tool_call>', None, [("f", {"k": 1})]),
]


def calls_of(calls: list[ToolCall]) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("text,content,calls", CASES)
def test_parse_whole_output(text, content, calls):
    got_content, got_calls = parse_tool_calls(text)
    assert got_content == content
    assert calls_of(got_calls) == calls
    for call in got_calls:
        assert call.id.startswith("call_") and len(call.id) > len("call_")
        assert call.openai()["type"] == "function" and isinstance(call.openai()["function"]["arguments"], str)
    assert len({c.id for c in got_calls}) == len(got_calls)


def feed(text: str, cuts: list[int]) -> list:
    parser = ToolCallStreamParser()
    bounds = [0] + sorted(cuts) + [len(text)]
    events = []
    for a, b in zip(bounds, bounds[1:]):
        for event in parser.feed(text[a:b]):
            events.append(event)
    return events + parser.finish()


@pytest.mark.parametrize("text,content,calls", CASES)
@pytest.mark.parametrize("split", ["chars", "inside_tags", "halves", "thirds"])
def test_stream_parser_in_odd_splits(text, content, calls, split):
    tags = [i for i in range(len(text)) if text.startswith(("<tool_call>", "</tool_call>"), i)]
    cuts = {"chars": list(range(1, len(text))),
            "inside_tags": [t + k for t in tags for k in (1, 3, 7) if t + k < len(text)],
            "halves": [len(text) // 2],
            "thirds": [len(text) // 3, 2 * len(text) // 3]}[split]
    events = feed(text, cuts)
    streamed = "".join(e for e in events if isinstance(e, str))
    assert calls_of([e for e in events if isinstance(e, ToolCall)]) == calls
    if calls:  # the whole parse strips the text around calls; a stream cannot take text back
        assert (streamed.strip() or None) == content
    else:
        assert streamed == text


def test_stream_holds_back_a_partial_tag_and_never_sends_it_as_content():
    parser = ToolCallStreamParser()
    assert parser.feed("Sure <tool_c") == ["Sure "]  # "<tool_c" may be a tag: held
    assert parser.feed('all>\n{"name": "f", "arguments": {}}') == []  # inside a block: nothing yet
    (call,) = parser.feed("\n</tool_call>")
    assert call.name == "f" and json.loads(call.arguments) == {}
    assert parser.feed(" <tool") == [" "] and parser.finish() == ["<tool"]
    assert parser.num_calls == 1
    parser = ToolCallStreamParser()
    assert parser.feed("a <b> c <") == ["a <b> c "] and parser.feed("x") == ["<x"]
