"""Request body size limit as a pure ASGI middleware.

Starlette's multipart parser spools file parts to disk with no size cap, and a chunked upload has no
Content-Length to check up front. So the cap is enforced where the bytes arrive: a declared
Content-Length over the cap is refused before any body is read, and the streamed body is counted
chunk by chunk; once the count passes the cap the app stops receiving and the client gets
413 {"code": "too_large"} instead of whatever the app would have answered to a cut-off body.
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ERRORS, error_body

log = logging.getLogger(__name__)

# Multipart boundaries, part headers and small form fields around the one file of max_upload bytes.
MULTIPART_OVERHEAD = 64 * 1024


class BodyTooLargeError(Exception):
    """Raised into the app from receive() when the streamed body passes the cap."""


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server rejects a malformed header before the app sees it
    return None


async def _send_413(send: Send, limit: int) -> None:
    body = json.dumps(error_body("too_large", f"request body exceeds {limit} bytes"), separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": ERRORS["too_large"].status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The rest of the body is not read: the connection cannot be reused.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodySizeLimitMiddleware:
    """413 for bodies over `max_bytes`, with or without Content-Length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _send_413(send, self.max_bytes)
            return

        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise BodyTooLargeError
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise BodyTooLargeError
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's answer to a body it could not finish reading is replaced by the 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            # FastAPI may re-raise the abort as its own error; any error after the cap is the abort.
            if not exceeded:
                raise
            log.debug("body over %d bytes aborted", self.max_bytes, exc_info=True)
        if exceeded and not started:
            await _send_413(send, self.max_bytes)
