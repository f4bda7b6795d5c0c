"""Ranking against one index snapshot: image bytes -> features -> vector -> embedding -> FAISS
shortlist -> geometric verification -> ranked hits.

A Searcher is built from a loaded index version (preset conf, fitted vectorizer, encoder and
verification keypoints are stored with it), so a query goes through exactly what the map images went
through. It never changes: online changes (retrieval/replay.py) make a new one, so a request keeps a
consistent view while another thread swaps in the next.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.clock import StageClock
from common.presets import verify_features_conf
from common.threads import kernels_for_this_thread
from dataset.layout import Location
from dataset.relevance import heading_diff
from features.extract import query_features
from features.orb import OrbFeatures
from indexer.kinds import PQIndex
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

    offset: int = 0  # bytes of the log file `log_id` read
    seq: int = 0  # last change applied or folded into the version: later ones are replayed
    max_id: int = -1  # highest image id ever seen, in the family or the log: never given out again
    log_id: int | None = None  # inode of the log file read (a rewritten log is another file)
    seq_floor: int = 0  # highest change number the family ever gave out (versions, log base)
    bad_lines: int = 0  # corrupt log lines skipped


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
        if applied is None:
            folded = int(loaded.manifest.get("changes_seq", 0))
            max_id = max([int(loaded.manifest.get("max_id", -1)), *loaded.images], default=-1)
            applied = Applied(seq=folded, max_id=max_id, seq_floor=folded)
        self.applied = applied
        self._verify_conf = verify_features_conf(self.conf) if self.verifier is not None else None
        # [a, b] of P(best hit shows the place) = sigmoid(a * logit(score) + b), fitted at index time
        # (retrieval/heads.py); None: the best score itself.
        self.location_head: list[float] | None = loaded.manifest.get("location_head")

    def on_demand_files(self) -> list[Path]:
        """The files whose rows a query reads from disk: a pq-fastscan index's float vectors (the exact
        re-rank) and the verification keypoints."""
        files = self.index.on_demand_files() if isinstance(self.index, PQIndex) else []
        return files + (self.verifier.store.on_demand_files() if self.verifier is not None else [])

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
        return self._hits(*self._nearest(emb, k))

    def _nearest(self, emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, distances, scores) of the k nearest in this process's index, as arrays."""
        d2, ids = self.index.search(emb, k)
        found = ids[0] >= 0
        dist = np.sqrt(np.maximum(d2[0][found], 0.0)).astype(np.float64)  # as the hits' Python floats
        return ids[0][found], dist, self.encoder.score(dist)

    def _hits(self, ids: np.ndarray, dist: np.ndarray, scores: np.ndarray, first: int = 1) -> list[Hit]:
        # Python numbers first: numpy scalars cost more, hit by hit.
        hits = []
        for rank, (i, d, s) in enumerate(zip(ids.tolist(), dist.tolist(), scores.tolist(), strict=True), start=first):
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
        depth = min(max(k, n, int(spec["pool"]) if spec else 0), self.size)
        if self.shards is not None:
            pool = self.shards.search(self.version, query.embedding, depth) if depth > 0 else []
            ids = np.array([h.id for h in pool], np.int64)
            dist = np.array([h.distance for h in pool], np.float64)
        else:
            # Arrays, not hits: of the expansion pool (200) only the verified head and what the answer
            # or the expansion takes are made into hits.
            none = (np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
            ids, dist, pool_scores = self._nearest(query.embedding, depth) if depth > 0 else none
        clock.lap("search")
        head = ids[:n].tolist()
        inliers = self.inliers(query, head)
        scores = self.verifier.score(dist[:n], inliers)
        order = np.argsort(-scores, kind="stable")
        verified = []
        for i in order.tolist():
            rec = self.images[head[i]]
            verified.append(Hit(0, rec.id, rec.path, float(scores[i]), float(dist[i]), rec.loc, int(inliers[i])))
        # The tail (unverified, in first-stage order): all of it where the place is expanded, else
        # what the answer needs after the verified block.
        expanding = spec is not None and found_place(verified, spec)
        tail_end = len(ids) if expanding else n + max(0, k - len(verified))
        if self.shards is not None:
            tail = pool[n:tail_end]
        else:
            tail = self._hits(ids[n:tail_end], dist[n:tail_end], pool_scores[n:tail_end], first=n + 1)
        if expanding:
            verified, tail = expand_place(verified, tail, spec, self.verifier.expand_prior)
        clock.lap("verify")  # the expansion with it: it re-ranks by what verification found
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
