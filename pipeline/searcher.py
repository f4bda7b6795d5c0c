"""The query pipeline: image bytes -> features -> vector -> embedding -> index -> verified, ranked hits.

It is rebuilt from the index version (preset conf, fitted vectorizer, encoder and verification
keypoints are stored with the index), so a query goes through exactly what the map images went through.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from features.decode import ImageDecodeError, decode_image
from features.orb import NoKeypointsError, OrbFeatures, extract_orb
from indexer.store import ImageRecord, LoadedIndex
from pipeline.presets import verify_features_conf


class _Clock:
    """Adds the seconds since the previous lap to timings[name] (a no-op without a dict)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[name] = self.timings.get(name, 0.0) + now - self.t
            self.t = now


@dataclass(frozen=True)
class Hit:
    rank: int
    id: int
    path: str
    score: float  # predicted relevance in [0, 1]
    distance: float  # Euclidean distance of the embeddings
    loc: tuple[float, float, float]
    inliers: int | None = None  # RANSAC inliers with the query, when the hit was verified


@dataclass(frozen=True)
class Query:
    features: OrbFeatures
    embedding: np.ndarray  # (1, dim)
    verify_features: OrbFeatures | None = None
    verify_words: np.ndarray | None = None


class Searcher:
    def __init__(self, loaded: LoadedIndex) -> None:
        self.loaded = loaded
        self.conf: dict[str, Any] = loaded.manifest["conf"]
        self.vectorizer = loaded.vectorizer
        self.encoder = loaded.encoder
        self.verifier = loaded.verifier
        self.index = loaded.index
        self.images: dict[int, ImageRecord] = loaded.images

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def analyze(self, data: bytes, timings: dict[str, float] | None = None) -> Query:
        """Features and embedding of image bytes; raises ImageDecodeError / NoKeypointsError.
        `timings`, if given, receives each stage's seconds."""
        clock = _Clock(timings)
        gray = decode_image(data, self.conf["image"]["max_side"])
        clock.lap("decode")
        features = extract_orb(gray, self.conf["features"])
        vf = None if self.verifier is None else extract_orb(gray, verify_features_conf(self.conf)["features"])
        clock.lap("features")
        embedding = self.encoder.embed(self.vectorizer(features)[None, :])
        words = None if vf is None else self.vectorizer.words(vf.descriptors)
        clock.lap("encode")
        return Query(features, embedding, vf, words)

    def warm_up(self) -> None:
        """One search on a generated image, so the first user request does not pay for lazy set-up
        (BLAS and OpenCV thread pools, first-touch of the index pages)."""
        import cv2

        noise = np.random.default_rng(0).integers(0, 256, (256, 341), dtype=np.uint8)
        ok, png = cv2.imencode(".png", cv2.GaussianBlur(noise, (3, 3), 0))
        if ok:
            with contextlib.suppress(ImageDecodeError, NoKeypointsError):
                self.search(png.tobytes(), 10)

    def search_embedding(self, emb: np.ndarray, k: int) -> list[Hit]:
        k = min(k, self.size)
        if k <= 0:
            return []
        d2, ids = self.index.search(emb, k)
        dist = np.sqrt(np.maximum(d2[0], 0.0))
        scores = self.encoder.score(dist)
        hits = []
        for rank, (i, d, s) in enumerate(zip(ids[0], dist, scores, strict=True), start=1):
            if i < 0:
                break
            rec = self.images[int(i)]
            hits.append(Hit(rank, rec.id, rec.path, float(s), float(d), rec.loc))
        return hits

    def rank(self, query: Query, k: int, timings: dict[str, float] | None = None) -> list[Hit]:
        """The top k map images; with verification, the first `verify.n` of the shortlist are
        re-ranked by a score that folds their RANSAC inliers into the embedding distance."""
        clock = _Clock(timings)
        if self.verifier is None or query.verify_features is None:
            hits = self.search_embedding(query.embedding, k)
            clock.lap("search")
            return hits
        n = int(self.verifier.conf["n"])
        hits = self.search_embedding(query.embedding, max(k, n))
        clock.lap("search")
        head, tail = hits[:n], hits[n:]
        inliers = self.verifier.inliers(query.verify_features, query.verify_words, [h.id for h in head])
        scores = self.verifier.score(np.array([h.distance for h in head]), inliers)
        order = np.argsort(-scores, kind="stable")
        clock.lap("verify")
        verified = [
            Hit(0, head[i].id, head[i].path, float(scores[i]), head[i].distance, head[i].loc, int(inliers[i]))
            for i in order
        ]
        return [
            Hit(r, h.id, h.path, h.score, h.distance, h.loc, h.inliers)
            for r, h in enumerate((verified + tail)[:k], start=1)
        ]

    def search(self, data: bytes, k: int) -> list[Hit]:
        return self.rank(self.analyze(data), k)

    def score_all(self, query: Query) -> np.ndarray:
        """Embedding-based relevance of the query to every map image, indexed by id."""
        hits = self.search_embedding(query.embedding, self.size)
        out = np.zeros(max(self.images) + 1, dtype=np.float32)
        out[[h.id for h in hits]] = [h.score for h in hits]
        return out
