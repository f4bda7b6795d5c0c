"""The query pipeline: image bytes -> features -> vector -> embedding -> index -> ranked hits.

It is rebuilt from the index version (preset conf, fitted vectorizer and encoder are stored with the
index), so a query goes through exactly what the map images went through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from features.extract import image_to_features
from features.orb import OrbFeatures
from indexer.store import ImageRecord, LoadedIndex


@dataclass(frozen=True)
class Hit:
    rank: int
    id: int
    path: str
    score: float  # predicted relevance in [0, 1]
    distance: float  # Euclidean distance of the embeddings
    loc: tuple[float, float, float]


@dataclass(frozen=True)
class Query:
    features: OrbFeatures
    embedding: np.ndarray  # (1, dim)


class Searcher:
    def __init__(self, loaded: LoadedIndex) -> None:
        self.loaded = loaded
        self.conf: dict[str, Any] = loaded.manifest["conf"]
        self.vectorizer = loaded.vectorizer
        self.encoder = loaded.encoder
        self.index = loaded.index
        self.images: dict[int, ImageRecord] = loaded.images

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def analyze(self, data: bytes) -> Query:
        """Features and embedding of image bytes; raises ImageDecodeError / NoKeypointsError."""
        features = image_to_features(data, self.conf)
        return Query(features, self.encoder.embed(self.vectorizer(features)[None, :]))

    def embed(self, data: bytes) -> np.ndarray:
        return self.analyze(data).embedding

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

    def rank(self, query: Query, k: int) -> list[Hit]:
        return self.search_embedding(query.embedding, k)

    def search(self, data: bytes, k: int) -> list[Hit]:
        return self.rank(self.analyze(data), k)

    def score_all(self, query: Query) -> np.ndarray:
        """Predicted relevance of the query to every map image, indexed by id (rows of database.json)."""
        hits = self.search_embedding(query.embedding, self.size)
        out = np.zeros(max(self.images) + 1, dtype=np.float32)
        out[[h.id for h in hits]] = [h.score for h in hits]
        return out
