"""Dependencies shared by the routes, as Annotated aliases.

They are `async def`: FastAPI runs a plain `def` dependency in its thread pool, a hand-off to another
thread and back for each one of each request (measured in BENCHMARKS.md). Only the searcher's slow
path (a new version or logged changes to wait for) goes there.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from app.core.security import cross_site_reason, is_loopback
from app.errors import ApiError
from app.state import ServiceState
from retrieval.live import LiveIndex, NotReadyError
from retrieval.searcher import Searcher


async def get_state(request: Request) -> ServiceState:
    service: ServiceState = request.app.state.service  # set at start-up; starlette's State is untyped
    return service


StateDep = Annotated[ServiceState, Depends(get_state)]


async def get_searcher(state: StateDep) -> Searcher:
    # The request keeps this snapshot to the end, even if a new version or change is swapped in meanwhile.
    searcher = state.settled()
    if searcher is None:  # sync() may wait for the change log's follower: off the event loop
        searcher = await run_in_threadpool(state.sync)
    if searcher is None:
        raise NotReadyError(f"index not loaded: {state.reason}")
    return searcher


SearcherDep = Annotated[Searcher, Depends(get_searcher)]


async def get_live(state: StateDep) -> LiveIndex:
    """The living index, for the routes that change it (its own methods check it is ready)."""
    if state.live is None:
        raise NotReadyError(f"index not loaded: {state.reason}")
    return state.live


LiveDep = Annotated[LiveIndex, Depends(get_live)]


async def require_admin(request: Request, state: StateDep, x_api_key: Annotated[str | None, Header()] = None) -> None:
    """Admin endpoints: never on behalf of another site; with a key, only for its holder; without one,
    only on a service that listens on loopback alone, asked from loopback."""
    headers = {h: v for h in ("sec-fetch-site", "origin", "host") if (v := request.headers.get(h)) is not None}
    reason = cross_site_reason(headers, request.url.scheme)
    if reason is not None:
        raise ApiError("cross_origin", f"admin endpoints refuse {reason}; call them from a program or this page")
    key = state.settings.admin_key
    if key is None:
        client = request.client.host if request.client is not None else None
        if not state.settings.loopback_only or (client is not None and not is_loopback(client)):
            raise ApiError(
                "admin_locked",
                f"admin endpoints are closed: this service listens on {state.settings.host}, beyond loopback, "
                "and has no admin key; set IMGSEARCH_ADMIN_KEY (16+ characters, 8+ different) "
                "and send it as the X-API-Key header",
            )
        return
    if x_api_key is None:
        raise ApiError("unauthorized", "this endpoint needs the X-API-Key header")
    # Constant-time compare: the answer time must not leak how much of the key matched.
    if not hmac.compare_digest(x_api_key.encode(), key.get_secret_value().encode()):
        raise ApiError("forbidden", "wrong X-API-Key")


AdminDep = Depends(require_admin)
