"""ASGI guards that run before routing: the request body limit and the Host header check.

Both are pure ASGI (not BaseHTTPMiddleware, which would break Starlette's disconnect detection for
streams) and answer with OpenAI's error object.

Body limit. A declared Content-Length past the limit gets 413 before a byte of the body is read;
uvicorn then discards the rest of the upload as it arrives (h11 drops body data once the response is
complete), so the client still reads the 413 instead of a reset. A chunked body is counted as it
arrives and cut off at the limit.

Host check (DNS rebinding). A web page on evil.example can make a browser send requests to
http://127.0.0.1:8000 under a name the attacker controls (rebound to 127.0.0.1); only the Host header
tells them apart. A server without an API key therefore answers only Host names in ``allowed_hosts``
(by default the loopback names), unless that list has ``*``.
"""

from __future__ import annotations

import json

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


async def _send_error(send, status: int, message: str, code: str, headers: list | None = None) -> None:
    kind = "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _message(self, size: str) -> str:
        return (f"The request body is {size} bytes, over this server's limit of {self.max_bytes} bytes "
                "(--max-request-bytes); send a shorter prompt.")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_error(send, 413, self._message(declared.decode()), "request_too_large")
        received, answered = 0, False

        async def counting_receive():
            nonlocal received, answered
            message = await receive()
            if message["type"] == "http.request" and not answered:
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    answered = True
                    await _send_error(send, 413, self._message(f"over {self.max_bytes}"), "request_too_large")
                    return {"type": "http.disconnect"}  # the app stops reading and answering
            return message

        async def guarded_send(message):
            if not answered:  # after our 413 the app's own answer (to a "disconnect") goes nowhere
                await send(message)

        await self.app(scope, counting_receive, guarded_send)


class HostCheck:
    def __init__(self, app, allowed_hosts: list[str]):
        self.app = app
        self.allowed = {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or "*" in self.allowed:
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
        name = _host_name(host)
        if name not in self.allowed:
            shown = host if len(host) <= 100 else host[:100] + "..."
            names = ", ".join(sorted(self.allowed))
            return await _send_error(
                send, 400, f"The Host header '{shown}' is not one this server answers ({names}); start it with "
                "--allowed-hosts NAME or an API key to accept it.", "invalid_host")
        await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    """'example.com:8000' -> 'example.com', '[::1]:8000' -> '::1', '127.0.0.1' -> '127.0.0.1'."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
