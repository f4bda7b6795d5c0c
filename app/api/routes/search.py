from __future__ import annotations

import dataclasses
import time
from typing import Annotated

from fastapi import APIRouter, File, Query, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from app.api.deps import NOT_READY_ERRORS, SearcherDep, StateDep
from app.api.uploads import IMAGE_ERRORS, image_errors, read_capped
from app.core.logs import annotate_request
from app.core.observability import MetricsDep
from app.errors import ApiError
from app.schemas import Location, QueryLocation, SearchResponse, SearchResult, error_response
from pipeline.locate import estimate_location
from pipeline.searcher import Hit

router = APIRouter(tags=["search"])

_ERRORS = {
    **IMAGE_ERRORS,
    422: error_response(
        "Bad parameters, or no keypoints in the image",
        ("invalid_request", "query.k: Input should be less than or equal to 100"),
        ("no_keypoints", "no ORB keypoints found in the image (blank or featureless?)"),
    ),
    **NOT_READY_ERRORS,
}


@router.post("/search", response_model=SearchResponse, responses=_ERRORS)
async def search(
    request: Request,
    searcher: SearcherDep,
    state: StateDep,
    metrics: MetricsDep,
    file: Annotated[UploadFile, File(description="A street-level photo (JPEG, PNG, WebP, ...)")],
    k: Annotated[int, Query(ge=1, le=100, description="How many map images to return")] = 10,
) -> SearchResponse:
    """Rank the map images by predicted relevance to the uploaded photo."""
    t0 = time.perf_counter()
    # FastAPI silently keeps the last of repeated fields; which photo was meant is ambiguous: refuse.
    # (The form is already parsed and cached on the request; this reads it, it does not re-parse.)
    n_files = len((await request.form()).getlist("file"))
    if n_files != 1:
        raise ApiError(422, "invalid_request", f"send exactly one multipart field 'file'; got {n_files}")
    data = await read_capped(file, state.settings.max_upload_bytes)
    timings: dict[str, float] = {}  # seconds per pipeline stage, filled as the stages run

    def run() -> list[Hit]:
        return searcher.rank(searcher.analyze(data, timings), k, timings)

    try:
        with image_errors():
            # OpenCV and numpy release the GIL: run the pipeline off the event loop.
            hits = await run_in_threadpool(run)
    finally:
        # Also the stages a refused image went through (e.g. decode before no_keypoints).
        metrics.observe_stages(timings)
        if timings:
            annotate_request(timings_ms={stage: round(sec * 1000, 2) for stage, sec in timings.items()})
    metrics.search_hits.observe(len(hits))
    annotate_request(hits=len(hits))
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
