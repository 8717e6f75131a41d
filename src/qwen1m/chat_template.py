"""Chat templates rendered the way transformers' ``apply_chat_template`` renders them.

See ``transformers/utils/chat_template_utils.py``: an immutable Jinja sandbox with ``trim_blocks``,
``lstrip_blocks`` and loop controls, a ``tojson`` filter that keeps non-ASCII text, the globals
``raise_exception`` and ``strftime_now``. Written here so qwen1m never imports transformers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from qwen1m.errors import RequestError

# Names a message's reasoning may come under; templates read the first (transformers aliases them).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TemplateRaised(jinja2.exceptions.TemplateError):
    """Raised by a template's own ``raise_exception(message)``; the message is meant for the user."""


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes, so templates cannot reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for key in attrs:
            _Namespace._check(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, key: str, value: Any) -> None:
        _Namespace._check(key)
        jinja2.utils.Namespace.__setitem__(self, key, value)

    @staticmethod
    def _check(key: Any) -> None:
        if isinstance(key, str) and key.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set the attribute {key!r} on a namespace"
            )


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body unchanged.

    transformers uses the tag to mark assistant spans for training masks; a prompt only needs the text.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, ') and sorts keys; templates were written
    # against transformers' version, which is plain json.dumps with non-ASCII kept.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def jinja_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    # Templates come from the Hub: untrusted code, hence the immutable sandbox.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


def plain(value: Any) -> Any:
    """A copy built from JSON types only, so the template sees no objects with callable methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic request models
        return plain(value.model_dump())
    if isinstance(value, (str, int, float)):  # subclasses such as str enums: strip back to the base type
        return next(base(value) for base in (str, int, float) if isinstance(value, base))
    return f"<{type(value).__name__}>"


def template_messages(messages: list[Any]) -> list[dict[str, Any]]:
    out = []
    for i, message in enumerate(messages):
        message = plain(message)
        if not isinstance(message, dict):
            raise RequestError(
                f"messages[{i}] must be an object with 'role' and 'content', got {type(message).__name__}."
            )
        # Templates handle a missing key but often print 'None' for a None value (OpenAI clients
        # send content=None), so None-valued keys are dropped, as transformers does.
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# -- reading the folder ----------------------------------------------------------------------------


