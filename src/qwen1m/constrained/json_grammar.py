"""JSON as a pushdown automaton over bytes: which byte may come next, and how many are left to close.

A state is ``(mode, aux, stack)``: ``mode`` is where the lexer is (in a key, after a value, in a
number, ...), ``stack`` the open containers as a string ('O' object, 'A' array), ``aux`` a small
counter the mode needs (whitespace run length, hex digits left in a ``\\u`` escape) or the rest of a
literal ("rue" after "t"). States are tuples of immutable values, so they hash: ``token_table``
caches the tokens allowed in each one.

The language is RFC 8259 JSON with a top-level object (OpenAI's json_object), at most
``MAX_WHITESPACE`` whitespace bytes in a row and ``MAX_DEPTH`` nested containers (both keep a model
from stalling in a loop that a budget would have to cut), and nothing after the closing brace. Bytes
>= 0x80 are taken inside strings without checking UTF-8: an invalid sequence decodes to U+FFFD,
which is still valid JSON text.

``closing_cost(state)`` is the number of bytes of the shortest way to complete the object from
``state``; taking the first byte of that way lowers it by exactly one (``CLOSING_BYTES``), which is
what lets JSON mode always finish within max_tokens.
"""

from __future__ import annotations

import re

MAX_WHITESPACE = 20  # a run of whitespace bytes between tokens (pretty-printing needs ~2 + 4 per level)
MAX_DEPTH = 32  # nested objects/arrays

# modes
START, OBJ_FIRST, OBJ_KEY, KEY, KEY_ESC, KEY_HEX, COLON = range(7)
VALUE, ARR_FIRST, STR, STR_ESC, STR_HEX, LIT, AFTER, DONE = range(7, 15)
NUM_MINUS, NUM_ZERO, NUM_INT, NUM_DOT, NUM_FRAC, NUM_E, NUM_ESIGN, NUM_EXP = range(15, 23)

State = tuple  # (mode, aux, stack)
INITIAL: State = (START, 0, "")

WHITESPACE = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
LITERALS = {ord("t"): "rue", ord("f"): "alse", ord("n"): "ull"}
WS_MODES = frozenset({START, OBJ_FIRST, OBJ_KEY, COLON, VALUE, ARR_FIRST, AFTER})
STRING_MODES = frozenset({KEY, STR})  # bytes other than IMPURE leave these states as they are
IMPURE = re.compile(rb'["\\\x00-\x1f]')  # the bytes that end, escape or break a string
# mode -> (mode inside the string, its escape and \u modes) for keys and values
_ESC = {KEY: KEY_ESC, STR: STR_ESC}
_HEX = {KEY_ESC: KEY_HEX, STR_ESC: STR_HEX}
_BACK = {KEY_ESC: KEY, STR_ESC: STR, KEY_HEX: KEY, STR_HEX: STR}
_TERMINAL_NUMBERS = frozenset({NUM_ZERO, NUM_INT, NUM_FRAC, NUM_EXP})
# bytes the closing needs, besides those of the states' own text: one per open container
_COST = {START: 2, OBJ_FIRST: 0, OBJ_KEY: 4, KEY: 3, KEY_ESC: 4, COLON: 2, VALUE: 1, ARR_FIRST: 0, STR: 1,
         STR_ESC: 2, AFTER: 0, DONE: 0, NUM_MINUS: 1, NUM_ZERO: 0, NUM_INT: 0, NUM_DOT: 1, NUM_FRAC: 0,
         NUM_E: 1, NUM_ESIGN: 1, NUM_EXP: 0}
# every byte on some shortest way to close: a tokenizer needs a token of each alone (token_table)
CLOSING_BYTES = b'{}]":0nrueals'


def closing_cost(state: State) -> int:
    """Bytes needed, at least, to complete the top-level object from ``state``."""
    mode, aux, stack = state
    if mode == KEY_HEX:
        return aux + 3 + len(stack)
    if mode == STR_HEX:
        return aux + 1 + len(stack)
    if mode == LIT:
        return len(aux) + len(stack)
    return _COST[mode] + len(stack)


def _close(stack: str) -> State:
    rest = stack[:-1]
    return (AFTER, 0, rest) if rest else (DONE, 0, "")


