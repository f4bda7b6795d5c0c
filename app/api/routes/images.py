"""Online changes to the served index (admin): add and remove map images, roll back a version.

The domain work is in pipeline/live.py; here inputs are validated and its errors mapped to HTTP.
Every change is durable (fsync'd to the change log) before the answer, and visible to /search in
every server process at once.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Path, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from app.api.deps import ADMIN_ERRORS, NOT_READY_ERRORS, AdminDep, StateDep, image_not_found, not_ready
from app.api.uploads import IMAGE_ERRORS, image_errors, read_capped
from app.errors import ApiError
from app.schemas import Location, MapImage, RollbackResponse, error_response
from indexer.store import ImageRecord, IndexLoadError
from pipeline.live import LiveIndex, NotReadyError, UnknownImageError
from pipeline.live import Location as MapLocation

router = APIRouter(tags=["admin"])

_NOT_FOUND = {404: error_response("No map image with this id", ("not_found", "no map image with id 7"))}


def _live(state: StateDep) -> LiveIndex:
    if state.live is None or state.refresh() is None:
        raise not_ready(state.reason)
    return state.live


def _image(rec: ImageRecord) -> MapImage:
    loc = Location(easting=rec.loc[0], northing=rec.loc[1], heading=rec.loc[2])
    return MapImage(id=rec.id, path=rec.path, location=loc, uploaded=rec.uploaded)


@router.post(
    "/images",
    status_code=201,
    response_model=MapImage,
    dependencies=[AdminDep],
    responses={
        **IMAGE_ERRORS,
        422: error_response(
            "Bad location fields, or no keypoints in the image",
            ("invalid_request", "heading: Input should be less than 360"),
            ("no_keypoints", "no ORB keypoints found in the image (blank or featureless?)"),
        ),
        **ADMIN_ERRORS,
        **NOT_READY_ERRORS,
    },
)
async def add_image(
    state: StateDep,
    file: Annotated[UploadFile, File(description="The map image (JPEG, PNG, WebP, BMP, TIFF)")],
    easting: Annotated[float, Form(ge=0, le=1_000_000, allow_inf_nan=False, description="UTM easting, metres")],
    northing: Annotated[float, Form(ge=0, le=10_000_000, allow_inf_nan=False, description="UTM northing, metres")],
    heading: Annotated[float, Form(ge=0, lt=360, allow_inf_nan=False, description="Compass heading, degrees")],
) -> MapImage:
    """Add a map image with its location. It goes through the indexer's own pipeline (decode,
    features, vector, embedding, verification keypoints), gets a new id, and is searchable at once."""
    data = await read_capped(file, state.settings.max_upload_bytes)
    live = _live(state)
    try:
        with image_errors():
            rec = await run_in_threadpool(live.add, data, MapLocation(easting, northing, heading))
    except NotReadyError as e:
        raise not_ready(e) from e
    return _image(rec)


_ID = Annotated[int, Path(ge=0, le=2**62, description="The map image's id, as in /search results")]


@router.get(
    "/images/{image_id}",
    response_model=MapImage,
    responses={**_NOT_FOUND, **NOT_READY_ERRORS},
)
def get_image(image_id: _ID, state: StateDep) -> MapImage:
    """A map image of the served index: its path and location."""
    rec = _live(state).searcher.images.get(image_id)  # type: ignore[union-attr]
    if rec is None:
        raise image_not_found(image_id)
    return _image(rec)


@router.delete(
    "/images/{image_id}",
    status_code=204,
    response_class=Response,
    dependencies=[AdminDep],
    responses={**_NOT_FOUND, **ADMIN_ERRORS, **NOT_READY_ERRORS},
)
async def delete_image(image_id: _ID, state: StateDep) -> Response:
    """Remove a map image from the served index; /search stops returning it at once."""
    live = _live(state)
    try:
        await run_in_threadpool(live.delete, image_id)
    except UnknownImageError as e:
        raise image_not_found(image_id) from e
    except NotReadyError as e:
        raise not_ready(e) from e
    return Response(status_code=204)


@router.post(
    "/index/rollback",
    response_model=RollbackResponse,
    dependencies=[AdminDep],
    responses={
        409: error_response(
            "No loadable previous version",
            ("rollback_failed", "no version older than v20261127-190959-909011 is kept; nothing to roll back to"),
        ),
        **ADMIN_ERRORS,
        **NOT_READY_ERRORS,
    },
)
async def rollback(state: StateDep) -> RollbackResponse:
    """Serve the previous index version again (every server process switches within a request).
    Online changes are kept: they are replayed on top of whatever version is served."""
    live = _live(state)
    previous = live.searcher.loaded.version  # type: ignore[union-attr]
    try:
        target = await run_in_threadpool(live.rollback)
    except IndexLoadError as e:
        raise ApiError(409, "rollback_failed", str(e)) from e
    return RollbackResponse(index_version=target, previous=previous)
