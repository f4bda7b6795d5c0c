"""Fitted through the query path on validation queries: the verification head, relevance =
sigmoid(w . [distance, log1p(inliers)] + b), by logistic regression on the verified shortlists; the
prior of the verified spatial expansion; and the location head, P(the best hit shows the place)."""

from __future__ import annotations

import numpy as np

from dataset.layout import Dataset
from features.decode import ImageDecodeError
from features.orb import NoKeypointsError
from model.score_head import fit_logistic
from retrieval.locate import best_hit
from retrieval.searcher import Query, Searcher, at_place, found_place

Analysed = list[tuple[int, Query]]  # query rows and their features and embedding


def analyse_queries(searcher: Searcher, dataset: Dataset, rows: np.ndarray) -> Analysed:
    """The queries at `rows` through features and embedding, once for all the fits below (which do
    not change them: the heads act after the embedding). A photo the pipeline refuses teaches nothing
    and is left out."""
    out = []
    for q in rows:
        try:
            out.append((int(q), searcher.analyze(dataset.image_path(dataset.queries.paths[q]).read_bytes())))
        except (ImageDecodeError, NoKeypointsError):
            continue
    return out


def fit_verify_head(searcher: Searcher, dataset: Dataset, queries: Analysed) -> list[float]:
    """Weights for [distance, log1p(inliers), 1] from the analysed `queries` (with ground truth)."""
    if searcher.verifier is None or dataset.sim is None:
        raise ValueError("fitting the verification head needs a verifying index and ground truth")
    feats, labels = [], []
    n = searcher.verifier.conf.n
    for q, query in queries:
        hits = searcher.search_embedding(query.embedding, n)
        ids = [h.id for h in hits]
        assert query.verify_features is not None and query.verify_words is not None  # a verifying searcher's query
        inl = searcher.verifier.inliers(query.verify_features, query.verify_words, ids)
        feats.append(np.column_stack([[h.distance for h in hits], np.log1p(inl)]))
        labels.append(dataset.sim[q, ids])
    return monotone_head(np.concatenate(feats), np.concatenate(labels).astype(np.float64))


def monotone_head(x: np.ndarray, y: np.ndarray, l2: float = 1.0) -> list[float]:
    """Logistic weights for [distance, log1p(inliers), 1] in which a nearer map image with more inliers
    never scores lower. Shortlists that a few features separate perfectly (small or easy data) drive
    unregularised weights to any sign and size; there the feature whose weight came out backwards
    is left out and the other refitted."""
    w = fit_logistic(x, y, l2=l2)
    if w[0] <= 0 and w[1] >= 0:
        return [float(v) for v in w]
    if w[1] >= 0:  # distance counted against: inliers alone
        _, wi, b = fit_logistic(np.column_stack([np.zeros(len(x)), x[:, 1]]), y, l2=l2)
        return [0.0, float(max(wi, 0.0)), float(b)]
    wd, _, b = fit_logistic(np.column_stack([x[:, 0], np.zeros(len(x))]), y, l2=l2)
    return [float(min(wd, 0.0)), 0.0, float(b)]


def fit_expand_prior(searcher: Searcher, dataset: Dataset, queries: Analysed) -> float:
    """The share of relevant map images among those the expansion would lift (near a top hit with
    enough inliers), over the analysed `queries`, with add-one smoothing; the verifier's head must be
    fitted first (the top hit depends on it)."""
    spec = None if searcher.verifier is None else searcher.verifier.expand
    if spec is None or dataset.sim is None:
        raise ValueError("fitting the expansion prior needs a preset that expands and ground truth")
    relevant = lifted = 0
    for q, query in queries:
        hits = searcher.rank(query, spec.pool, expand=False)
        if not found_place([h for h in hits if h.inliers is not None], spec):
            continue
        ids = [h.id for h in hits[1:] if at_place(h, hits[0], spec)]
        relevant += int(dataset.sim[q, ids].sum())
        lifted += len(ids)
    return (relevant + 1) / (lifted + 2)


def fit_location_head(searcher: Searcher, dataset: Dataset, queries: Analysed, top: int = 10) -> list[float]:
    """[a, b] of P(the best hit shows the place) = sigmoid(a * logit(its score) + b), by logistic
    regression over the analysed `queries` (ground truth: the best hit is relevant); a >= 0, so a higher
    score never means less confidence. The other heads must be fitted first (they make the scores)."""
    if dataset.sim is None:
        raise ValueError("fitting the location head needs ground truth")
    logits, labels = [], []
    for q, query in queries:
        best = best_hit(searcher.rank(query, top), top)
        if best is None:
            continue
        s = min(max(best.score, 1e-9), 1.0 - 1e-9)
        logits.append(np.log(s / (1.0 - s)))
        labels.append(float(dataset.sim[q, best.id]))
    if len(set(labels)) < 2:  # all right or all wrong: nothing to calibrate, keep the scores
        return [1.0, 0.0]
    a, b = fit_logistic(np.array(logits), np.array(labels), l2=1.0)
    return [float(max(a, 0.0)), float(b)]
