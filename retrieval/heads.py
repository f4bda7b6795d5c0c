"""Fitted through the query path on the heads' queries (dataset/split.py fit_split): the verification
head, relevance = sigmoid(w . [distance, log1p(inliers)] + b), by logistic regression on the verified
shortlists; the prior of the verified spatial expansion; and the location head, P(the best hit shows
the place). `fit_heads` fits all three in order into a staged index."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dataset.layout import Dataset
from features.decode import ImageDecodeError
from features.orb import NoKeypointsError
from indexer.build import StagedIndex
from indexer.store import LoadedIndex
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
        inl = searcher.inliers(query, ids)
        feats.append(np.column_stack([[h.distance for h in hits], np.log1p(inl)]))
        labels.append(dataset.sim[q, ids].astype(np.float64))
    if searcher.verifier.conf.head == "listwise":
        return listwise_head(feats, labels)
    return monotone_head(np.concatenate(feats), np.concatenate(labels))


# The trade-offs tried by listwise_head: distance weight per unit of log(1 + inliers), and temperature.
LISTWISE_RATIOS = -np.geomspace(0.25, 128.0, 28)
LISTWISE_TEMPERATURES = np.geomspace(0.05, 20.0, 16)


def listwise_head(feats: list[np.ndarray], labels: list[np.ndarray]) -> list[float]:
    """Weights for [distance, log1p(inliers), 1] fitted to rank: the trade-off r (distance weight per
    unit of log inliers, <= 0) that makes a relevant candidate most likely first under a softmax over
    each query's shortlist (listwise likelihood, on the queries whose shortlist holds relevant and
    other candidates), searched on a grid; then the score r * distance + log1p(inliers) calibrated
    by logistic regression on every candidate. Logistic regression alone weighs each candidate
    alike, so it trades ranking within a query for calibration across queries. Falls back to
    monotone_head when no query's shortlist has both kinds."""
    useful = [i for i, y in enumerate(labels) if 0 < y.sum() < len(y)]
    if not useful:
        return monotone_head(np.concatenate(feats), np.concatenate(labels))
    width = max(len(feats[i]) for i in useful)
    d = np.zeros((len(useful), width))
    lg = np.zeros((len(useful), width))
    rel = np.zeros((len(useful), width), bool)
    valid = np.zeros((len(useful), width), bool)
    for row, i in enumerate(useful):
        m = len(feats[i])
        d[row, :m], lg[row, :m], rel[row, :m], valid[row, :m] = feats[i][:, 0], feats[i][:, 1], labels[i] > 0, True
    best = (-np.inf, -1.0)
    for r in LISTWISE_RATIOS:
        s = r * d + lg
        for t in LISTWISE_TEMPERATURES:
            z = np.where(valid, t * s, -np.inf)
            z -= z.max(axis=1, keepdims=True)
            log_all = np.log(np.exp(z).sum(axis=1))
            log_rel = np.log(np.where(rel, np.exp(z), 0.0).sum(axis=1))
            value = float((log_rel - log_all).sum())
            if value > best[0]:
                best = (value, float(r))
    r = best[1]
    x = np.concatenate(feats)
    w, b = fit_logistic(r * x[:, 0] + x[:, 1], np.concatenate(labels), l2=1.0)
    w = max(float(w), 1e-6)  # a higher combined score never means less relevant
    return [w * r, w, float(b)]


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


def fit_heads(
    staged: StagedIndex,
    dataset: Dataset,
    queries: Analysed,
    searcher_of: Callable[[LoadedIndex], Searcher] = Searcher,
) -> None:
    """Every head of the staged index from the analysed `queries`: the verification head, then the
    expansion prior, then the location head (each ranks with those before it, so each is fitted on a
    searcher made after the previous one was set)."""
    if staged.loaded.verifier is not None:
        staged.set_verify_head(fit_verify_head(searcher_of(staged.loaded), dataset, queries))
        if staged.loaded.pipeline.expand is not None:
            staged.set_expand_prior(fit_expand_prior(searcher_of(staged.loaded), dataset, queries))
    staged.set_location_head(fit_location_head(searcher_of(staged.loaded), dataset, queries))
