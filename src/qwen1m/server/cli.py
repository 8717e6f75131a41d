"""``qwen1m serve``: the OpenAI-compatible server on one model.

This module imports without the ``server`` extra so that ``qwen1m --help`` always lists the
command; FastAPI and uvicorn are imported when the command runs.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
from pathlib import Path

from qwen1m.cli_common import load_llm
from qwen1m.engine_config import EngineConfig
from qwen1m.errors import Qwen1mError
from qwen1m.server.limits import (
    BODY_BYTES_PER_TOKEN,
    DEFAULT_MAX_TOKENS,
    MAX_CONNECTIONS,
    MAX_PROMPTS_PER_REQUEST,
    MAX_QUEUED_REQUESTS,
    ServerLimits,
    default_max_request_bytes,
)

logger = logging.getLogger(__name__)


def add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI API (/v1/completions, /v1/chat/completions)")
    EngineConfig.add_cli_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: "
                        "$QWEN1M_API_KEY, else no key; prefer the variable: arguments show in ps)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the checkpoint folder's name)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM; streams still running then "
                        "end with an error event and [DONE]")
    p.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="max_tokens of a chat request that gives none, when the model's generation_config.json "
                        f"sets no max_new_tokens (default {DEFAULT_MAX_TOKENS}; always cut to the room the prompt "
                        "leaves in max_model_len)")
    lim = p.add_argument_group("limits (docs/server.md)")
    lim.add_argument("--max-request-bytes", type=int, default=None,
                     help="larger request bodies get 413 before they are read "
                          f"(default {BODY_BYTES_PER_TOKEN} bytes per token of max_model_len + 1 MiB)")
    lim.add_argument("--max-queued-requests", type=int, default=MAX_QUEUED_REQUESTS,
                     help="requests waiting for their first token (tokenizing, queued, prefilling); "
                          "more get 429 with Retry-After")
    lim.add_argument("--max-prompts-per-request", type=int, default=MAX_PROMPTS_PER_REQUEST,
                     help="prompts in one /v1/completions request")
    lim.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                     help="open connections (streams included); more get uvicorn's 503")
    exp = p.add_argument_group("exposure")
    exp.add_argument("--allowed-hosts", action="append", default=None, metavar="NAME",
                     help="a Host header name to answer besides localhost/127.0.0.1/::1 (repeatable; '*' for "
                          "any). Default: loopback names only without an API key, any with one")
    exp.add_argument("--metrics-public", action="store_true",
                     help="serve /metrics without the API key (default: it needs the key when one is set)")
    exp.add_argument("--cors-allow-origin", action="append", default=None, metavar="ORIGIN",
                     help="let browser pages from ORIGIN call the API (repeatable; default: no CORS)")
    p.set_defaults(func=cmd_serve)


def resolve_api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else $QWEN1M_API_KEY (read when the server starts), else None: no key."""
    return args.api_key or os.environ.get("QWEN1M_API_KEY") or None


def check_port_free(host: str, port: int) -> None:
    """Raise a one-sentence Qwen1mError when ``host:port`` cannot be bound, before minutes of
    loading weights that uvicorn would only then fail to serve. The socket binds as uvicorn's does
    (SO_REUSEADDR: a port left in TIME_WAIT is free) and is closed at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise Qwen1mError(f"--host {host!r} is not an address this machine can bind ({e.strerror}).") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise Qwen1mError(f"port {port} on {host} is already in use; stop the process that holds it or "
                                  "choose another with --port.") from None
            raise Qwen1mError(f"cannot bind port {port} on {host} ({e.strerror}); choose another --host or "
                              "--port.") from None


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from qwen1m.server.app import build_app
        from qwen1m.server.runner import Server
    except ImportError as e:
        raise Qwen1mError(f"qwen1m serve needs the server extra ({e.name} is missing): "
                          "pip install 'qwen1m[server]'.") from None
    if logging.getLogger().level == logging.WARNING:  # the CLI default: still show progress lines
        logging.getLogger("qwen1m.server").setLevel(logging.INFO)
    api_key = resolve_api_key(args)
    if args.api_key:
        logger.warning("--api-key is visible to every user of this machine (ps, /proc); "
                       "set QWEN1M_API_KEY in the environment instead")
    engine_config = EngineConfig.from_cli_args(args)  # bad model flags are refused before the port check
    for flag, value in (("--max-connections", args.max_connections), ("--default-max-tokens", args.default_max_tokens)):
        if value < 1:
            raise Qwen1mError(f"{flag} must be at least 1, got {value}.")
    check_port_free(args.host, args.port)
    llm = load_llm(engine_config)
    model = engine_config.model
    name = args.served_model_name or ("qwen1m" if model is None else Path(model).resolve().name)
    limits = ServerLimits(args.max_request_bytes or default_max_request_bytes(llm.engine.max_model_len),
                          args.max_queued_requests, args.max_prompts_per_request)
    config = uvicorn.Config(None, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=args.shutdown_timeout, limit_concurrency=args.max_connections)
    server = Server(config)
    config.app = build_app(llm, model_name=name, api_key=api_key, limits=limits, allowed_hosts=args.allowed_hosts,
                           metrics_public=args.metrics_public, cors_origins=args.cors_allow_origin,
                           on_death=server.engine_died, default_max_tokens=args.default_max_tokens)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1") and not args.allowed_hosts:
        logger.warning("no API key: only requests addressed to a loopback name are answered; set "
                       "QWEN1M_API_KEY, or name this host with --allowed-hosts")
    logger.info("serving '%s' (max_model_len %d, %s) on http://%s:%d/v1", name, llm.engine.max_model_len,
                limits, args.host, args.port)
    # SIGTERM/SIGINT: stop accepting, let in-flight requests finish within the timeout, end the
    # streams still open with an error event, then stop the engine loop (runner.Server)
    server.run()
    return server.exit_code
