"""qwen1m: Qwen-family models on contexts up to one million tokens.

    from qwen1m import LLM, SamplingParams
    llm = LLM()                      # the bundled model; or LLM("/path/to/Qwen2.5-7B-Instruct-1M")
    out = llm.generate(["..."], SamplingParams(max_tokens=32, temperature=0))
"""

from qwen1m.config import DCAConfig, ModelConfig
from qwen1m.errors import Qwen1mError
from qwen1m.llm import LLM, bundled_model_path
from qwen1m.outputs import CompletionOutput, RequestOutput
from qwen1m.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = [
    "LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "DCAConfig", "ModelConfig",
    "Qwen1mError", "bundled_model_path",
]
