"""Constrained decoding: logits processors that keep a model's output inside a grammar.

    from qwen1m import LLM, SamplingParams
    from qwen1m.constrained import json_object_processor

    llm = LLM()
    params = SamplingParams(max_tokens=64, logits_processors=[json_object_processor(llm.tokenizer, 64)])
    text = llm.generate(["A JSON object about Paris: "], params)[0].outputs[0].text  # json.loads(text) works
"""

from qwen1m.constrained.json_mode import MIN_MAX_TOKENS, JSONObjectProcessor, json_object_processor

__all__ = ["MIN_MAX_TOKENS", "JSONObjectProcessor", "json_object_processor"]
