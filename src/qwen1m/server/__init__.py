"""The OpenAI-compatible HTTP server (``qwen1m serve``; needs the ``server`` extra).

protocol.py (pydantic request/response types), engine_loop.py (the thread that owns the engine),
serving.py (engine <-> protocol), app.py (routes), metrics.py (Prometheus text), cli.py (the command).
"""
