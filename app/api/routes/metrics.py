"""Both metrics endpoints: `/metrics` (Prometheus, how the service runs) and `/metrics/precision`
(admin, how well it retrieves: cross-validated over areas when the index was built)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.deps import AdminDep, SearcherDep
from app.core.observability import MetricsDep
from app.errors import ADMIN_ERRORS, ApiError, documented
from app.schemas import HeldOutFigures, PrecisionResponse

router = APIRouter(tags=["metrics"])

_EXAMPLE = """\
# HELP imgsearch_search_stage_seconds Time spent in each stage of the /search query pipeline
# TYPE imgsearch_search_stage_seconds histogram
imgsearch_search_stage_seconds_bucket{le="0.05",stage="features"} 12.0
imgsearch_search_stage_seconds_count{stage="features"} 14.0
# HELP http_requests_total Total number of requests by method, status and handler.
# TYPE http_requests_total counter
http_requests_total{handler="/search",method="POST",status="200"} 14.0
"""


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"example": _EXAMPLE}}, "description": "Prometheus text"}},
)
def prometheus_metrics(request: Request, metrics: MetricsDep) -> Response:
    """Prometheus metrics: requests and their latency by handler, method and status
    (`http_requests_total`, `http_request_duration_seconds`), the latency of each stage of the query
    pipeline (`imgsearch_search_stage_seconds{stage=decode|features|encode|search|verify}`), hits per
    search, the index size and the change log's corrupt lines. Summed over all worker processes."""
    # The index changes while serving (new versions, online adds and deletes): report it as of now.
    # (An app without the service state, e.g. observability's own tests, still reports the rest.)
    state = getattr(request.app.state, "service", None)
    searcher = state.sync() if state is not None else None
    if searcher is not None:
        metrics.index_size.labels(searcher.preset).set(searcher.size)
        metrics.changelog_corrupt.set(searcher.applied.bad_lines)
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/metrics/precision",
    response_model=PrecisionResponse,
    dependencies=[AdminDep],
    responses=documented(*ADMIN_ERRORS, "no_metrics", "not_ready"),
)
def precision(searcher: SearcherDep) -> PrecisionResponse:
    """Retrieval quality of the served index's fitting, computed at index time through the same query
    path as /search: out-of-fold over areas (`cv`), with the test split's look."""
    m = searcher.loaded.manifest.get("metrics")
    if not m:
        raise ApiError("no_metrics", "this index was built from data without ground truth")
    test = m.get("test")
    return PrecisionResponse(
        split=m["split"],
        n_queries=m["n_queries"],
        queries_total=m["queries_total"],
        queries_rejected=m["queries_rejected"],
        precision=_at_k(m, "precision"),
        recall=_at_k(m, "recall"),
        mAP=m.get("mAP"),
        intervals=m.get("intervals") or {},
        folds=m.get("folds"),
        localised_within_25m=m.get("localised_within_25m"),
        localisation_right=m.get("localisation_right"),
        test=None
        if not test
        else HeldOutFigures(
            n_queries=test["n_queries"],
            precision=_at_k(test, "precision"),
            recall=_at_k(test, "recall"),
            mAP=test.get("mAP"),
            localised_within_25m=test.get("localised_within_25m"),
        ),
        accuracy_within_margin={
            k.removeprefix("accuracy_within_"): v
            for k, v in m.items()
            if k.startswith("accuracy_within_") and v is not None
        },
        computed_at=m["computed_at"],
        index_version=searcher.version,
        preset=searcher.preset,
    )


def _at_k(m: dict[str, Any], name: str) -> dict[str, float]:
    return {k.split("@")[1]: v for k, v in m.items() if k.startswith(f"{name}@") and v is not None}
