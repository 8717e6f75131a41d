"""qwen1m: Qwen-family models on contexts up to one million tokens."""

__version__ = "0.1.0"
