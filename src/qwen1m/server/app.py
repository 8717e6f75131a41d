"""Routes: the FastAPI app of ``qwen1m serve``.

    GET  /v1/models              the one served model
    POST /v1/completions         prompt(s) -> text, whole or streamed (server-sent events)
    POST /v1/chat/completions    messages -> the checkpoint's chat template -> text
    GET  /health                 200 while the engine loop runs
    GET  /metrics                Prometheus text format

Every error is OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``; request
validation errors become 400 (not FastAPI's 422) because OpenAI clients expect 400, and an error
quotes at most ~200 characters of what the client sent.

Exposure (docs/server.md). With an API key, every route but /health needs it, /metrics too unless
``metrics_public``, and /docs and /openapi.json are off. Without one, only loopback Host names are
answered (``guards.HostCheck``: DNS rebinding) unless ``allowed_hosts`` says otherwise. CORS is off
unless ``cors_origins`` lists origins.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen1m.errors import Qwen1mError
from qwen1m.llm import LLM
from qwen1m.server.engine_loop import EngineLoop, EngineUnavailable
from qwen1m.server.guards import LOOPBACK_HOSTS, BodyLimit, HostCheck
from qwen1m.server.limits import DEFAULT_MAX_TOKENS, ServerLimits, default_max_request_bytes
from qwen1m.server.metrics import ServerMetrics
from qwen1m.server.protocol import QUOTE_CHARS, ChatCompletionRequest, CompletionRequest, OpenAIError, quote
from qwen1m.server.serving import OpenAIServing, error_body

ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


def build_app(llm: LLM, *, model_name: str, api_key: str | None = None, limits: ServerLimits | None = None,
              allowed_hosts: list[str] | None = None, metrics_public: bool = False,
              cors_origins: list[str] | None = None, on_death: Callable[[str], None] | None = None,
              default_max_tokens: int = DEFAULT_MAX_TOKENS) -> FastAPI:
    """The app serving ``llm``; its engine loop starts and stops with the app's lifespan.

    allowed_hosts: Host names answered besides the loopback ones; None: any when there is an API key.
    on_death: called with the reason if the engine loop dies (the CLI then exits non-zero).
    default_max_tokens: a chat request's max_tokens when it gives none and the model's
    generation_config.json has no max_new_tokens (serving.py says why it is bounded).
    """
    limits = limits or ServerLimits(default_max_request_bytes(llm.engine.max_model_len))
    metrics = ServerMetrics()
    engine_loop = EngineLoop(llm.engine, metrics, on_death)
    serving = OpenAIServing(engine_loop, llm.tokenizer, model_name=model_name,
                            max_model_len=llm.engine.max_model_len, limits=limits,
                            generation_defaults=llm.generation_defaults, default_max_tokens=default_max_tokens,
                            eos_token_ids=tuple(sorted(llm.engine.eos_ids)))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_loop.start()
        if serving.tokenizer_pool is not None:
            serving.tokenizer_pool.start()
        try:
            yield
        finally:
            engine_loop.shutdown()  # uvicorn has finished or cancelled in-flight requests by now
            if serving.tokenizer_pool is not None:
                serving.tokenizer_pool.shutdown()

    # with a key the schema is not public; without one /docs stays for local use
    app = FastAPI(title="qwen1m", lifespan=lifespan, openapi_url=None if api_key else "/openapi.json")
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)
    hosts = list(LOOPBACK_HOSTS) + list(allowed_hosts or []) if (allowed_hosts or not api_key) else ["*"]
    app.add_middleware(HostCheck, allowed_hosts=hosts)
    app.add_middleware(_CountResponses, metrics=metrics)  # outermost: it counts the guards' answers too
    app.state.serving, app.state.metrics, app.state.engine_loop = serving, metrics, engine_loop

    def drain(grace_s: float) -> None:
        """SIGTERM: in ``grace_s`` seconds, end every stream still open with an error event and [DONE]
        (before uvicorn's own deadline would cut them with nothing). Event-loop thread."""
        error = EngineUnavailable("The server is shutting down; the request was cancelled before it "
                                  "finished.", 503)
        asyncio.get_running_loop().call_later(grace_s, engine_loop.interrupt_all, error)

    app.state.drain = drain

    def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OpenAIError(401, "Missing API key: send it as the header 'Authorization: Bearer <key>' "
                              "(the key this server was started with, --api-key).", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise OpenAIError(401, "Incorrect API key provided: it does not match this server's --api-key.",
                              code="invalid_api_key")

    v1 = [Depends(check_api_key)]

    @app.get("/v1/models", dependencies=v1)
    async def models():
        return serving.models().model_dump()

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: CompletionRequest, request: Request):
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await serving.chat(body, request)

    @app.get("/health")
    async def health():
        if not engine_loop.is_alive():
            raise EngineUnavailable("The engine loop is not running.", 503)
        return {"status": "ok"}

    @app.get("/metrics", dependencies=[] if metrics_public else v1)
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        message = f"{request.method} {quote(request.url.path)}: {exc.detail}."
        if exc.status_code == 404:
            message += f" This server has {', '.join(ROUTES)}."
        return _error_response(OpenAIError(exc.status_code, message))

    async def on_error(request: Request, exc: Exception):
        return _error_response(error_body(exc))

    for exc_type in (OpenAIError, Qwen1mError, EngineUnavailable):
        app.add_exception_handler(exc_type, on_error)
    return app


def _error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body.model_dump(), status_code=error.status_code, headers=error.headers)


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    """One sentence per problem, naming the field, e.g. "'temperature': Input should be ... (got 5)"."""
    problems, param = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        # drop pydantic's union-member names ("list[int]", "str") from the field path
        loc = [p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "function-after")]
        field = ".".join(loc) if err.get("type") != "json_invalid" else ""  # its loc is a byte offset
        field = field if len(field) <= QUOTE_CHARS else field[:QUOTE_CHARS] + "..."  # dict keys are input too
        param = param or field or None
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            problems.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', msg)})")
        elif err.get("type") == "missing":
            problems.append(f"'{field}' is required")
        elif field:
            problems.append(f"'{field}': {msg} (got {quote(err.get('input'))})")
        else:
            problems.append(msg)
    return OpenAIError(400, "Invalid request: " + "; ".join(dict.fromkeys(problems)) + ".", param=param)


class _CountResponses:
    """Pure ASGI middleware counting responses by route and status (BaseHTTPMiddleware would break
    Starlette's disconnect detection for streams)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.http_requests.inc(route=route, status=str(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)
