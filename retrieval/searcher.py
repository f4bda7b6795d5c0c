"""Ranking against one index snapshot: image bytes -> features -> vector -> embedding -> FAISS
shortlist -> geometric verification -> ranked hits.

A Searcher is built from a loaded index version (preset conf, fitted vectorizer, encoder and
verification keypoints are stored with it), so a query goes through exactly what the map images went
through. It never changes: online changes (retrieval/replay.py) make a new one, so a request keeps a
consistent view while another thread swaps in the next.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from common.clock import StageClock
from common.presets import verify_features_conf
from common.threads import kernels_for_this_thread
from dataset.layout import Location
from dataset.relevance import heading_diff
from features.extract import query_features
from features.orb import OrbFeatures
from indexer.store import ImageRecord, LoadedIndex


@dataclass(frozen=True)
class Hit:
    rank: int
    id: int
    path: str
    score: float  # predicted relevance in [0, 1]
    distance: float  # Euclidean distance of the embeddings
    location: Location
    inliers: int | None = None  # RANSAC inliers with the query, when the hit was verified


@dataclass(frozen=True)
class Query:
    features: OrbFeatures
    embedding: np.ndarray  # (1, dim)
    verify_features: OrbFeatures | None = None
    verify_words: np.ndarray | None = None


@dataclass(frozen=True)
class Applied:
    """How far into its family's change log (indexer/changes.py) a searcher is."""

    offset: int = 0  # bytes of the log read
    seq: int = 0  # last change seen
    max_id: int = -1  # highest image id ever seen, in the version or the log: never given out again


class ShardClient(Protocol):
    """The shards of a sharded index as its head sees them (retrieval/shards.py in one process,
    cluster/serving.py on a Ray cluster). `version` is the head's: a shard answers from that version."""

    def search(self, version: str, embedding: np.ndarray, k: int) -> list[Hit]:
        """The k nearest map images over all shards, ranked by distance."""
        ...

    def inliers(self, version: str, q: OrbFeatures, q_words: np.ndarray, ids: list[int]) -> np.ndarray:
        """Verification inliers of the query with each of `ids`, asked of the shards that own them."""
        ...


