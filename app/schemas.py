"""Response bodies of the HTTP API (kept apart from the domain types of retrieval/, indexer/ and dataset/)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAPI examples (/docs): a real answer of the default preset to a London query, rounded.
_VERSION = "v000012-20261127-190959"
_LOC = {"easting": 697226.4, "northing": 5710608.5, "heading": 158.8}
_HITS = [
    {
        "rank": 1,
        "id": 250,
        "path": "database/images/PwY48CVPVnkI4qZSVqoZpQ.jpg",
        "score": 0.967,
        "distance": 1.254,
        "inliers": 31,
        "location": _LOC,
    },
    {
        "rank": 2,
        "id": 251,
        "path": "database/images/tTMYtDCn-y_Ag-YQwP7voQ.jpg",
        "score": 0.626,
        "distance": 1.282,
        "inliers": 16,
        "location": {"easting": 697228.6, "northing": 5710602.8, "heading": 166.4},
    },
]
_ESTIMATED = {
    "status": "estimated",
    "confidence": 0.967,
    "easting": 697227.2,
    "northing": 5710606.2,
    "heading": 161.8,
    "latitude": 51.512107,
    "longitude": -0.157615,
    "support": 2,
    "heading_confidence": 0.91,
}
_UNKNOWN = dict.fromkeys(("easting", "northing", "heading", "latitude", "longitude", "heading_confidence")) | {
    "status": "unknown",
    "confidence": 0.31,
    "support": 0,
}


def _examples(*examples: dict[str, Any]) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": list(examples)})


class Location(BaseModel):
    model_config = _examples(_LOC)

    easting: float = Field(description="UTM easting in metres")
    northing: float = Field(description="UTM northing in metres")
    heading: float = Field(description="Compass heading of the camera in degrees")


class Match(BaseModel):
    model_config = _examples({"query": [412.5, 233.0], "map": [301.2, 180.4]})

    query: list[float] = Field(description="[x, y] in the uploaded photo's pixels (upright, as EXIF orients it)")
    map: list[float] = Field(description="[x, y] in the map image's pixels (`image_size`)")


class SearchResult(BaseModel):
    model_config = _examples(_HITS[0])

    rank: int = Field(ge=1)
    id: int = Field(description="Stable id of the map image")
    path: str = Field(description="The map image's entry in database.json")
    score: float = Field(ge=0, le=1, description="Predicted relevance in [0, 1]")
    distance: float = Field(ge=0, description="Euclidean distance of the embeddings")
    inliers: int | None = Field(
        default=None, description="Geometric verification: RANSAC inliers of ORB matches (null: not verified)"
    )
    location: Location
    matches: list[Match] | None = Field(
        default=None, description="explain=true, verified hits: the inlier correspondences (at most 200)"
    )
    transform: list[list[float]] | None = Field(
        default=None, description="explain=true: the fitted 2x3 similarity transform, photo pixels -> map pixels"
    )
    image_size: list[int] | None = Field(
        default=None, description="explain=true: [width, height] of the map image its `matches` refer to"
    )


class QueryLocation(BaseModel):
    model_config = _examples(_ESTIMATED, _UNKNOWN)

    status: Literal["estimated", "unknown"] = Field(description="unknown when no hit is likely enough")
    confidence: float = Field(ge=0, le=1, description="Probability that the best hit shows the place")
    easting: float | None = None
    northing: float | None = None
    heading: float | None = Field(default=None, description="Compass heading in degrees")
    latitude: float | None = Field(default=None, description="WGS84")
    longitude: float | None = Field(default=None, description="WGS84")
    support: int = Field(default=0, description="Hits within 25 m of the best one that voted")
    heading_confidence: float | None = Field(
        default=None, ge=0, le=1, description="Probability that the heading is within 30 degrees of the camera's"
    )


class PriorEcho(BaseModel):
    model_config = _examples(
        {"latitude": 51.5121, "longitude": -0.1576, "radius_m": 100.0, "accuracy_m": 33.3, "candidates": 21}
    )

    latitude: float
    longitude: float
    radius_m: float
    accuracy_m: float = Field(description="1-sigma of the position used (radius_m / 3 unless given)")
    candidates: int = Field(description="Map images within the radius, every one scored")


class SearchResponse(BaseModel):
    model_config = _examples(
        {
            "results": _HITS,
            "query_location": _ESTIMATED,
            "k": 2,
            "preset": "default",
            "index_version": _VERSION,
            "took_ms": 71.3,
        }
    )

    results: list[SearchResult]
    query_location: QueryLocation = Field(description="Where the photo was probably taken")
    k: int
    preset: str
    index_version: str
    took_ms: float
    prior: PriorEcho | None = Field(default=None, description="The position prior, when one was given")
    query_size: list[int] | None = Field(
        default=None, description="explain=true: [width, height] of the photo as its matches refer to it"
    )


class ErrorResponse(BaseModel):
    model_config = _examples(
        {"code": "invalid_image", "detail": "not a decodable image (supported: JPEG, PNG, WebP, BMP, TIFF)"},
        {"code": "invalid_request", "detail": "query.k: Input should be less than or equal to 100"},
        {"code": "not_ready", "detail": "index not loaded: starting"},
    )

    code: str = Field(description="Stable machine-readable error code")
    detail: str = Field(description="Human-readable message")


_TEST_FIGURES = {
    "n_queries": 199,
    "precision": {"1": 0.497, "5": 0.31, "10": 0.231, "20": 0.152, "50": 0.07},
    "recall": {"1": 0.497, "5": 0.633, "10": 0.688, "20": 0.729, "50": 0.769},
    "mAP": 0.3,
    "localised_within_25m": 0.34,
}


class HeldOutFigures(BaseModel):
    """The test split's figures: areas held out from every fit of the same procedure."""

    model_config = _examples(_TEST_FIGURES)

    n_queries: int
    precision: dict[str, float]
    recall: dict[str, float]
    mAP: float | None = None
    localised_within_25m: float | None = None


