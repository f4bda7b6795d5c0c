"""Online changes to the served index (admin): add and remove map images, roll back a version.

The domain work is in retrieval/live.py; here inputs are validated (its errors become HTTP answers in
app/errors.py). Every change is durable (fsync'd to the change log) before the answer, and visible to
/search in every server process at once.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Path, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from app.api.deps import AdminDep, LiveDep, SearcherDep, StateDep
from app.api.uploads import read_capped
from app.errors import ADMIN_ERRORS, IMAGE_ERRORS, STORAGE_ERRORS, documented
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
    responses={
        200: {"model": MapImage, "description": "These bytes were added before: the image they made"},
        **documented(
            *IMAGE_ERRORS,
            "invalid_request",
            *ADMIN_ERRORS,
            "idempotency_conflict",
            "not_ready",
            *STORAGE_ERRORS,
            example={"invalid_request": "heading: Input should be less than 360"},
        ),
    },
)
async def add_image(
    state: StateDep,
    live: LiveDep,
    response: Response,
    file: Annotated[UploadFile, File(description="The map image (JPEG, PNG, WebP, BMP, TIFF)")],
    easting: Annotated[float, Form(ge=0, le=1_000_000, allow_inf_nan=False, description="UTM easting, metres")],
    northing: Annotated[float, Form(ge=0, le=10_000_000, allow_inf_nan=False, description="UTM northing, metres")],
    heading: Annotated[float, Form(ge=0, lt=360, allow_inf_nan=False, description="Compass heading, degrees")],
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=128,
            pattern=r"^[!-~]+$",
            description="Any token of printable characters: a retry with it gets the image the first try made",
        ),
    ] = None,
) -> MapImage:
    """Add a map image with its location. It goes through the indexer's own pipeline (decode,
    features, vector, embedding, verification keypoints), gets a new id, and is searchable at once
    (201). Adds are idempotent: the same bytes again, or a retry with the same Idempotency-Key,
    answer 200 with the image the first add made (with its location: to move an image, delete it and
    add it again)."""
    data = await read_capped(file, state.settings.max_upload_bytes)
    rec, created = await run_in_threadpool(live.add, data, MapLocation(easting, northing, heading), idempotency_key)
    if not created:
        response.status_code = 200
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
    responses=documented("not_found", *ADMIN_ERRORS, "not_ready", *STORAGE_ERRORS),
)
async def delete_image(image_id: _ID, live: LiveDep) -> Response:
    """Remove a map image from the served index; /search stops returning it at once. An image added
    online leaves no bytes behind: its file and embedding are removed with it."""
    await run_in_threadpool(live.delete, image_id)
    return Response(status_code=204)


@router.post(
    "/index/rollback",
    response_model=RollbackResponse,
    dependencies=[AdminDep],
    responses=documented("rollback_failed", *ADMIN_ERRORS, "not_ready", *STORAGE_ERRORS),
)
async def rollback(live: LiveDep) -> RollbackResponse:
    """Serve the version served before the current one again (every server process switches within a
    request); also when no index is loaded, which is when it is needed most. Online changes are kept:
    they are replayed on top of whatever version is served."""
    previous, target = await run_in_threadpool(live.rollback)
    return RollbackResponse(index_version=target, previous=previous)
