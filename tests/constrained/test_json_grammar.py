"""The JSON automaton against json.loads: it accepts exactly the top-level objects json.loads reads
(within its whitespace and depth bounds), and every prefix of one; its closing cost is exact."""

from __future__ import annotations

import json

import pytest

from qwen1m.constrained import json_grammar as g

VALID = [
    "{}",
    '{"a": 1}',
    '{"a":[1,2.5,-3e10,0.0,-0,1E+2,4e-3],"b":{"c":null,"d":true,"e":false}}',
    '{"s": "tab\\t quote\\" backslash\\\\ slash\\/ \\b\\f\\n\\r unicode \\u00e9\\uD83D\\ude00"}',
    '{"unicode": "caf\u00e9 \u4f60\u597d \U0001f600"}',
    '{\n  "pretty": [\n    {},\n    []\n  ]\n}',
    '{"empty": "", "arr": [[], [[]], {"x": []}]}',
    ' \t{"leading whitespace": 1}',
    '{"nested": ' * 10 + "0" + "}" * 10,
]
INVALID = [
    "",  # (a prefix, not complete)
    "[]",  # top level must be an object
    '"text"',
    "1",
    "{",
    "{'a': 1}",
    '{"a" 1}',
    '{"a": 1,}',
    '{"a": [1, 2,]}',
    '{"a": 01}',
    '{"a": 1.}',
    '{"a": .5}',
    '{"a": -}',
    '{"a": 1e}',
    '{"a": tru}',
    '{"a": True}',
    '{"a": NaN}',
    '{"a": Infinity}',
    '{"a": "\\x41"}',
    '{"a": "\\u12"}',
    '{"a": "line\nbreak"}',  # a raw control character in a string
    '{"a": 1}}',
    '{"a": 1} {"b": 2}',
    '{"a": [1, 2}',
    '{"a": {"b": 1]}',
    '{1: 2}',
    '{"a": 1 2}',
]
# valid JSON that this grammar refuses on purpose
OUT_OF_BOUNDS = [
    '{"a": 1} ',  # nothing after the object: EOS comes next
    '{"a":' + " " * (g.MAX_WHITESPACE + 1) + "1}",  # whitespace runs are bounded
    '{"a": ' * (g.MAX_DEPTH + 1) + "0" + "}" * (g.MAX_DEPTH + 1),  # so is nesting
]


def loads_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text, parse_constant=lambda c: 1 / 0), dict)
    except (ValueError, ZeroDivisionError):
        return False


@pytest.mark.parametrize("text", VALID)
def test_valid_objects_are_complete_and_every_prefix_is_a_prefix(text):
    assert loads_object(text)  # the list itself is right
    assert g.accepts(text) == "complete"
    data = text.encode()
    for i in range(len(data)):
        assert g.accepts(data[:i]) == "prefix", data[:i]


@pytest.mark.parametrize("text", INVALID)
def test_invalid_texts_are_never_complete(text):
    assert not loads_object(text)  # the list itself is right
    assert g.accepts(text) != "complete"


@pytest.mark.parametrize("text", OUT_OF_BOUNDS)
def test_the_grammar_bounds_refuse_some_valid_json(text):
    assert loads_object(text) and g.accepts(text) is None


@pytest.mark.parametrize("text", VALID + [t for t in INVALID if g.accepts(t) == "prefix"])
def test_closing_cost_is_exact_and_each_closing_byte_lowers_it_by_one(text):
    state = g.advance(g.INITIAL, text.encode())
    cost, closed = g.closing_cost(state), 0
    while state[0] != g.DONE:  # close greedily with the bytes of CLOSING_BYTES that lower the cost
        state = next(s for b in g.CLOSING_BYTES if (s := g.step(state, b)) is not None
                     and g.closing_cost(s) == g.closing_cost(state) - 1)
        closed += 1
    assert closed == cost


def test_random_prefixes_agree_with_json_loads():
    import random

    rng = random.Random(0)
    alphabet = '{}[]":, 0123456789.-eE+truefalsn\\u"ab'
    for _ in range(3000):
        text = "{" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        if g.accepts(text) == "complete":
            assert loads_object(text), text
        elif g.accepts(text) is None:
            assert not loads_object(text), text
