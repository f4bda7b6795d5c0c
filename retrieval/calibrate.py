"""Fitted through the query path on validation queries: the verification head, relevance =
sigmoid(w . [distance, log1p(inliers)] + b), by logistic regression on the verified shortlists; and
the prior of the verified spatial expansion."""

from __future__ import annotations

import numpy as np

from dataset.layout import Dataset
from features.decode import ImageDecodeError
from features.orb import NoKeypointsError
from model.calibrate import fit_logistic
from retrieval.searcher import Searcher, at_place, found_place


def fit_verify_head(searcher: Searcher, dataset: Dataset, rows: np.ndarray) -> list[float]:
    """Weights for [distance, log1p(inliers), 1] from the queries at `rows` (with ground truth)."""
    if searcher.verifier is None or dataset.sim is None:
        raise ValueError("fitting the verification head needs a verifying index and ground truth")
    feats, labels = [], []
    n = int(searcher.verifier.conf["n"])
    for q in rows:
        try:
            query = searcher.analyze(dataset.image_path(dataset.queries.paths[q]).read_bytes())
        except (ImageDecodeError, NoKeypointsError):
            continue  # nothing to learn from this query
        hits = searcher.search_embedding(query.embedding, n)
        ids = [h.id for h in hits]
        inl = searcher.verifier.inliers(query.verify_features, query.verify_words, ids)
        feats.append(np.column_stack([[h.distance for h in hits], np.log1p(inl)]))
        labels.append(dataset.sim[q, ids])
    w = fit_logistic(np.concatenate(feats), np.concatenate(labels).astype(np.float64))
    return [float(v) for v in w]


def fit_expand_prior(searcher: Searcher, dataset: Dataset, rows: np.ndarray) -> float:
    """The share of relevant map images among those the expansion would lift (near a top hit with
    enough inliers), over the queries at `rows`, with add-one smoothing; the verifier's head must be
    fitted first (the top hit depends on it)."""
    spec = None if searcher.verifier is None else searcher.verifier.conf.get("expand")
    if spec is None or dataset.sim is None:
        raise ValueError("fitting the expansion prior needs a preset that expands and ground truth")
    relevant = lifted = 0
    for q in rows:
        try:
            query = searcher.analyze(dataset.image_path(dataset.queries.paths[q]).read_bytes())
        except (ImageDecodeError, NoKeypointsError):
            continue
        hits = searcher.rank(query, int(spec["pool"]), expand=False)
        if not found_place([h for h in hits if h.inliers is not None], spec):
            continue
        ids = [h.id for h in hits[1:] if at_place(h, hits[0], spec)]
        relevant += int(dataset.sim[q, ids].sum())
        lifted += len(ids)
    return (relevant + 1) / (lifted + 2)
