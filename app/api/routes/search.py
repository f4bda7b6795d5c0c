from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import APIRouter, File, Query, Request, Response, UploadFile

from app.api.deps import SearcherDep, StateDep
from app.api.uploads import read_capped
from app.core.logs import annotate_request
from app.core.observability import MetricsDep
from app.errors import IMAGE_ERRORS, ApiError, documented
from app.schemas import Location, Match, PriorEcho, QueryLocation, SearchResponse, SearchResult
from features.decode import ImageDecodeError, oriented_size
from indexer.store import image_file
from retrieval.prior import MAX_RADIUS_M
from retrieval.query import Position, QueryResult, search_image
from retrieval.searcher import Searcher

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
    lat: Annotated[
        float | None, Query(ge=-90, le=90, allow_inf_nan=False, description="Prior: latitude (WGS84 degrees)")
    ] = None,
    lon: Annotated[
        float | None, Query(ge=-180, le=180, allow_inf_nan=False, description="Prior: longitude (WGS84 degrees)")
    ] = None,
    radius_m: Annotated[
        float | None,
        Query(gt=0, le=MAX_RADIUS_M, allow_inf_nan=False, description="Prior: only map images within it (metres)"),
    ] = None,
    accuracy_m: Annotated[
        float | None,
        Query(
            gt=0,
            le=MAX_RADIUS_M,
            allow_inf_nan=False,
            description="Prior: 1-sigma of it (default radius_m/3)",
        ),
    ] = None,
    explain: Annotated[
        bool, Query(description="Add each verified hit's inlier matches and transform (at most 200 each)")
    ] = False,
) -> Response:
    """Rank the map images by predicted relevance to the uploaded photo. With a rough position (`lat`,
    `lon` and `radius_m`, all three; `accuracy_m` optional) the candidates are the map images within
    the radius, and the ranking and the location fuse the visual evidence with the position."""
    t0 = time.perf_counter()
    position = _position(lat, lon, radius_m, accuracy_m)
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
        run = functools.partial(
            search_image,
            searcher,
            data,
            k,
            utm_epsg=state.settings.utm_epsg,
            timings=timings,
            position=position,
            explain=explain,
            map_size=functools.partial(_map_size, searcher, state.settings.data_root),
        )
        limiter = state.search_limiter if searcher.shards is None else None
        result = await anyio.to_thread.run_sync(run, limiter=limiter)
    finally:
        # Also the stages a refused image went through (e.g. decode before no_keypoints).
        metrics.observe_stages(timings)
        if timings:
            annotate_request(timings_ms={stage: round(sec * 1000, 2) for stage, sec in timings.items()})
    metrics.search_hits.observe(len(result.hits))
    annotate_request(hits=len(result.hits))
    body = SearchResponse(
        results=_results(result),
        query_location=QueryLocation(**dataclasses.asdict(result.location)),
        k=k,
        preset=result.preset,
        index_version=result.index_version,
        took_ms=round((time.perf_counter() - t0) * 1000, 2),
    )
    if position is not None and result.prior is not None:
        body.prior = PriorEcho(
            latitude=position.latitude,
            longitude=position.longitude,
            radius_m=result.prior.radius_m,
            accuracy_m=result.prior.accuracy_m,
            candidates=result.candidates or 0,
        )
    if result.query_size is not None:
        body.query_size = list(result.query_size)
    # Serialised here: a returned model would be validated again against response_model (which stays
    # for the schema), a cost per request for a model built just above. The prior's and explain's
    # fields appear only when asked for: the plain answer stays as it was.
    return Response(body.model_dump_json(exclude_unset=True), media_type="application/json")


def _position(
    lat: float | None, lon: float | None, radius_m: float | None, accuracy_m: float | None
) -> Position | None:
    """The prior, if the client gave one: lat, lon and radius_m come together, accuracy_m only with them."""
    given = {"lat": lat, "lon": lon, "radius_m": radius_m}
    if all(v is None for v in given.values()):
        if accuracy_m is not None:
            raise ApiError("invalid_request", "query.accuracy_m: a position needs lat, lon and radius_m too")
        return None
    missing = [name for name, v in given.items() if v is None]
    if missing:
        raise ApiError(
            "invalid_request", f"query.{missing[0]}: a position needs lat, lon and radius_m together; missing {missing}"
        )
    assert lat is not None and lon is not None and radius_m is not None
    return Position(lat, lon, radius_m, accuracy_m)


def _map_size(searcher: Searcher, data_root: Path, image_id: int) -> tuple[int, int] | None:
    """A map image's upright (width, height) from its file's header (None when it cannot be read)."""
    rec = searcher.images.get(image_id)
    path = None if rec is None else image_file(rec, searcher.loaded.family, data_root)
    if path is None:
        return None
    try:
        return oriented_size(path.read_bytes())
    except (OSError, ImageDecodeError):
        return None


def _results(result: QueryResult) -> list[SearchResult]:
    out = []
    for h in result.hits:
        hit = SearchResult(
            rank=h.rank,
            id=h.id,
            path=h.path,
            score=h.score,
            distance=h.distance,
            inliers=h.inliers,
            location=Location.model_validate(h.location, from_attributes=True),
        )
        ex = None if result.explained is None else result.explained.get(h.id)
        if ex is not None:
            hit.matches = [Match(query=list(q), map=list(m)) for q, m in ex.matches]
            hit.transform = ex.transform
            hit.image_size = None if ex.image_size is None else list(ex.image_size)
        out.append(hit)
    return out
