"""``qwen1m serve``: the OpenAI-compatible server on one model.

This module imports without the ``server`` extra so that ``qwen1m --help`` always lists the
command; FastAPI and uvicorn are imported when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from qwen1m.errors import Qwen1mError

logger = logging.getLogger(__name__)


def add_serve_command(sub) -> None:
    from qwen1m.cli import _add_model_args

    p = sub.add_parser("serve", help="serve the OpenAI API (/v1/completions, /v1/chat/completions)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("QWEN1M_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes "
                        "(default: $QWEN1M_API_KEY, else no key)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the checkpoint folder's name)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM before they are cancelled")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from qwen1m.server.app import build_app
    except ImportError as e:
        raise Qwen1mError(f"qwen1m serve needs the server extra ({e.name} is missing): "
                          "pip install 'qwen1m[server]'.") from None
    from qwen1m.cli import _load_llm

    if logging.getLogger().level == logging.WARNING:  # the CLI default: still show progress lines
        logging.getLogger("qwen1m.server").setLevel(logging.INFO)
    llm = _load_llm(args)
    name = args.served_model_name or ("qwen1m" if args.model is None else Path(args.model).resolve().name)
    app = build_app(llm, model_name=name, api_key=args.api_key or None)
    logger.info("serving '%s' (max_model_len %d) on http://%s:%d/v1", name, llm.engine.max_model_len,
                args.host, args.port)
    # uvicorn handles SIGTERM/SIGINT: stop accepting, let in-flight requests finish within the
    # timeout, cancel the rest (which aborts their engine requests), then stop the engine loop
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0
