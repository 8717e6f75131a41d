"""qwen1m: Qwen-family models on contexts up to one million tokens.

    from qwen1m import LLM, SamplingParams
    llm = LLM()                      # the bundled model; or LLM("/path/to/Qwen2.5-7B-Instruct-1M")
    out = llm.generate(["..."], SamplingParams(max_tokens=32, temperature=0))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> module. Imported on first use (PEP 562) so that a process needing one light submodule (the
# server's tokenizer worker, ``qwen1m --help``) does not import torch (~2 s, ~200 MB) with it.
_EXPORTS = {
    "LLM": "qwen1m.llm", "bundled_model_path": "qwen1m.llm", "SamplingParams": "qwen1m.sampling_params",
    "RequestOutput": "qwen1m.outputs", "CompletionOutput": "qwen1m.outputs", "DCAConfig": "qwen1m.config",
    "ModelConfig": "qwen1m.config", "Qwen1mError": "qwen1m.errors", "EngineConfig": "qwen1m.engine_config",
}
__all__ = [
    "LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "DCAConfig", "ModelConfig",
    "Qwen1mError", "bundled_model_path", "EngineConfig",
]

if TYPE_CHECKING:
    from qwen1m.config import DCAConfig, ModelConfig
    from qwen1m.engine_config import EngineConfig
    from qwen1m.errors import Qwen1mError
    from qwen1m.llm import LLM, bundled_model_path
    from qwen1m.outputs import CompletionOutput, RequestOutput
    from qwen1m.sampling_params import SamplingParams


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qwen1m' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value
