from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ADMIN_ERRORS, NOT_READY_ERRORS, AdminDep, SearcherDep
from app.errors import ApiError
from app.schemas import PrecisionResponse, error_response

router = APIRouter(tags=["admin"])


@router.get(
    "/metrics/precision",
    response_model=PrecisionResponse,
    dependencies=[AdminDep],
    responses={
        **ADMIN_ERRORS,
        404: error_response(
            "The data folder has no ground truth",
            ("no_metrics", "this index was built from data without ground truth"),
        ),
        **NOT_READY_ERRORS,
    },
)
def precision(searcher: SearcherDep) -> PrecisionResponse:
    """Retrieval quality of the served index on the held-out test queries, computed at index time
    through the same pipeline as /search."""
    m = searcher.loaded.manifest.get("metrics")
    if not m:
        raise ApiError(404, "no_metrics", "this index was built from data without ground truth")
    return PrecisionResponse(
        split=m["split"],
        n_queries=m["n_queries"],
        queries_total=m["queries_total"],
        queries_rejected=m["queries_rejected"],
        precision={k.split("@")[1]: v for k, v in m.items() if k.startswith("precision@")},
        recall={k.split("@")[1]: v for k, v in m.items() if k.startswith("recall@")},
        mAP=m.get("mAP"),
        accuracy_within_margin={
            k.removeprefix("accuracy_within_"): v for k, v in m.items() if k.startswith("accuracy_within_")
        },
        computed_at=m["computed_at"],
        index_version=searcher.loaded.version,
        preset=searcher.conf["preset"],
    )
