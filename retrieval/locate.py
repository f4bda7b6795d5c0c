"""Where was the photo taken? An estimate from the ranked hits, which all carry a map location.

The best hit by calibrated score anchors the estimate; the hits within 25 m of it (the relevance
radius) vote with their scores for a weighted mean position and a circular-mean heading. The
confidence is the probability that the best hit shows the place: its score, or, with a location head
fitted on validation queries, sigmoid(a * logit(score) + b) (a score is calibrated over whole
shortlists, where most candidates are wrong; the best of a shortlist is right more often than its
score says). When the confidence is below `min_confidence` the answer is "unknown" rather than a guess.

The heading's confidence, P(the heading is within HEADING_RIGHT_DEG of the camera's), comes from a
heading head fitted the same way (retrieval/heads.py) on the location's confidence and how well the
voting hits agree on the heading (the length of their mean direction, 1 = all alike).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from dataset.relevance import SIM_DIST_M
from retrieval.searcher import Hit

if TYPE_CHECKING:
    import pyproj

DEFAULT_UTM_EPSG = 32630  # UTM 30N, London's zone; the service's IMGSEARCH_UTM_EPSG picks another
HEADING_RIGHT_DEG = 30.0


@dataclass(frozen=True)
class Estimate:
    status: str  # "estimated" or "unknown"
    confidence: float  # the best hit's score: probability that it shows the same place
    easting: float | None = None
    northing: float | None = None
    heading: float | None = None
    latitude: float | None = None
    longitude: float | None = None
    support: int = 0  # hits that agree on the place
    heading_confidence: float | None = None  # P(heading within HEADING_RIGHT_DEG); None: no heading head


@dataclass(frozen=True)
class Vote:
    """What the hits near the best one say: its confidence, their weighted place and heading, and
    how much they agree on the heading (mean resultant length in [0, 1])."""

    confidence: float
    easting: float
    northing: float
    heading: float
    agreement: float
    support: int


@lru_cache(maxsize=8)
def _from_wgs84(utm_epsg: int) -> pyproj.Transformer:
    from pyproj import Transformer

    return Transformer.from_crs("EPSG:4326", f"EPSG:{utm_epsg}", always_xy=True)


def to_latlon(easting: float, northing: float, utm_epsg: int) -> tuple[float, float]:
    """(latitude, longitude) in WGS84 of a position in the index's UTM zone."""
    lon, lat = wgs84_transformer(utm_epsg).transform(easting, northing)
    return float(lat), float(lon)


def to_utm(latitude: float, longitude: float, utm_epsg: int) -> tuple[float, float]:
    """(easting, northing) in the index's UTM zone of a WGS84 position."""
    e, n = _from_wgs84(utm_epsg).transform(longitude, latitude)
    return float(e), float(n)


@lru_cache(maxsize=8)
def wgs84_transformer(utm_epsg: int) -> pyproj.Transformer:
    from pyproj import Transformer

    return Transformer.from_crs(f"EPSG:{utm_epsg}", "EPSG:4326", always_xy=True)


def best_hit(hits: list[Hit], top: int = 10) -> Hit | None:
    """The hit of highest score among the first `top`: the one an estimate is anchored on."""
    return max(hits[:top], key=lambda h: h.score, default=None)


def location_confidence(score: float, head: list[float] | None) -> float:
    """P(the best hit shows the place) from its score, through the location head if there is one."""
    if head is None:
        return float(score)
    s = min(max(float(score), 1e-9), 1.0 - 1e-9)
    return float(1.0 / (1.0 + np.exp(-(head[0] * np.log(s / (1.0 - s)) + head[1]))))


def vote(hits: list[Hit], top: int = 10, head: list[float] | None = None) -> Vote | None:
    """The place the first `top` hits vote for (None: no hits)."""
    if not hits:
        return None
    hits = sorted(hits[:top], key=lambda h: -h.score)
    best = hits[0]
    loc = np.array([h.location.as_list() for h in hits], dtype=np.float64)
    near = np.hypot(loc[:, 0] - best.location.easting, loc[:, 1] - best.location.northing) < SIM_DIST_M
    w = np.maximum(np.array([h.score for h in hits])[near], 1e-12)  # all-zero scores still vote alike
    e, n = np.average(loc[near, 0], weights=w), np.average(loc[near, 1], weights=w)
    rad = np.deg2rad(loc[near, 2])
    sx, cx = (w * np.sin(rad)).sum(), (w * np.cos(rad)).sum()
    heading = float(np.rad2deg(np.arctan2(sx, cx)) % 360.0)
    agreement = float(np.hypot(sx, cx) / w.sum())
    return Vote(location_confidence(best.score, head), float(e), float(n), heading, agreement, int(near.sum()))


def heading_confidence(v: Vote, head: list[float] | None) -> float | None:
    """P(the vote's heading is within HEADING_RIGHT_DEG of the camera's), by the heading head [a, c, b]:
    sigmoid(a * logit(location confidence) + c * agreement + b)."""
    if head is None:
        return None
    s = min(max(v.confidence, 1e-9), 1.0 - 1e-9)
    z = head[0] * np.log(s / (1.0 - s)) + head[1] * v.agreement + head[2]
    return float(1.0 / (1.0 + np.exp(-z)))


def estimate_location(
    hits: list[Hit],
    utm_epsg: int,
    min_confidence: float = 0.5,
    top: int = 10,
    head: list[float] | None = None,
    heading_head: list[float] | None = None,
) -> Estimate:
    v = vote(hits, top, head)
    if v is None:
        return Estimate("unknown", 0.0)
    if v.confidence < min_confidence:
        return Estimate("unknown", v.confidence)
    lon, lat = wgs84_transformer(utm_epsg).transform(v.easting, v.northing)
    return Estimate(
        "estimated",
        v.confidence,
        v.easting,
        v.northing,
        v.heading,
        float(lat),
        float(lon),
        v.support,
        heading_confidence(v, heading_head),
    )
