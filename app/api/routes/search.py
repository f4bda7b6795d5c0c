from __future__ import annotations

import dataclasses
import time
from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from app.api.deps import SearcherDep, StateDep
from app.errors import ApiError
from app.schemas import ErrorResponse, Location, QueryLocation, SearchResponse, SearchResult
from features.decode import ImageDecodeError, ImageTooLargeError, UnsupportedFormatError
from features.orb import NoKeypointsError
from pipeline.locate import estimate_location

router = APIRouter(tags=["search"])

_ERRORS = {
    400: {"model": ErrorResponse, "description": "The upload is not a decodable image"},
    413: {"model": ErrorResponse, "description": "The upload or its pixel count is too large"},
    415: {"model": ErrorResponse, "description": "An image format outside JPEG, PNG, WebP, BMP, TIFF"},
    422: {"model": ErrorResponse, "description": "Bad parameters, or no keypoints in the image"},
    503: {"model": ErrorResponse, "description": "No index loaded"},
}


async def _read_capped(file: UploadFile, limit: int) -> bytes:
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "too_large", f"upload exceeds {limit} bytes")
    return data


@router.post("/search", response_model=SearchResponse, responses=_ERRORS)
async def search(
    searcher: SearcherDep,
    state: StateDep,
    file: Annotated[UploadFile, File(description="A street-level photo (JPEG, PNG, WebP, ...)")],
    k: Annotated[int, Query(ge=1, le=100, description="How many map images to return")] = 10,
) -> SearchResponse:
    """Rank the map images by predicted relevance to the uploaded photo."""
    t0 = time.perf_counter()
    data = await _read_capped(file, state.settings.max_upload_bytes)
    try:
        # OpenCV and numpy release the GIL: run the pipeline off the event loop.
        hits = await run_in_threadpool(searcher.search, data, k)
    except UnsupportedFormatError as e:
        raise ApiError(415, "unsupported_format", str(e)) from e
    except ImageTooLargeError as e:
        raise ApiError(413, "image_too_large", str(e)) from e
    except ImageDecodeError as e:
        raise ApiError(400, "invalid_image", str(e)) from e
    except NoKeypointsError as e:
        raise ApiError(422, "no_keypoints", str(e)) from e
    results = [
        SearchResult(
            rank=h.rank,
            id=h.id,
            path=h.path,
            score=h.score,
            distance=h.distance,
            inliers=h.inliers,
            location=Location(easting=h.loc[0], northing=h.loc[1], heading=h.loc[2]),
        )
        for h in hits
    ]
    estimate = estimate_location(hits, state.settings.utm_epsg)
    return SearchResponse(
        results=results,
        query_location=QueryLocation(**dataclasses.asdict(estimate)),
        k=k,
        preset=searcher.conf["preset"],
        index_version=searcher.loaded.version,
        took_ms=round((time.perf_counter() - t0) * 1000, 2),
    )
