"""The model's own sampling defaults, from its ``generation_config.json`` (vLLM's ``--generation-config
auto``).

A checkpoint says how it wants to be sampled: Qwen2.5-7B-Instruct-1M asks for temperature 0.7,
top_p 0.8, top_k 20 and repetition_penalty 1.05; the bundled model says ``do_sample: false``
(greedy). Python (``LLM.get_default_sampling_params()``, used when no SamplingParams is given), the
CLI (flags left unset) and the server (request fields left out) all start from the same values, so
one prompt gives the same text through every entry point. Fields the file does not set keep
vLLM's defaults (``SamplingParams()``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from qwen1m.errors import ConfigError

FILE_NAME = "generation_config.json"
# generation_config.json field -> SamplingParams field, each with the range it must fall in
_FIELDS: dict[str, tuple[str, float, float]] = {
    "temperature": ("temperature", 0.0, math.inf),
    "top_p": ("top_p", 0.0, 1.0),
    "top_k": ("top_k", -1, math.inf),
    "min_p": ("min_p", 0.0, 1.0),
    "repetition_penalty": ("repetition_penalty", 0.0, math.inf),
    "max_new_tokens": ("max_tokens", 1, math.inf),
}


def load_generation_defaults(folder: str | Path) -> dict[str, Any]:
    """SamplingParams keyword defaults from ``folder/generation_config.json`` ({} when absent).

    ``do_sample: false`` means greedy (temperature 0) whatever temperature the file also gives, as
    in transformers. A field of the wrong type or range is a ConfigError naming the file and field.
    """
    path = Path(folder) / FILE_NAME
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not readable JSON: {exc}.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(raw).__name__}.")
    defaults: dict[str, Any] = {}
    for key, (name, low, high) in _FIELDS.items():
        value = raw.get(key)
        if value is None:
            continue
        integral = name in ("top_k", "max_tokens")
        if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
            raise ConfigError(f"{path}: '{key}' must be {'an integer' if integral else 'a number'}, got {value!r}.")
        if not low <= value <= high or (key in ("top_p", "repetition_penalty") and value == 0):
            raise ConfigError(f"{path}: '{key}' is out of range: {value!r}.")
        defaults[name] = value
    do_sample = raw.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise ConfigError(f"{path}: 'do_sample' must be true or false, got {do_sample!r}.")
    if do_sample is False:
        defaults["temperature"] = 0.0
    return defaults