class PrecisionResponse(BaseModel):
    model_config = _examples(
        {
            "split": "cv",
            "n_queries": 1797,
            "queries_total": 1820,
            "queries_rejected": 0,
            "precision": {"1": 0.512, "5": 0.301, "10": 0.228, "20": 0.151, "50": 0.071},
            "recall": {"1": 0.512, "5": 0.655, "10": 0.702, "20": 0.741, "50": 0.795},
            "mAP": 0.301,
            "intervals": {"recall@1": [0.47, 0.55], "recall@10": [0.66, 0.74]},
            "folds": 5,
            "localised_within_25m": 0.41,
            "localisation_right": 0.9,
            "test": _TEST_FIGURES,
            "accuracy_within_margin": {},
            "computed_at": "2026-11-27T19:09:59Z",
            "index_version": _VERSION,
            "preset": "default",
        }
    )

    split: str = Field(
        description="Which answers: `cv` = the out-of-fold answers of an area-fold cross-validation (the "
        "served model learned from every labelled query; these figures are what the same fitting got on "
        "areas it did not learn from)"
    )
    n_queries: int = Field(description="Queries with at least one relevant map image, evaluated")
    queries_total: int
    queries_rejected: int = Field(description="Queries the pipeline could not search (e.g. no keypoints)")
    precision: dict[str, float] = Field(description="precision@k for k = 1, 5, 10, 20, 50")
    recall: dict[str, float] = Field(description="recall@k: share of queries with a relevant hit in the top k")
    mAP: float | None = None
    intervals: dict[str, list[float] | None] = Field(
        default_factory=dict, description="cv: 95% interval of each figure, by a bootstrap over map cells"
    )
    folds: int | None = Field(default=None, description="cv: how many area folds")
    localised_within_25m: float | None = Field(default=None, description="Share of queries located within 25 m")
    localisation_right: float | None = Field(default=None, description="Share of location estimates within 25 m")
    test: HeldOutFigures | None = Field(
        default=None, description="cv: the test split's one look (fitted on all but the test split)"
    )
    accuracy_within_margin: dict[str, float] = Field(
        description="Share of (query, map image) pairs with |score - fov| <= margin (not measured by cv)"
    )
    computed_at: str
    index_version: str
    preset: str


class Health(BaseModel):
    model_config = _examples({"status": "ok"})

    status: str


class Ready(BaseModel):
    model_config = _examples(
        {
            "status": "ready",
            "preset": "default",
            "index_version": _VERSION,
            "size": 3291,
        },
        {
            "status": "not_ready",
            "reason": "no index version in artifacts/london-2d0017f2/index-paper",
            "preset": "paper",
        },
    )

    status: str
    reason: str | None = None
    preset: str | None = None
    index_version: str | None = None
    size: int | None = None
    last_change: int | None = Field(default=None, description="Sequence number of the last online change applied")
    warning: str | None = Field(
        default=None,
        description="Serving, but not the version CURRENT names (it failed to load), or with corrupt change-log lines",
    )
    corrupt_log_lines: int | None = Field(
        default=None, description="Lines of the change log skipped as corrupt (each failed its checksum)"
    )


class MapImage(BaseModel):
    model_config = _examples(
        {"id": 250, "path": "database/images/PwY48CVPVnkI4qZSVqoZpQ.jpg", "location": _LOC, "uploaded": False}
    )

    id: int = Field(description="Stable id of the map image (never reused)")
    path: str = Field(
        description="database.json entry, or for an image added online its stored upload (uploads/<sha256>.<ext>)"
    )
    location: Location
    uploaded: bool = Field(description="Added online with POST /images")


class RollbackResponse(BaseModel):
    model_config = _examples({"index_version": "v000011-20261126-080102", "previous": _VERSION})

    index_version: str = Field(description="The version CURRENT now names; every process switches to it")
    previous: str | None = Field(description="The version CURRENT named before (null: none was named)")


class MapPoints(BaseModel):
    """Where the map images are, for the browser page's map: parallel lists, one entry per image."""

    model_config = _examples(
        {
            "total": 3,
            "shown": 3,
            "ids": [249, 250, 251],
            "latitude": [51.512131, 51.512118, 51.512067],
            "longitude": [-0.157651, -0.157632, -0.157604],
            "heading": [151.2, 158.8, 166.4],
        }
    )

    total: int = Field(ge=0, description="Map images in the served index")
    shown: int = Field(ge=0, description="Images listed here: all, or every ceil(total/limit)-th by id")
    ids: list[int] = Field(description="Their ids, ascending")
    latitude: list[float] = Field(description="WGS84 degrees, 6 decimals")
    longitude: list[float] = Field(description="WGS84 degrees, 6 decimals")
    heading: list[float] = Field(description="Compass heading of the camera in degrees")