def _value(b: int, stack: str) -> State | None:
    """The state after the first byte of a value."""
    if b == 0x22:  # "
        return (STR, 0, stack)
    if b == 0x7B:  # {
        return (OBJ_FIRST, 0, stack + "O") if len(stack) < MAX_DEPTH else None
    if b == 0x5B:  # [
        return (ARR_FIRST, 0, stack + "A") if len(stack) < MAX_DEPTH else None
    if b == 0x2D:  # -
        return (NUM_MINUS, 0, stack)
    if b == 0x30:
        return (NUM_ZERO, 0, stack)
    if b in DIGITS:
        return (NUM_INT, 0, stack)
    if b in LITERALS:
        return (LIT, LITERALS[b], stack)
    return None


def _after(b: int, stack: str) -> State | None:
    if b == 0x2C:  # ,
        return (OBJ_KEY, 0, stack) if stack[-1] == "O" else (VALUE, 0, stack)
    if (b == 0x7D and stack[-1] == "O") or (b == 0x5D and stack[-1] == "A"):  # } ]
        return _close(stack)
    return None


def _number(mode: int, b: int, stack: str) -> State | None:
    if b in DIGITS:
        if mode in (NUM_MINUS, NUM_INT):
            return (NUM_ZERO if mode == NUM_MINUS and b == 0x30 else NUM_INT, 0, stack)
        if mode in (NUM_DOT, NUM_FRAC):
            return (NUM_FRAC, 0, stack)
        if mode in (NUM_E, NUM_ESIGN, NUM_EXP):
            return (NUM_EXP, 0, stack)
        return None  # a digit after a leading 0
    if b == 0x2E and mode in (NUM_ZERO, NUM_INT):  # .
        return (NUM_DOT, 0, stack)
    if b in (0x65, 0x45) and mode in (NUM_ZERO, NUM_INT, NUM_FRAC):  # e E
        return (NUM_E, 0, stack)
    if b in (0x2B, 0x2D) and mode == NUM_E:  # + -
        return (NUM_ESIGN, 0, stack)
    if mode in _TERMINAL_NUMBERS:  # the number ended: this byte is whatever follows a value
        return step((AFTER, 0, stack), b)
    return None


def step(state: State, b: int) -> State | None:
    """The state after byte ``b``, or None when ``b`` cannot come next."""
    mode, aux, stack = state
    if mode in WS_MODES and b in WHITESPACE:
        return (mode, aux + 1, stack) if aux < MAX_WHITESPACE else None
    if mode in STRING_MODES:
        if b == 0x22:
            return (COLON, 0, stack) if mode == KEY else (AFTER, 0, stack)
        if b == 0x5C:  # backslash
            return (_ESC[mode], 0, stack)
        return None if b < 0x20 else (mode, 0, stack)
    if mode in (KEY_ESC, STR_ESC):
        if b in ESCAPES:
            return (_BACK[mode], 0, stack)
        return (_HEX[mode], 4, stack) if b == 0x75 else None  # u
    if mode in (KEY_HEX, STR_HEX):
        if b not in HEX:
            return None
        return (mode, aux - 1, stack) if aux > 1 else (_BACK[mode], 0, stack)
    if mode == START:
        return (OBJ_FIRST, 0, "O") if b == 0x7B else None
    if mode in (OBJ_FIRST, OBJ_KEY):
        if b == 0x22:
            return (KEY, 0, stack)
        return _close(stack) if b == 0x7D and mode == OBJ_FIRST else None
    if mode == COLON:
        return (VALUE, 0, stack) if b == 0x3A else None
    if mode == VALUE:
        return _value(b, stack)
    if mode == ARR_FIRST:
        return _close(stack) if b == 0x5D else _value(b, stack)
    if mode == LIT:
        if b != ord(aux[0]):
            return None
        return (LIT, aux[1:], stack) if len(aux) > 1 else (AFTER, 0, stack)
    if mode == AFTER:
        return _after(b, stack)
    if mode == DONE:
        return None
    return _number(mode, b, stack)


def advance(state: State | None, data: bytes, pos: int = 0) -> State | None:
    """The state after ``data[pos:]`` (None once a byte is refused); string contents are skipped
    over in one regex search, since they leave a string state as it is."""
    end = len(data)
    while state is not None and pos < end:
        if state[0] in STRING_MODES:
            m = IMPURE.search(data, pos)
            if m is None:
                return (state[0], 0, state[2])
            pos = m.start()
        state = step(state, data[pos])
        pos += 1
    return state


def accepts(text: str | bytes) -> str | None:
    """"complete" when ``text`` is a whole top-level JSON object of this grammar, "prefix" when it
    can still become one, None when it cannot."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    state = advance(INITIAL, data)
    if state is None:
        return None
    return "complete" if state[0] == DONE else "prefix"
