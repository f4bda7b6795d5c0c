"""Online changes to the served index (admin): add and remove map images, roll back a version.

The domain work is in retrieval/live.py; here inputs are validated (its errors become HTTP answers in
app/errors.py). Every change is durable (fsync'd to the change log) before the answer, and visible to
/search in every server process at once.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Path, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from app.api.deps import AdminDep, LiveDep, SearcherDep, StateDep
from app.api.uploads import read_capped
from app.errors import ADMIN_ERRORS, IMAGE_ERRORS, documented
from app.schemas import Location, MapImage, RollbackResponse
from dataset.layout import Location as MapLocation
from indexer.store import ImageRecord
from retrieval.live import UnknownImageError

router = APIRouter(tags=["admin"])


def _image(rec: ImageRecord) -> MapImage:
    loc = Location.model_validate(rec.loc, from_attributes=True)
    return MapImage(id=rec.id, path=rec.path, location=loc, uploaded=rec.uploaded)


@router.post(
    "/images",
    status_code=201,
    response_model=MapImage,
    dependencies=[AdminDep],
    responses=documented(
        *IMAGE_ERRORS,
        "invalid_request",
        *ADMIN_ERRORS,
        "not_ready",
        example={"invalid_request": "heading: Input should be less than 360"},
    ),
)
async def add_image(
    state: StateDep,
    live: LiveDep,
    file: Annotated[UploadFile, File(description="The map image (JPEG, PNG, WebP, BMP, TIFF)")],
    easting: Annotated[float, Form(ge=0, le=1_000_000, allow_inf_nan=False, description="UTM easting, metres")],
    northing: Annotated[float, Form(ge=0, le=10_000_000, allow_inf_nan=False, description="UTM northing, metres")],
    heading: Annotated[float, Form(ge=0, lt=360, allow_inf_nan=False, description="Compass heading, degrees")],
) -> MapImage:
    """Add a map image with its location. It goes through the indexer's own pipeline (decode,
    features, vector, embedding, verification keypoints), gets a new id, and is searchable at once."""
    data = await read_capped(file, state.settings.max_upload_bytes)
    rec = await run_in_threadpool(live.add, data, MapLocation(easting, northing, heading))
    return _image(rec)


_ID = Annotated[int, Path(ge=0, le=2**62, description="The map image's id, as in /search results")]


@router.get("/images/{image_id}", response_model=MapImage, responses=documented("not_found", "not_ready"))
def get_image(image_id: _ID, searcher: SearcherDep) -> MapImage:
    """A map image of the served index: its path and location."""
    rec = searcher.images.get(image_id)
    if rec is None:
        raise UnknownImageError(image_id)
    return _image(rec)


@router.delete(
    "/images/{image_id}",
    status_code=204,
    response_class=Response,
    dependencies=[AdminDep],
    responses=documented("not_found", *ADMIN_ERRORS, "not_ready"),
)
async def delete_image(image_id: _ID, live: LiveDep) -> Response:
    """Remove a map image from the served index; /search stops returning it at once."""
    await run_in_threadpool(live.delete, image_id)
    return Response(status_code=204)


@router.post(
    "/index/rollback",
    response_model=RollbackResponse,
    dependencies=[AdminDep],
    responses=documented("rollback_failed", *ADMIN_ERRORS, "not_ready"),
)
async def rollback(live: LiveDep, searcher: SearcherDep) -> RollbackResponse:
    """Serve the previous index version again (every server process switches within a request).
    Online changes are kept: they are replayed on top of whatever version is served."""
    target = await run_in_threadpool(live.rollback)
    return RollbackResponse(index_version=target, previous=searcher.version)