class Searcher:
    def __init__(self, loaded: LoadedIndex, applied: Applied | None = None, shards: ShardClient | None = None) -> None:
        if loaded.part.head and shards is None:
            raise ValueError("the head of a sharded index searches through its shards: give a ShardClient")
        self.loaded = loaded
        self.shards = shards
        self.conf: dict[str, Any] = loaded.manifest["conf"]
        self.vectorizer = loaded.vectorizer
        self.encoder = loaded.encoder
        self.verifier = loaded.verifier
        self.index = loaded.index
        self.images: dict[int, ImageRecord] = loaded.images
        self.applied = applied or Applied(max_id=max(loaded.images, default=-1))
        self._verify_conf = verify_features_conf(self.conf) if self.verifier is not None else None
        # [a, b] of P(best hit shows the place) = sigmoid(a * logit(score) + b), fitted at index time
        # (retrieval/calibrate.py); None: the best score itself.
        self.location_head: list[float] | None = loaded.manifest.get("location_head")

    @property
    def size(self) -> int:
        # The head holds no vectors, but the id map of every image (online changes included).
        return len(self.images) if self.shards is not None else int(self.index.ntotal)

    @property
    def preset(self) -> str:
        return str(self.conf["preset"])

    @property
    def version(self) -> str:
        return self.loaded.version

    def analyze(self, data: bytes, timings: dict[str, float] | None = None) -> Query:
        """Features and embedding of image bytes; raises ImageDecodeError / NoKeypointsError.
        `timings`, if given, receives each stage's seconds (decode, features, encode)."""
        kernels_for_this_thread()  # the service calls this from its request thread pool
        clock = StageClock(timings)
        qf = query_features(data, self.conf, self._verify_conf, clock)
        embedding = self.encoder.embed(self.vectorizer(qf.features)[None, :])
        words = None if qf.verify is None else self.vectorizer.words(qf.verify.descriptors)
        clock.lap("encode")
        return Query(qf.features, embedding, qf.verify, words)

    def search_embedding(self, emb: np.ndarray, k: int) -> list[Hit]:
        k = min(k, self.size)
        if k <= 0:
            return []
        if self.shards is not None:
            return self.shards.search(self.version, emb, k)
        d2, ids = self.index.search(emb, k)
        dist = np.sqrt(np.maximum(d2[0], 0.0))
        scores = self.encoder.score(dist)
        hits = []
        # Python numbers first: the pool of 200 is built hit by hit, and numpy scalars cost more.
        for rank, (i, d, s) in enumerate(zip(ids[0].tolist(), dist.tolist(), scores.tolist(), strict=True), start=1):
            if i < 0:
                break
            rec = self.images[i]
            hits.append(Hit(rank, rec.id, rec.path, s, d, rec.loc))
        return hits

    def rank(self, query: Query, k: int, timings: dict[str, float] | None = None, expand: bool = True) -> list[Hit]:
        """The top k map images; with verification, the first `verify.n` of the shortlist are
        re-ranked by a score that folds their RANSAC inliers into the embedding distance, then (if the
        preset expands and `expand`) the place of a strongly verified top hit is expanded."""
        clock = StageClock(timings)
        if self.verifier is None or query.verify_features is None:
            hits = self.search_embedding(query.embedding, k)
            clock.lap("search")
            return hits
        n = int(self.verifier.conf["n"])
        spec = self.verifier.conf.get("expand") if expand and self.verifier.expand_prior > 0 else None
        hits = self.search_embedding(query.embedding, max(k, n, int(spec["pool"]) if spec else 0))
        clock.lap("search")
        head, tail = hits[:n], hits[n:]
        inliers = self.inliers(query, [h.id for h in head])
        scores = self.verifier.score(np.array([h.distance for h in head]), inliers)
        order = np.argsort(-scores, kind="stable")
        clock.lap("verify")
        verified = [
            Hit(0, head[i].id, head[i].path, float(scores[i]), head[i].distance, head[i].location, int(inliers[i]))
            for i in order
        ]
        if spec:
            verified, tail = expand_place(verified, tail, spec, self.verifier.expand_prior)
        return [
            Hit(r, h.id, h.path, h.score, h.distance, h.location, h.inliers)
            for r, h in enumerate((verified + tail)[:k], start=1)
        ]

    def inliers(self, query: Query, ids: list[int]) -> np.ndarray:
        """Verification inliers of the query with the map images `ids` (here or on their shards)."""
        assert self.verifier is not None and query.verify_features is not None and query.verify_words is not None
        if self.shards is not None:
            return self.shards.inliers(self.version, query.verify_features, query.verify_words, ids)
        return self.verifier.inliers(query.verify_features, query.verify_words, ids)

    def score_all(self, query: Query) -> np.ndarray:
        """Embedding-based relevance of the query to every map image, indexed by id."""
        hits = self.search_embedding(query.embedding, self.size)
        out = np.zeros(max(self.images) + 1, dtype=np.float32)
        out[[h.id for h in hits]] = [h.score for h in hits]
        return out


def expand_place(
    verified: list[Hit], tail: list[Hit], spec: dict[str, Any], prior: float
) -> tuple[list[Hit], list[Hit]]:
    """Verified spatial expansion. When the best verified hit has at least `min_inliers`, its place
    is found: every other hit standing within `radius_m` of it and looking within `heading_deg` of its
    heading scores at least prior x its score (prior: the share of such neighbours that were relevant
    on validation queries), and those of `tail` (not verified) join the verified block, scoring no
    more than the top hit, which is sorted by score again. Returns the new (verified block, tail);
    ranks are set by the caller."""
    if not found_place(verified, spec):
        return verified, tail
    top = verified[0]
    floor = prior * top.score
    block = [replace(h, score=max(h.score, floor)) if at_place(h, top, spec) else h for h in verified[1:]]
    rest = []
    for h in tail:
        if at_place(h, top, spec):
            # An unverified hit's own score comes from the first stage's head, another scale: capped
            # at the top hit's, so the answer stays ordered by score.
            block.append(replace(h, score=min(max(h.score, floor), top.score)))
        else:
            rest.append(h)
    return [top, *sorted(block, key=lambda h: -h.score)], rest


def found_place(verified: list[Hit], spec: dict[str, Any]) -> bool:
    """Whether the best verified hit has the inliers that say the place is found."""
    return bool(verified) and (verified[0].inliers or 0) >= int(spec["min_inliers"])


def at_place(h: Hit, top: Hit, spec: dict[str, Any]) -> bool:
    """Whether hit h stands within radius_m of the top hit and looks within heading_deg of it."""
    dist = float(np.hypot(h.location.easting - top.location.easting, h.location.northing - top.location.northing))
    turn = float(heading_diff(h.location.heading, top.location.heading))
    return dist < float(spec["radius_m"]) and turn < float(spec["heading_deg"])
