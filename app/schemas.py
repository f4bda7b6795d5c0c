"""Response bodies of the HTTP API (kept apart from the domain types in pipeline/)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Location(BaseModel):
    easting: float = Field(description="UTM easting in metres")
    northing: float = Field(description="UTM northing in metres")
    heading: float = Field(description="Compass heading of the camera in degrees")


class SearchResult(BaseModel):
    rank: int = Field(ge=1)
    id: int = Field(description="Stable id of the map image")
    path: str = Field(description="The map image's entry in database.json")
    score: float = Field(ge=0, le=1, description="Predicted relevance in [0, 1]")
    distance: float = Field(ge=0, description="Euclidean distance of the embeddings")
    inliers: int | None = Field(
        default=None, description="Geometric verification: RANSAC inliers of ORB matches (null: not verified)"
    )
    location: Location


class QueryLocation(BaseModel):
    status: Literal["estimated", "unknown"] = Field(description="unknown when no hit is likely enough")
    confidence: float = Field(ge=0, le=1, description="Score of the best hit: probability it shows the place")
    easting: float | None = None
    northing: float | None = None
    heading: float | None = Field(default=None, description="Compass heading in degrees")
    latitude: float | None = Field(default=None, description="WGS84")
    longitude: float | None = Field(default=None, description="WGS84")
    support: int = Field(default=0, description="Hits within 25 m of the best one that voted")


class SearchResponse(BaseModel):
    results: list[SearchResult]
    query_location: QueryLocation = Field(description="Where the photo was probably taken")
    k: int
    preset: str
    index_version: str
    took_ms: float


class ErrorResponse(BaseModel):
    code: str = Field(description="Stable machine-readable error code")
    detail: str = Field(description="Human-readable message")


class PrecisionResponse(BaseModel):
    split: str = Field(description="Which ground-truth queries were used (held out from training)")
    n_queries: int = Field(description="Queries with at least one relevant map image, evaluated")
    queries_total: int
    queries_rejected: int = Field(description="Queries the pipeline could not search (e.g. no keypoints)")
    precision: dict[str, float] = Field(description="precision@k for k = 5, 10, 20, 50")
    recall: dict[str, float] = Field(description="recall@k: share of queries with a relevant hit in the top k")
    mAP: float | None = None
    accuracy_within_margin: dict[str, float] = Field(
        description="Share of (query, map image) pairs with |score - fov| <= margin"
    )
    computed_at: str
    index_version: str
    preset: str


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    reason: str | None = None
    preset: str | None = None
    index_version: str | None = None
    size: int | None = None
