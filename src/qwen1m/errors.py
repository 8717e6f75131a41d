"""Errors a person can act on.

Every error qwen1m raises for bad input (a checkpoint, a config field, a request, a memory budget)
is a ``Qwen1mError`` whose message is one sentence naming the file or field, what was found and
what was expected. The CLI prints that sentence and exits non-zero; the server maps it to a 4xx.
"""

from __future__ import annotations


class Qwen1mError(Exception):
    """Base class: ``str(error)`` is a complete, user-facing sentence."""


class ConfigError(Qwen1mError):
    """A config.json / option value is missing, of the wrong type or out of range."""


class CheckpointError(Qwen1mError):
    """A checkpoint folder is incomplete or its tensors do not match the config."""


class RequestError(Qwen1mError):
    """A generation request is invalid (too long, bad sampling parameters, ...)."""
