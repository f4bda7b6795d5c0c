"""The query path: image bytes and k -> ranked hits, where the photo was taken, the index version
and the time of each stage. POST /search, the evaluation, the benchmark and the warm-up all call
`search_image`, so what is measured is what is served."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from features.decode import ImageDecodeError
from features.orb import NoKeypointsError
from retrieval.locate import DEFAULT_UTM_EPSG, Estimate, estimate_location
from retrieval.searcher import Hit, Query, Searcher

STAGES = ("decode", "features", "encode", "search", "verify")


@dataclass(frozen=True)
class QueryResult:
    hits: list[Hit]
    location: Estimate  # where the photo was probably taken, or "unknown"
    preset: str
    index_version: str
    timings: dict[str, float]  # seconds per stage (STAGES; verify only for presets that verify)
    query: Query  # the analysed query (features, embedding), e.g. to score every map image


def search_image(
    searcher: Searcher,
    data: bytes,
    k: int,
    *,
    utm_epsg: int = DEFAULT_UTM_EPSG,
    timings: dict[str, float] | None = None,
) -> QueryResult:
    """Rank the map images of `searcher` for one photo. Raises the decode errors of features/decode.py
    and NoKeypointsError; `timings`, if given, is filled as the stages run, so it also holds the
    stages a refused image went through."""
    timings = {} if timings is None else timings
    query = searcher.analyze(data, timings)
    hits = searcher.rank(query, k, timings)
    location = estimate_location(hits, utm_epsg, head=searcher.location_head)
    return QueryResult(hits, location, searcher.preset, searcher.version, timings, query)


def warm_up(searcher: Searcher) -> None:
    """One search of a generated image, so the first user request does not pay for lazy set-up
    (BLAS and OpenCV thread pools, first touch of the index pages)."""
    import cv2

    noise = np.random.default_rng(0).integers(0, 256, (256, 341), dtype=np.uint8)
    ok, png = cv2.imencode(".png", cv2.GaussianBlur(noise, (3, 3), 0))
    if ok:
        with contextlib.suppress(ImageDecodeError, NoKeypointsError):
            search_image(searcher, png.tobytes(), 10)
