"""What one request may ask of the server, and how much waiting work it holds (docs/server.md).

Imported by ``qwen1m --help`` for the defaults, so it needs neither FastAPI nor pydantic.

Every bound here is checked before the work it bounds: a body before it is read, a prompt's length
before it is tokenized where a cheap bound settles it, a request before it is queued.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen1m.errors import ConfigError

# A body limit that admits any prompt up to max_model_len: a token is ~4 bytes of English, at most
# ~8 as a JSON token id ("151643, "), ~9 as JSON-escaped CJK text; 16 leaves room, plus 1 MiB for
# the rest of the request (messages, stop strings, template kwargs)
BODY_BYTES_PER_TOKEN = 16
BODY_OVERHEAD_BYTES = 1 << 20
MAX_QUEUED_REQUESTS = 256  # TGI's --max-concurrent-requests is 128; vLLM has no bound
MAX_PROMPTS_PER_REQUEST = 64  # prompts in one /v1/completions request (vLLM and TGI: no bound)
MAX_CONNECTIONS = 1024  # uvicorn's limit_concurrency: open connections, idle keep-alive ones included
RETRY_AFTER_S = 1  # what a 429 tells the client to wait: a queue slot frees when any request starts
# chat's max_tokens when a request gives none and the model's generation_config.json sets no
# max_new_tokens (--default-max-tokens). Without a bound, a chat request on a 1M-token model may hold a
# sequence and its KV cache for a million decode steps (hours) when the model never emits EOS; 8192
# covers long answers and most reasoning traces, and a client that wants more says so
DEFAULT_MAX_TOKENS = 8192


def default_max_request_bytes(max_model_len: int) -> int:
    return BODY_BYTES_PER_TOKEN * max_model_len + BODY_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_request_bytes: int  # 413 past it, before the body is read
    max_queued_requests: int = MAX_QUEUED_REQUESTS  # requests without output yet; 429 past it
    max_prompts_per_request: int = MAX_PROMPTS_PER_REQUEST

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_queued_requests", "max_prompts_per_request"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")


class QueueGate:
    """Counts the generation requests that have no output yet (being tokenized, queued for the engine,
    waiting for a slot, prefilling) and refuses more than ``limit`` with 429. Event-loop thread only."""

    def __init__(self, limit: int):
        self.limit = limit
        self.queued = 0

    def enter(self) -> Ticket:
        if self.queued >= self.limit:
            from qwen1m.server.protocol import OpenAIError  # pydantic: this module imports without it (CLI)

            raise OpenAIError(429, f"The server is busy: {self.queued} requests are already waiting to start "
                              f"(--max-queued-requests {self.limit}); retry in a moment.",
                              type="rate_limit_error", code="queue_full",
                              headers={"Retry-After": str(RETRY_AFTER_S)})
        self.queued += 1
        return Ticket(self)


class Ticket:
    """One request's place in the queue; ``release`` when its first output arrives or it ends."""

    def __init__(self, gate: QueueGate):
        self._gate: QueueGate | None = gate

    def release(self) -> None:
        if self._gate is not None:
            self._gate.queued -= 1
            self._gate = None
