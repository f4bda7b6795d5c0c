"""Dependencies shared by the routes, as Annotated aliases."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from app.errors import ApiError
from app.schemas import error_response
from app.state import ServiceState
from pipeline.searcher import Searcher


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


def not_ready(reason: object) -> ApiError:
    """The 503 that NOT_READY_ERRORS documents."""
    return ApiError(503, "not_ready", f"index not loaded: {reason}")


def image_not_found(image_id: int) -> ApiError:
    return ApiError(404, "not_found", f"no map image with id {image_id}")


def get_searcher(state: StateDep) -> Searcher:
    # The request keeps this searcher to the end, even if a new version or change is swapped in meanwhile.
    searcher = state.refresh()
    if searcher is None:
        raise not_ready(state.reason)
    return searcher


SearcherDep = Annotated[Searcher, Depends(get_searcher)]


def require_admin(state: StateDep, x_api_key: Annotated[str | None, Header()] = None) -> None:
    key = state.settings.admin_key
    if key is None:
        return
    if x_api_key is None:
        raise ApiError(401, "unauthorized", "this endpoint needs the X-API-Key header")
    # Constant-time compare: the answer time must not leak how much of the key matched.
    if not hmac.compare_digest(x_api_key.encode(), key.get_secret_value().encode()):
        raise ApiError(403, "forbidden", "wrong X-API-Key")


AdminDep = Depends(require_admin)

# How the dependencies above answer, for the `responses=` of the routes that use them.
NOT_READY_ERRORS = {503: error_response("No index loaded", ("not_ready", "index not loaded: starting"))}
ADMIN_ERRORS = {
    401: error_response("No X-API-Key header", ("unauthorized", "this endpoint needs the X-API-Key header")),
    403: error_response("Wrong X-API-Key", ("forbidden", "wrong X-API-Key")),
}
