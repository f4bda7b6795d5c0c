"""The HTTP serving layer: uvicorn's httptools protocol with read deadlines, and the open-files limit.

uvicorn only times a connection between requests (its keep-alive timer starts after a response): a
client that opens a connection and sends nothing, half a request, or a body at a byte a second holds
it, and one worker's file descriptors, forever. `DeadlineProtocol` gives every request two deadlines:

- headers: from the connection opening (or the first byte of a next request on a kept-alive one) to
  the end of the headers, `IMGSEARCH_HEADER_TIMEOUT_S`. A connection that sent nothing is closed
  silently; one that sent part of a request gets 408 with `Connection: close`.
- body: from the end of the headers to the end of the body, `IMGSEARCH_BODY_TIMEOUT_S` plus the time
  the bytes received so far justify at `IMGSEARCH_BODY_MIN_RATE_KB_S`, so a large upload over a slow
  but steady link passes. At the deadline the connection is closed; the app sees a disconnect.

One timer per connection: a phase change moves the deadline, and the timer is re-armed only when it
fires early (the body's allowance grows with each chunk, but a chunk only adds to a counter).

`imgsearch serve` hands the deadlines in (functools.partial): uvicorn pickles its config, protocol
included, to the workers it spawns.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import resource
from dataclasses import dataclass
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from app.schemas import ErrorResponse
from common.settings import Settings

log = logging.getLogger(__name__)

# Descriptors a worker needs besides its connections: the listening socket, index and model files,
# prometheus files, pipes, the thread pool's.
FD_HEADROOM = 256

# What a connection is waiting for; only HEADERS and BODY have a read deadline.
IDLE, HEADERS, BODY, APP, CLOSING = "idle", "headers", "body", "app", "closing"


@dataclass(frozen=True)
class Deadlines:
    header_s: float
    body_s: float
    body_min_rate: float  # bytes per second

    @classmethod
    def from_settings(cls, s: Settings) -> Deadlines:
        return cls(s.header_timeout_s, s.body_timeout_s, s.body_min_rate_kb_s * 1024)


@functools.cache
def default_deadlines() -> Deadlines:
    """The deadlines of a protocol built without any (uvicorn given the class alone)."""
    return Deadlines.from_settings(Settings())


def _408_body(header_s: float) -> bytes:
    detail = f"request headers not received within {header_s:g} s"
    return json.dumps(ErrorResponse(code="request_timeout", detail=detail).model_dump(), separators=(",", ":")).encode()


class DeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header and a body read deadline (see the module's doc)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        deadlines: Deadlines | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.deadlines = deadlines or default_deadlines()
        self._phase = IDLE
        self._since = 0.0  # loop time the phase started
        self._deadline: float | None = None  # loop time; for BODY, before the rate allowance
        self._timer: asyncio.TimerHandle | None = None
        self._sent_bytes = False  # of the request in HEADERS
        self._body_bytes = 0

    # Phases

    def _enter(self, phase: str, deadline: float | None) -> None:
        self._phase, self._deadline = phase, deadline
        # A pending timer due before the new deadline is left to fire and re-arm; one due after is moved.
        if deadline is not None and (self._timer is None or self._timer.when() > deadline):
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _start_headers(self) -> None:
        now = self.loop.time()
        self._since, self._sent_bytes = now, False
        self._enter(HEADERS, now + self.deadlines.header_s)

    def _due(self) -> float | None:
        if self._deadline is None or self._phase != BODY:
            return self._deadline
        return self._deadline + self._body_bytes / self.deadlines.body_min_rate

    def _on_timer(self) -> None:
        self._timer = None
        due = self._due()
        if due is None:
            return
        now = self.loop.time()
        if now < due:
            self._timer = self.loop.call_at(due, self._on_timer)
        elif self.transport.is_closing():
            # A close waiting to send its last answer (our 408, uvicorn's 400, a `Connection: close`
            # response) to a client that does not read it: drop it.
            self.transport.abort()
        elif self._phase in (HEADERS, BODY) and self.flow.read_paused:
            # The server stopped reading (pipelining, or the app is not consuming the body): not the
            # client's delay. A fresh window from now.
            self._since, self._body_bytes = now, 0
            self._enter(self._phase, now + (self.deadlines.body_s if self._phase == BODY else self.deadlines.header_s))
        elif self._phase == HEADERS:
            self._headers_late(now)
        elif self._phase == BODY:
            self._cut(f"{self._body_bytes} body bytes in {now - self._since:.1f} s")

    def _headers_late(self, now: float) -> None:
        if not self._sent_bytes:
            self._phase = IDLE
            self.transport.abort()  # connected and said nothing: nothing to answer
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request behind an answer still being written: the 408 cannot go in the middle.
            self._enter(HEADERS, now + self.deadlines.header_s)
            return
        self._warn(HEADERS, f"incomplete after {now - self._since:.1f} s; answered 408")
        content = [STATUS_LINE[408]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        body = _408_body(self.deadlines.header_s)
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()
        # close() waits for the answer to be sent: bounded (see _on_timer), for a client that does not read it.
        self._enter(CLOSING, now + self.deadlines.header_s)

    def _cut(self, what: str) -> None:
        self._warn(BODY, what)
        self._phase = IDLE
        self.transport.abort()  # connection_lost tells the app (a disconnect)

    def _warn(self, phase: str, what: str) -> None:
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
        log.warning("closed slow connection from %s in phase %s: %s", client, phase, what)

    # Protocol interface

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._phase, self._deadline = IDLE, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        if self._phase == IDLE:  # the first byte of a next request on a kept-alive connection
            self._start_headers()
        if self._phase == HEADERS:
            self._sent_bytes = True
        super().data_received(data)

    def handle_websocket_upgrade(self) -> None:
        # The websocket protocol takes the transport over, with its own timeouts.
        self._enter(IDLE, None)
        super().handle_websocket_upgrade()

    # Parser callbacks

    def on_message_begin(self) -> None:
        if self._phase != HEADERS:  # a pipelined request behind one still in APP
            self._start_headers()
            self._sent_bytes = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        now = self.loop.time()
        self._since, self._body_bytes = now, 0
        self._enter(BODY, now + self.deadlines.body_s)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self.cycle is not None and self.cycle.response_complete and not self.transport.is_closing():
            # Answered before the body ended (413): its bytes cancelled the keep-alive timer; arm it again.
            self._enter(IDLE, None)
            self._unset_keepalive_if_required()
            handler = self.timeout_keep_alive_handler
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, handler)
        else:
            self._enter(APP, None)
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._phase == APP:  # else the next (pipelined) request is already in HEADERS or BODY
            self._enter(IDLE, None)
        super().on_response_complete()


def raise_open_files_limit(max_connections: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (inherited by the workers) to what `max_connections`
    connections per worker need, up to the hard limit; warn when the hard limit is lower. Returns the
    soft limit now in force."""
    need = max_connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if hard != resource.RLIM_INFINITY and hard < need:
        log.warning(
            "open-files hard limit %d is below the %d that IMGSEARCH_MAX_CONNECTIONS=%d needs; "
            "a worker accepts at most about %d connections (raise `ulimit -Hn` or lower the cap)",
            hard,
            need,
            max_connections,
            max(hard - FD_HEADROOM, 0),
        )
    return soft
