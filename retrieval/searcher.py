"""Ranking against one index snapshot: image bytes -> features -> vector -> embedding -> FAISS
shortlist -> geometric verification -> ranked hits.

A Searcher is built from a loaded index version (typed pipeline, fitted vectorizer, encoder and
verification keypoints are stored with it), so a query goes through exactly what the map images went
through. It never changes: online changes (retrieval/replay.py) make a new one, so a request keeps a
consistent view while another thread swaps in the next.

The first stage and the verification run on a Backend: the index this process loaded (LocalBackend),
or, for the head of a sharded index, its shards (retrieval/shards.py: ShardedBackend). The ranking
around them is the same code for both, so a sharded service ranks exactly as a whole index.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np

from common.clock import StageClock
from common.pipeline import ExpandConf, Pipeline
from common.threads import kernels_for_this_thread
from dataset.layout import Location
from dataset.relevance import heading_diff
from features.extract import query_features
from features.orb import OrbFeatures
from indexer.kinds import PartsIndex, PQIndex, vectors_of
from indexer.store import ImageRecord, LoadedIndex
from model.verify import Evidence, distinct_inliers
from retrieval.prior import Prior, fuse, fuse_verified
from retrieval.spatial import Places


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

    offset: int = 0  # bytes of the log file `log_id` read
    seq: int = 0  # last change applied or folded into the version: later ones are replayed
    max_id: int = -1  # highest image id ever seen, in the family or the log: never given out again
    log_id: int | None = None  # inode of the log file read (a rewritten log is another file)
    seq_floor: int = 0  # highest change number the family ever gave out (versions, log base)
    bad_lines: int = 0  # corrupt log lines skipped


class Candidates(Protocol):
    """A first stage's nearest map images, nearest first: ids and distances as arrays (what
    verification reads), hits made only of the positions an answer takes."""

    @property
    def ids(self) -> np.ndarray:
        """(n,) int64 image ids."""
        ...

    @property
    def distances(self) -> np.ndarray:
        """(n,) float64 Euclidean distances of the embeddings."""
        ...

    def hits(self, start: int, stop: int) -> list[Hit]:
        """The hits at positions [start, stop) (fewer past the end), ranked from start + 1."""
        ...


class Backend(Protocol):
    """What a Searcher's queries run on: the index this process loaded (LocalBackend), or the shards of
    a sharded index (retrieval/shards.py: ShardedBackend)."""

    @property
    def size(self) -> int:
        """How many map images are served."""
        ...

    def nearest(self, embedding: np.ndarray, k: int) -> Candidates:
        """The k (>= 1) nearest map images to the (1, dim) embedding."""
        ...

    def inliers(self, q: OrbFeatures, q_words: np.ndarray, ids: list[int]) -> np.ndarray:
        """Verification inliers of the query's keypoints with each of the map images `ids`."""
        ...

    def distances(self, embedding: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(len(ids),) Euclidean distances of the (1, dim) embedding to the map images `ids`."""
        ...

    def evidence(self, q: OrbFeatures, q_words: np.ndarray, ids: list[int]) -> list[Evidence]:
        """The inlier matches and transform behind inliers() of each map image `ids`."""
        ...

    def on_demand_files(self) -> list[Path]:
        """The files whose rows a query reads from disk in this process."""
        ...


class ShardClient(Protocol):
    """How the head of a sharded index reaches its shards (retrieval/shards.py in one process,
    cluster/serving.py on a Ray cluster)."""

    def backend(self, head: LoadedIndex) -> Backend:
        """The shards as the backend of the head's searcher of `head` (they answer from its version)."""
        ...

    def deadline(self) -> AbstractContextManager[None]:
        """One search's time for all its shard calls, retries included: entered around a search."""
        ...


@dataclass(frozen=True)
class LocalCandidates:
    """Candidates from an index in this process: arrays, made into hits only where an answer takes
    them (of the expansion pool of 200, the verified head and what the answer or expansion takes)."""

    ids: np.ndarray
    distances: np.ndarray
    scores: np.ndarray  # the encoder's relevance of each distance
    images: dict[int, ImageRecord]

    def hits(self, start: int, stop: int) -> list[Hit]:
        ids, dist, scores = self.ids[start:stop], self.distances[start:stop], self.scores[start:stop]
        # Python numbers first: numpy scalars cost more, hit by hit.
        out = []
        for rank, (i, d, s) in enumerate(zip(ids.tolist(), dist.tolist(), scores.tolist(), strict=True), start + 1):
            rec = self.images[i]
            out.append(Hit(rank, rec.id, rec.path, s, d, rec.loc))
        return out


def embedding_distances(embedding: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Euclidean distances of one (1, dim) embedding to each row of `vectors`, in float32 as FAISS's
    flat index computes them (equal to its distances to float rounding)."""
    x = np.asarray(embedding, np.float32).reshape(1, -1)
    d2 = ((np.asarray(vectors, np.float32) - x) ** 2).sum(axis=1, dtype=np.float32)
    out: np.ndarray = np.sqrt(np.maximum(d2, 0.0)).astype(np.float64)
    return out


NO_CANDIDATES = LocalCandidates(np.zeros(0, np.int64), np.zeros(0), np.zeros(0), {})


class LocalBackend:
    """The index and verification keypoints this process loaded: all of a version, or one shard."""

    def __init__(self, loaded: LoadedIndex) -> None:
        if loaded.part.head:
            raise ValueError("the head of a sharded index searches through its shards: give a ShardClient")
        self.index = loaded.index
        self.encoder = loaded.encoder
        self.verifier = loaded.verifier
        self.images = loaded.images

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def nearest(self, embedding: np.ndarray, k: int) -> LocalCandidates:
        d2, ids = self.index.search(embedding, k)
        found = ids[0] >= 0
        dist = np.sqrt(np.maximum(d2[0][found], 0.0)).astype(np.float64)  # as the hits' Python floats
        return LocalCandidates(ids[0][found], dist, self.encoder.score(dist), self.images)

    def inliers(self, q: OrbFeatures, q_words: np.ndarray, ids: list[int]) -> np.ndarray:
        assert self.verifier is not None
        return self.verifier.inliers(q, q_words, ids)

    def distances(self, embedding: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return embedding_distances(embedding, vectors_of(self.index, ids))

    def evidence(self, q: OrbFeatures, q_words: np.ndarray, ids: list[int]) -> list[Evidence]:
        assert self.verifier is not None
        return self.verifier.evidence(q, q_words, ids)

    def on_demand_files(self) -> list[Path]:
        """A pq-fastscan index's float vectors (the exact re-rank) and the verification keypoints."""
        files = self.index.on_demand_files() if isinstance(self.index, PQIndex | PartsIndex) else []
        return files + (self.verifier.store.on_demand_files() if self.verifier is not None else [])


class Searcher:
    def __init__(
        self,
        loaded: LoadedIndex,
        applied: Applied | None = None,
        shards: ShardClient | None = None,
        places: Places | None = None,
    ) -> None:
        self.loaded = loaded
        # Kept for the searchers made from this one (retrieval/replay.py) and for the service, which
        # gives a head (waiting on its shards) no search slot.
        self.shards = shards
        self.backend: Backend = LocalBackend(loaded) if shards is None else shards.backend(loaded)
        self.pipeline: Pipeline = loaded.pipeline
        self.vectorizer = loaded.vectorizer
        self.encoder = loaded.encoder
        self.verifier = loaded.verifier
        self.index = loaded.index
        self.images: dict[int, ImageRecord] = loaded.images
        if applied is None:
            folded = int(loaded.manifest.get("changes_seq", 0))
            max_id = max([int(loaded.manifest.get("max_id", -1)), *loaded.images], default=-1)
            applied = Applied(seq=folded, max_id=max_id, seq_floor=folded)
        self.applied = applied
        self._verify_features = self.pipeline.verify_features if self.verifier is not None else None
        # [a, b] of P(best hit shows the place) = sigmoid(a * logit(score) + b), fitted at index time
        # (retrieval/heads.py); None: the best score itself.
        self.location_head: list[float] | None = loaded.manifest.get("location_head")
        # With a position prior: the fusion heads (retrieval/prior.py) and the location head of fused
        # scores; and [a, c, b] of P(heading right) (retrieval/locate.py). None: not fitted.
        prior_heads = loaded.manifest.get("prior_heads") or {}
        self.prior_first_head: list[float] | None = prior_heads.get("first")
        self.prior_verified_head: list[float] | None = prior_heads.get("verified")
        self.prior_location_head: list[float] | None = prior_heads.get("location")
        self.heading_head: list[float] | None = loaded.manifest.get("heading_head")
        self._places = places

    @cached_property
    def places(self) -> Places:
        """Where every map image stands (a prior search's candidates): sorted on first use, or the
        searcher this one was changed from gave its own with the changes applied."""
        return self._places if self._places is not None else Places.of(self.images)

    def places_if_built(self) -> Places | None:
        """The spatial index if a prior search already built it (a changed searcher then extends it)."""
        return self.__dict__.get("places")

    def on_demand_files(self) -> list[Path]:
        """The files whose rows a query reads from disk (for the read-ahead before a version serves)."""
        return self.backend.on_demand_files()

    @property
    def size(self) -> int:
        return self.backend.size

    @property
    def preset(self) -> str:
        return self.pipeline.name

    @property
    def version(self) -> str:
        return self.loaded.version

    def analyze(self, data: bytes, timings: dict[str, float] | None = None) -> Query:
        """Features and embedding of image bytes; raises ImageDecodeError / NoKeypointsError.
        `timings`, if given, receives each stage's seconds (decode, features, encode)."""
        kernels_for_this_thread()  # the service calls this from its request thread pool
        clock = StageClock(timings)
        qf = query_features(data, self.pipeline.features, self._verify_features, clock)
        embedding = self.encoder.embed(self.vectorizer(qf.features)[None, :])
        words = None
        if qf.verify is not None and self.verifier is not None:
            words = self.vectorizer.words(qf.verify.descriptors, self.verifier.conf.query_words)
        clock.lap("encode")
        return Query(qf.features, embedding, qf.verify, words)

    def search_embedding(self, emb: np.ndarray, k: int) -> list[Hit]:
        k = min(k, self.size)
        if k <= 0:
            return []
        return self.backend.nearest(emb, k).hits(0, k)

    def rank(self, query: Query, k: int, timings: dict[str, float] | None = None, expand: bool = True) -> list[Hit]:
        """The top k map images; with verification, the first `verify.n` of the shortlist are
        re-ranked by a score that folds their RANSAC inliers into the embedding distance, then (if the
        preset expands and `expand`) the place of a strongly verified top hit is expanded."""
        clock = StageClock(timings)
        if self.verifier is None or query.verify_features is None:
            hits = self.search_embedding(query.embedding, k)
            clock.lap("search")
            return hits
        n = self.verifier.conf.n
        spec = self.verifier.expand if expand and self.verifier.expand_prior > 0 else None
        depth = min(max(k, n, spec.pool if spec else 0), self.size)
        pool = self.backend.nearest(query.embedding, depth) if depth > 0 else NO_CANDIDATES
        clock.lap("search")
        head = pool.ids[:n].tolist()
        inliers, weight = self.verified(query, head)
        dist = pool.distances
        scores = self.verifier.score(dist[:n], weight)
        order = np.argsort(-scores, kind="stable")
        verified = []
        for i in order.tolist():
            rec = self.images[head[i]]
            verified.append(Hit(0, rec.id, rec.path, float(scores[i]), float(dist[i]), rec.loc, int(inliers[i])))
        # The tail (unverified, in first-stage order): all of it where the place is expanded, else
        # what the answer needs after the verified block.
        expanding = spec is not None and found_place(verified, spec)
        tail_end = len(pool.ids) if expanding else n + max(0, k - len(verified))
        tail = pool.hits(n, tail_end)
        if expanding and spec is not None:  # expanding implies a spec; said again for the type checker
            verified, tail = expand_place(verified, tail, spec, self.verifier.expand_prior)
        clock.lap("verify")  # the expansion with it: it re-ranks by what verification found
        return [
            Hit(r, h.id, h.path, h.score, h.distance, h.location, h.inliers)
            for r, h in enumerate((verified + tail)[:k], start=1)
        ]

    def inliers(self, query: Query, ids: list[int]) -> np.ndarray:
        """Verification inliers of the query with the map images `ids` (here or on their shards)."""
        assert self.verifier is not None and query.verify_features is not None and query.verify_words is not None
        return self.backend.inliers(query.verify_features, query.verify_words, ids)

    def verified(self, query: Query, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The inliers of the query with the map images `ids`, and what the heads weigh of them: the
        same count, or with `verify.distinct_m` each inlier weighed by how distinctive its query
        keypoint is among these images (model/verify.py: distinct_inliers)."""
        assert self.verifier is not None and query.verify_features is not None and query.verify_words is not None
        far_m = self.verifier.conf.distinct_m
        if far_m is None:
            inliers = self.inliers(query, ids)
            return inliers, inliers.astype(np.float64)
        found = self.backend.evidence(query.verify_features, query.verify_words, ids)
        where = np.array([[self.images[i].loc.easting, self.images[i].loc.northing] for i in ids]).reshape(-1, 2)
        return np.array([len(e.query_xy) for e in found], np.int64), distinct_inliers(found, where, far_m)

    def evidence(self, query: Query, ids: list[int]) -> list[Evidence]:
        """The inlier matches and transform of the query with each map image `ids` (what verified it)."""
        if self.verifier is None or query.verify_features is None or query.verify_words is None or not ids:
            return []
        return self.backend.evidence(query.verify_features, query.verify_words, ids)

    def rank_near(
        self, query: Query, prior: Prior, k: int, timings: dict[str, float] | None = None
    ) -> tuple[list[Hit], int]:
        """The top k of the map images within the prior's radius, and how many stood there. Every one
        is scored by the first stage (its embedding distance, wherever it ranks globally) fused with
        its distance to the fix; the best `verify.n` by that are verified and ranked, ahead of the
        rest, by their embedding distance, inliers and distance to the fix, as the verified prior
        head weighs them (retrieval/prior.py: fuse_verified)."""
        clock = StageClock(timings)
        ids, fix_m = self.places.within(prior.easting, prior.northing, prior.radius_m)
        if len(ids) == 0:
            clock.lap("search")
            return [], 0
        dist = self.backend.distances(query.embedding, ids)
        penalty = prior.penalty(fix_m)
        first = fuse(self.encoder.score(dist), penalty, self.prior_first_head)
        order = np.lexsort((ids, -first))  # best fused first; ties by id, as the first stage ranks
        clock.lap("search")
        if self.verifier is None or query.verify_features is None:
            top = order[:k].tolist()
            return self._hits(ids[top], first[top], dist[top]), len(ids)
        n = self.verifier.conf.n
        head, rest = order[:n], order[n : n + max(0, k - min(n, len(order)))]
        inliers, weight = self.verified(query, ids[head].tolist())
        visual = self.verifier.score(dist[head], weight)
        verified = fuse_verified(dist[head], weight, penalty[head], self.prior_verified_head, visual)
        by = np.lexsort((ids[head], -verified))
        hits = self._hits(ids[head][by], verified[by], dist[head][by], inliers[by])
        hits += self._hits(ids[rest], first[rest], dist[rest], start=len(hits) + 1)
        clock.lap("verify")
        return hits[:k], len(ids)

    def _hits(
        self,
        ids: np.ndarray,
        scores: np.ndarray,
        dist: np.ndarray,
        inliers: np.ndarray | None = None,
        start: int = 1,
    ) -> list[Hit]:
        inl = [None] * len(ids) if inliers is None else [int(v) for v in inliers.tolist()]
        out = []
        for r, (i, s, d, n) in enumerate(zip(ids.tolist(), scores.tolist(), dist.tolist(), inl, strict=True), start):
            rec = self.images[i]
            out.append(Hit(r, rec.id, rec.path, s, d, rec.loc, n))
        return out

    def score_all(self, query: Query) -> np.ndarray:
        """Embedding-based relevance of the query to every map image, indexed by id."""
        hits = self.search_embedding(query.embedding, self.size)
        out = np.zeros(max(self.images) + 1, dtype=np.float32)
        out[[h.id for h in hits]] = [h.score for h in hits]
        return out


def expand_place(verified: list[Hit], tail: list[Hit], spec: ExpandConf, prior: float) -> tuple[list[Hit], list[Hit]]:
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


def found_place(verified: list[Hit], spec: ExpandConf) -> bool:
    """Whether the best verified hit has the inliers that say the place is found."""
    return bool(verified) and (verified[0].inliers or 0) >= spec.min_inliers


def at_place(h: Hit, top: Hit, spec: ExpandConf) -> bool:
    """Whether hit h stands within radius_m of the top hit and looks within heading_deg of it."""
    dist = float(np.hypot(h.location.easting - top.location.easting, h.location.northing - top.location.northing))
    turn = float(heading_diff(h.location.heading, top.location.heading))
    return dist < spec.radius_m and turn < spec.heading_deg
