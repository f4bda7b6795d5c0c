from __future__ import annotations

import dataclasses
import functools
import time
from typing import Annotated

import anyio
from fastapi import APIRouter, File, Query, Request, Response, UploadFile

from app.api.deps import SearcherDep, StateDep
from app.api.uploads import read_capped
from app.core.logs import annotate_request
from app.core.observability import MetricsDep
from app.errors import IMAGE_ERRORS, ApiError, documented
from app.schemas import Location, QueryLocation, SearchResponse, SearchResult
from retrieval.query import search_image

router = APIRouter(tags=["search"])


@router.post(
    "/search", response_model=SearchResponse, responses=documented(*IMAGE_ERRORS, "invalid_request", "not_ready")
)
async def search(
    request: Request,
    searcher: SearcherDep,
    state: StateDep,
    metrics: MetricsDep,
    file: Annotated[UploadFile, File(description="A street-level photo (JPEG, PNG, WebP, ...)")],
    k: Annotated[int, Query(ge=1, le=100, description="How many map images to return")] = 10,
) -> Response:
    """Rank the map images by predicted relevance to the uploaded photo."""
    t0 = time.perf_counter()
    # FastAPI silently keeps the last of repeated fields; which photo was meant is ambiguous: refuse.
    # (The form is already parsed and cached on the request; this reads it, it does not re-parse.)
    n_files = len((await request.form()).getlist("file"))
    if n_files != 1:
        raise ApiError("invalid_request", f"send exactly one multipart field 'file'; got {n_files}")
    data = await read_capped(file, state.settings.max_upload_bytes)
    timings: dict[str, float] = {}  # seconds per pipeline stage, filled as the stages run
    try:
        # OpenCV and numpy release the GIL: run the pipeline off the event loop, in one of the worker's
        # search slots (IMGSEARCH_SEARCH_SLOTS). A sharded index's head waits on its shards: no slot.
        run = functools.partial(search_image, searcher, data, k, utm_epsg=state.settings.utm_epsg, timings=timings)
        limiter = state.search_limiter if searcher.shards is None else None
        result = await anyio.to_thread.run_sync(run, limiter=limiter)
    finally:
        # Also the stages a refused image went through (e.g. decode before no_keypoints).
        metrics.observe_stages(timings)
        if timings:
            annotate_request(timings_ms={stage: round(sec * 1000, 2) for stage, sec in timings.items()})
    metrics.search_hits.observe(len(result.hits))
    annotate_request(hits=len(result.hits))
    results = [
        SearchResult(
            rank=h.rank,
            id=h.id,
            path=h.path,
            score=h.score,
            distance=h.distance,
            inliers=h.inliers,
            location=Location.model_validate(h.location, from_attributes=True),
        )
        for h in result.hits
    ]
    body = SearchResponse(
        results=results,
        query_location=QueryLocation(**dataclasses.asdict(result.location)),
        k=k,
        preset=result.preset,
        index_version=result.index_version,
        took_ms=round((time.perf_counter() - t0) * 1000, 2),
    )
    # Serialised here: a returned model would be validated again against response_model (which stays
    # for the schema), a cost per request for a model built just above.
    return Response(body.model_dump_json(), media_type="application/json")
