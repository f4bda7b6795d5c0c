"""Who may reach the service, and who may change it.

- The Host header must name an allowed host (IMGSEARCH_ALLOWED_HOSTS): a page on another site cannot
  reach a service on loopback through a DNS name it rebinds to 127.0.0.1.
- Admin endpoints refuse requests a browser sends on behalf of another site (Origin, Sec-Fetch-Site):
  a multipart POST needs no CORS preflight, so without this any page an operator opens could add or
  delete images. No CORS headers are ever sent, so no other origin can read an answer either.
- Without an admin key, admin endpoints answer only where nobody else can connect: a service that
  listens on loopback alone, asked from loopback (app/api/deps.py).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import ERRORS, error_body


def split_host(host: str) -> tuple[str, int | None]:
    """(name, port) of a Host header's value; IPv6 addresses without their brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        name, rest = (host[1:end], host[end + 1 :]) if end >= 0 else (host[1:], "")
    elif host.count(":") == 1:
        name, _, port = host.partition(":")
        rest = ":" + port
    else:
        name, rest = host, ""
    return name, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None


def host_name(host: str) -> str:
    return split_host(host)[0]


def host_allowed(name: str, allowed: list[str]) -> bool:
    """Whether a host name matches the allow-list: exact names, *.domain for its subdomains, * for any."""
    for pattern in allowed:
        if pattern == "*" or name == pattern:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


def is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _header(scope: Scope, name: bytes) -> str | None:
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers", ())  # ASGI: (name, value) byte pairs
    for k, v in headers:
        if k == name:
            return v.decode("latin-1")
    return None


class HostCheckMiddleware:
    """400 `invalid_host` for a request whose Host header names no allowed host (or is missing)."""

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or "*" in self.allowed:
            await self.app(scope, receive, send)
            return
        host = _header(scope, b"host")
        if host is not None and host_allowed(host_name(host), self.allowed):
            await self.app(scope, receive, send)
            return
        detail = (
            f"Host {host!r} is not served here; allowed: {', '.join(self.allowed)} (IMGSEARCH_ALLOWED_HOSTS)"
            if host is not None
            else "the request has no Host header"
        )
        body = json.dumps(error_body("invalid_host", detail)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": ERRORS["invalid_host"].status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


_DEFAULT_PORT = {"http": 80, "https": 443}


def cross_site_reason(headers: dict[str, str], scheme: str) -> str | None:
    """Why a browser sent this request on behalf of another site, or None when it did not (or a
    program that is no browser sent it). `headers`: lower-case names."""
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"a {fetch_site} request from a browser (Sec-Fetch-Site)"
    origin = headers.get("origin")
    if origin is None:
        return None
    name, port = split_host(headers.get("host", ""))
    own = (scheme, name, port or _DEFAULT_PORT.get(scheme))
    parts = urlsplit(origin)
    try:
        theirs = (parts.scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORT.get(parts.scheme))
    except ValueError:  # a port that is no number
        theirs = None
    return None if theirs == own else f"a request from the origin {origin!r}"
