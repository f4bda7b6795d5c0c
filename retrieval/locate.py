"""Where was the photo taken? An estimate from the ranked hits, which all carry a map location.

The best hit by calibrated score anchors the estimate; the hits within 25 m of it (the relevance
radius) vote with their scores for a weighted mean position and a circular-mean heading. The
confidence is the probability that the best hit shows the place: its score, or, with a location head
fitted on validation queries, sigmoid(a * logit(score) + b) (a score is calibrated over whole
shortlists, where most candidates are wrong; the best of a shortlist is right more often than its
score says). When the confidence is below `min_confidence` the answer is "unknown" rather than a guess.
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


@lru_cache(maxsize=8)
def _to_wgs84(utm_epsg: int) -> pyproj.Transformer:
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


def estimate_location(
    hits: list[Hit], utm_epsg: int, min_confidence: float = 0.5, top: int = 10, head: list[float] | None = None
) -> Estimate:
    if not hits:
        return Estimate("unknown", 0.0)
    hits = sorted(hits[:top], key=lambda h: -h.score)
    best = hits[0]
    confidence = location_confidence(best.score, head)
    if confidence < min_confidence:
        return Estimate("unknown", confidence)
    loc = np.array([h.location.as_list() for h in hits], dtype=np.float64)
    near = np.hypot(loc[:, 0] - best.location.easting, loc[:, 1] - best.location.northing) < SIM_DIST_M
    w = np.array([h.score for h in hits])[near]
    e, n = np.average(loc[near, 0], weights=w), np.average(loc[near, 1], weights=w)
    rad = np.deg2rad(loc[near, 2])
    heading = float(np.rad2deg(np.arctan2((w * np.sin(rad)).sum(), (w * np.cos(rad)).sum())) % 360.0)
    lon, lat = _to_wgs84(utm_epsg).transform(e, n)
    support = int(near.sum())
    return Estimate("estimated", confidence, float(e), float(n), heading, float(lat), float(lon), support)
