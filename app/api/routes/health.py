from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import StateDep
from app.schemas import Health, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready}})
def readyz(state: StateDep) -> Ready | JSONResponse:
    """An index is loaded and searchable; 503 with the reason otherwise."""
    s = state.sync()
    if s is None:
        body = Ready(status="not_ready", reason=state.reason, preset=state.settings.preset)
        return JSONResponse(body.model_dump(), status_code=503)
    warning = state.live.error if state.live is not None else None
    bad = s.applied.bad_lines
    if bad and warning is None:
        warning = f"{bad} corrupt line(s) of the change log skipped (each failed its checksum)"
    return Ready(
        status="ready",
        preset=s.preset,
        index_version=s.version,
        size=s.size,
        last_change=s.applied.seq,
        warning=warning,
        corrupt_log_lines=bad,
    )
