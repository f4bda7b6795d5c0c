"""Dependencies shared by the routes, as Annotated aliases."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from app.errors import ApiError
from app.state import ServiceState
from retrieval.live import LiveIndex, NotReadyError
from retrieval.searcher import Searcher


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


def get_searcher(state: StateDep) -> Searcher:
    # The request keeps this snapshot to the end, even if a new version or change is swapped in meanwhile.
    searcher = state.sync()
    if searcher is None:
        raise NotReadyError(f"index not loaded: {state.reason}")
    return searcher


SearcherDep = Annotated[Searcher, Depends(get_searcher)]


def get_live(state: StateDep) -> LiveIndex:
    """The living index, for the routes that change it (its own methods check it is ready)."""
    if state.live is None:
        raise NotReadyError(f"index not loaded: {state.reason}")
    return state.live


LiveDep = Annotated[LiveIndex, Depends(get_live)]


def require_admin(state: StateDep, x_api_key: Annotated[str | None, Header()] = None) -> None:
    key = state.settings.admin_key
    if key is None:
        return
    if x_api_key is None:
        raise ApiError("unauthorized", "this endpoint needs the X-API-Key header")
    # Constant-time compare: the answer time must not leak how much of the key matched.
    if not hmac.compare_digest(x_api_key.encode(), key.get_secret_value().encode()):
        raise ApiError("forbidden", "wrong X-API-Key")


AdminDep = Depends(require_admin)
