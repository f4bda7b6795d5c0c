"""The query path: image bytes, k and an optional position prior -> ranked hits, where the photo was
taken, the index version and the time of each stage; with `explain`, the matches that verified each
hit. POST /search, the evaluation, the benchmark and the warm-up all call `search_image`, so what is
measured is what is served."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from features.decode import ImageDecodeError, decoded_size, oriented_size
from features.orb import NoKeypointsError
from retrieval.locate import DEFAULT_UTM_EPSG, Estimate, estimate_location, to_utm
from retrieval.prior import Prior
from retrieval.searcher import Hit, Query, Searcher

MAX_MATCHES = 200  # per explained hit: enough to see the evidence, bounded for the answer's size


@dataclass(frozen=True)
class Position:
    """A client's rough position of the photo (WGS84 degrees, metres)."""

    latitude: float
    longitude: float
    radius_m: float
    accuracy_m: float | None = None  # 1-sigma of the fix; None: radius_m / 3


@dataclass(frozen=True)
class Explained:
    """A verified hit's evidence in each image's own pixels (upright, before any shrinking)."""

    matches: list[tuple[tuple[float, float], tuple[float, float]]]  # (query xy, map xy), at most MAX_MATCHES
    transform: list[list[float]] | None  # 2x3, query pixels -> map pixels
    image_size: tuple[int, int] | None  # the map image's (width, height) its coordinates refer to


STAGES = ("decode", "features", "encode", "search", "verify")


@dataclass(frozen=True)
class QueryResult:
    hits: list[Hit]
    location: Estimate  # where the photo was probably taken, or "unknown"
    preset: str
    index_version: str
    timings: dict[str, float]  # seconds per stage (STAGES; verify only for presets that verify)
    query: Query  # the analysed query (features, embedding), e.g. to score every map image
    prior: Prior | None = None  # the position prior in the index's UTM metres
    candidates: int | None = None  # with a prior: map images within its radius
    query_size: tuple[int, int] | None = None  # with explain: the photo's upright (width, height)
    explained: dict[int, Explained] | None = None  # with explain: per verified hit's id


def search_image(
    searcher: Searcher,
    data: bytes,
    k: int,
    *,
    utm_epsg: int = DEFAULT_UTM_EPSG,
    timings: dict[str, float] | None = None,
    position: Position | None = None,
    explain: bool = False,
    map_size: Callable[[int], tuple[int, int] | None] | None = None,
) -> QueryResult:
    """Rank the map images of `searcher` for one photo, among those within `position`'s radius when
    one is given. Raises the decode errors of features/decode.py and NoKeypointsError (and ValueError
    for a position out of range); `timings`, if given, is filled as the stages run, so it also holds
    the stages a refused image went through. `map_size(id)`: a map image's upright (width, height),
    for explained matches in its own pixels (None: in the pixels the pipeline read it at)."""
    timings = {} if timings is None else timings
    query = searcher.analyze(data, timings)
    prior, candidates = None, None
    # A sharded index's shard calls of this search share one deadline.
    with searcher.shards.deadline() if searcher.shards is not None else contextlib.nullcontext():
        if position is None:
            hits = searcher.rank(query, k, timings)
            head = searcher.location_head
        else:
            e, n = to_utm(position.latitude, position.longitude, utm_epsg)
            accuracy = position.radius_m / 3.0 if position.accuracy_m is None else position.accuracy_m
            prior = Prior(e, n, position.radius_m, accuracy)
            hits, candidates = searcher.rank_near(query, prior, k, timings)
            head = searcher.prior_location_head
        location = estimate_location(hits, utm_epsg, head=head, heading_head=searcher.heading_head)
        result = QueryResult(hits, location, searcher.preset, searcher.version, timings, query, prior, candidates)
        if not explain:
            return result
        size = oriented_size(data)
        explained = explain_hits(searcher, query, hits, size, map_size or (lambda _i: None))
    return dataclasses.replace(result, query_size=size, explained=explained)


def explain_hits(
    searcher: Searcher,
    query: Query,
    hits: list[Hit],
    query_size: tuple[int, int],
    map_size: Callable[[int], tuple[int, int] | None],
) -> dict[int, Explained]:
    """The evidence of each verified hit, scaled from the pixels the pipeline read each image at to
    the image's own."""
    verified = [h.id for h in hits if h.inliers is not None]
    found = searcher.evidence(query, verified)
    vf = query.verify_features
    if not found or vf is None:
        return {}
    max_side = searcher.pipeline.verify_features.max_side
    sq = query_size[0] / float(vf.width or decoded_size(*query_size, max_side)[0])
    out = {}
    for i, ev in zip(verified, found, strict=True):
        size = map_size(i)
        sm = 1.0 if size is None else size[0] / decoded_size(*size, max_side)[0]
        pq = np.round(ev.query_xy[:MAX_MATCHES].astype(np.float64) * sq, 1).tolist()
        pm = np.round(ev.map_xy[:MAX_MATCHES].astype(np.float64) * sm, 1).tolist()
        transform = None
        if ev.transform is not None:
            m = np.asarray(ev.transform, np.float64).copy()
            m[:, :2] *= sm / sq
            m[:, 2] *= sm
            transform = np.round(m, 6).tolist()
        matches = [((a[0], a[1]), (b[0], b[1])) for a, b in zip(pq, pm, strict=True)]
        out[i] = Explained(matches, transform, size)
    return out


def warm_up(searcher: Searcher) -> None:
    """One search of a generated image, so the first user request does not pay for lazy set-up
    (BLAS and OpenCV thread pools, first touch of the index pages)."""
    import cv2

    _ = searcher.places  # the spatial index of prior searches, sorted before a request needs it
    noise = np.random.default_rng(0).integers(0, 256, (256, 341), dtype=np.uint8)
    ok, png = cv2.imencode(".png", cv2.GaussianBlur(noise, (3, 3), 0))
    if ok:
        with contextlib.suppress(ImageDecodeError, NoKeypointsError):
            search_image(searcher, png.tobytes(), 10)
