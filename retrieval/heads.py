"""Fitted through the query path on the heads' queries (dataset/split.py fit_split): the verification
head, relevance = sigmoid(w . [distance, log1p(inliers)] + b), by logistic regression on the verified
shortlists; the prior of the verified spatial expansion; the location head, P(the best hit shows
the place); the heads that fuse a position prior with the visual scores (retrieval/prior.py), on
simulated fixes of the same queries, and the location head of the fused scores; and the heading
head, P(the estimated heading is right). `fit_heads` fits them all in order into a staged index."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from dataset.layout import Dataset
from dataset.relevance import heading_diff
from features.decode import ImageDecodeError
from features.orb import NoKeypointsError
from indexer.build import StagedIndex
from indexer.store import LoadedIndex
from model.score_head import fit_logistic
from retrieval.locate import HEADING_RIGHT_DEG, best_hit, vote
from retrieval.prior import FIT_RADIUS_PER_SIGMA, FIT_SIGMAS_M, Prior, fuse, logit, simulated_prior
from retrieval.searcher import Hit, Query, Searcher, at_place, found_place

log = logging.getLogger(__name__)

Analysed = list[tuple[int, Query]]  # query rows and their features and embedding
Ranker = Callable[[int, Query], list[Hit]]  # a query row and its analysis -> the ranked hits
PRIOR_SEED = 0  # the simulated fixes the prior heads are fitted on


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
        _, inl = searcher.verified(query, ids)
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


def fit_location_head(
    searcher: Searcher, dataset: Dataset, queries: Analysed, top: int = 10, ranker: Ranker | None = None
) -> list[float]:
    """[a, b] of P(the best hit shows the place) = sigmoid(a * logit(its score) + b), by logistic
    regression over the analysed `queries` (ground truth: the best hit is relevant); a >= 0, so a higher
    score never means less confidence. The other heads must be fitted first (they make the scores).
    `ranker`: how the hits are ranked (default: searcher.rank, no prior)."""
    if dataset.sim is None:
        raise ValueError("fitting the location head needs ground truth")
    rank = ranker or (lambda _q, query: searcher.rank(query, top))
    logits, labels = [], []
    for q, query in queries:
        best = best_hit(rank(q, query), top)
        if best is None:
            continue
        s = min(max(best.score, 1e-9), 1.0 - 1e-9)
        logits.append(np.log(s / (1.0 - s)))
        labels.append(float(dataset.sim[q, best.id]))
    if len(set(labels)) < 2:  # all right or all wrong: nothing to calibrate, keep the scores
        return [1.0, 0.0]
    a, b = fit_logistic(np.array(logits), np.array(labels), l2=1.0)
    return [float(max(a, 0.0)), float(b)]


def simulated_priors(dataset: Dataset, queries: Analysed, seed: int = PRIOR_SEED) -> dict[int, Prior]:
    """A simulated phone fix per query: sigma drawn from FIT_SIGMAS_M, radius FIT_RADIUS_PER_SIGMA x sigma."""
    rng = np.random.default_rng(seed)
    out = {}
    for q, _ in queries:
        sigma = float(rng.choice(FIT_SIGMAS_M))
        out[q] = simulated_prior(dataset.queries.loc[q], sigma, sigma * FIT_RADIUS_PER_SIGMA, rng)
    return out


def _fusion_head(scores: list[np.ndarray], penalties: list[np.ndarray], labels: list[np.ndarray]) -> list[float]:
    """[a, c, b] of sigmoid(a * logit(score) - c * penalty + b), a, c >= 0: more visual evidence or a
    nearer map image never lowers the fused score."""
    x = np.column_stack([logit(np.concatenate(scores)), -np.concatenate(penalties)])
    return [float(v) for v in nonnegative_logistic(x, np.concatenate(labels).astype(np.float64))]


def nonnegative_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0) -> np.ndarray:
    """Logistic weights (bias last) with every feature's weight >= 0: a feature whose weight comes
    out negative (data a few features separate perfectly drive weights to any sign) is left out
    and the rest refitted."""
    keep = np.ones(x.shape[1], bool)
    while True:
        w = np.zeros(x.shape[1] + 1)
        w[np.append(keep, True)] = fit_logistic(x[:, keep], y, l2=l2)
        bad = np.flatnonzero(keep & (w[:-1] < 0))
        if len(bad) == 0:
            return w
        keep[bad[np.argmin(w[bad])]] = False
        if not keep.any():
            w = np.zeros(x.shape[1] + 1)
            w[-1] = fit_logistic(np.zeros((len(y), 1)), y, l2=l2)[-1]
            return w


def listwise_weights(feats: list[np.ndarray], labels: list[np.ndarray], iters: int = 500) -> np.ndarray:
    """Weights w >= 0 of the linear score x . w that make a relevant candidate likeliest first under
    a softmax over each query's candidates (the queries with relevant and other candidates), by
    projected gradient ascent on the features scaled to unit spread; returned in the features' units."""
    useful = [i for i, y in enumerate(labels) if 0 < y.sum() < len(y)]
    d = feats[0].shape[1]
    if not useful:
        return np.ones(d)
    spread = np.concatenate([feats[i] for i in useful]).std(axis=0) + 1e-9
    xs = [feats[i] / spread for i in useful]
    rel = [labels[i].astype(bool) for i in useful]
    w = np.ones(d)

    def value_and_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        total, grad = 0.0, np.zeros(d)
        for x, r in zip(xs, rel, strict=True):
            z = x @ w
            z = z - z.max()
            e = np.exp(z)
            p_all, p_rel = e / e.sum(), e * r / (e * r).sum()
            total += float(np.log((e * r).sum()) - np.log(e.sum()))
            grad += p_rel @ x - p_all @ x
        return total - 0.5e-3 * float(w @ w), grad - 1e-3 * w

    value, grad = value_and_grad(w)
    step = 1.0 / len(xs)
    for _ in range(iters):
        trial = np.maximum(w + step * grad, 0.0)
        v, g = value_and_grad(trial)
        if v >= value:
            w, value, grad = trial, v, g
            step *= 1.5
        else:
            step *= 0.5
            if step < 1e-9:
                break
    out: np.ndarray = w / spread
    return out


def fit_prior_heads(
    searcher: Searcher, dataset: Dataset, queries: Analysed, priors: dict[int, Prior]
) -> dict[str, list[float]] | None:
    """The fusion heads of a prior search (Searcher.rank_near) from the analysed `queries` and their
    simulated `priors`: "first" on every candidate within each radius (first-stage scores), then, for
    a verifying index, "verified" on the candidates it verifies (the best verify.n by the first).
    None when no fix has a map image within its radius (too few queries to fit on)."""
    if dataset.sim is None:
        raise ValueError("fitting the prior heads needs ground truth")
    cands = []
    for q, query in queries:
        p = priors[q]
        ids, fix_m = searcher.places.within(p.easting, p.northing, p.radius_m)
        if len(ids):
            dist = searcher.backend.distances(query.embedding, ids)
            cands.append((q, query, ids, dist, p.penalty(fix_m), dataset.sim[q, ids]))
    seen = np.concatenate([c[5] for c in cands]) if cands else np.zeros(0, bool)
    if len(seen) == 0 or seen.min() == seen.max():  # no candidates, or all alike: nothing to fit
        return None
    first = _fusion_head([searcher.encoder.score(c[3]) for c in cands], [c[4] for c in cands], [c[5] for c in cands])
    heads = {"first": first}
    if searcher.verifier is None:
        return heads
    n = searcher.verifier.conf.n
    feats, labels = [], []
    for _, query, ids, dist, pen, rel in cands:
        f = fuse(searcher.encoder.score(dist), pen, first)
        head = np.lexsort((ids, -f))[:n]
        _, inl = searcher.verified(query, ids[head].tolist())
        feats.append(np.column_stack([-dist[head], np.log1p(inl), -pen[head]]))
        labels.append(rel[head])
    # Distance and inliers weighed afresh: among the map images near a fix, how they trade off is
    # not what the verification head learned over global shortlists. Weighed to rank each query's
    # candidates, then calibrated over all of them.
    w = listwise_weights(feats, labels)
    x, y = np.concatenate(feats) @ w, np.concatenate(labels).astype(np.float64)
    scale, bias = fit_logistic(x, y, l2=1.0)
    scale = max(float(scale), 1e-6)
    heads["verified"] = [float(v) for v in scale * w] + [float(bias)]
    return heads


def fit_heading_head(
    dataset: Dataset,
    queries: Analysed,
    rankers: list[Ranker],
    top: int = 10,
    location_heads: list[list[float] | None] | None = None,
) -> list[float]:
    """[a, c, b] of P(heading within HEADING_RIGHT_DEG) = sigmoid(a * logit(confidence) + c * agreement
    + b), by logistic regression over the votes of every ranker's answers whose confidence makes an
    estimate (>= 0.5), each with its own location head; [0, 0, logit(share right)] when they are
    all right or all wrong, and a, c >= 0."""
    x, y = [], []
    heads = location_heads or [None] * len(rankers)
    for rank, head in zip(rankers, heads, strict=True):
        for q, query in queries:
            v = vote(rank(q, query), top, head)
            if v is None or v.confidence < 0.5:
                continue
            x.append([float(logit(np.array(v.confidence))), v.agreement])
            y.append(float(heading_diff(v.heading, float(dataset.queries.loc[q, 2])) <= HEADING_RIGHT_DEG))
    if not y:
        return [0.0, 0.0, 0.0]
    labels = np.array(y)
    if labels.min() == labels.max():
        share = (labels.sum() + 1) / (len(labels) + 2)
        return [0.0, 0.0, float(np.log(share / (1 - share)))]
    return [float(v) for v in nonnegative_logistic(np.array(x), labels)]


def fit_heads(
    staged: StagedIndex,
    dataset: Dataset,
    queries: Analysed,
    searcher_of: Callable[[LoadedIndex], Searcher] = Searcher,
) -> None:
    """Every head of the staged index from the analysed `queries`: the verification head, then the
    expansion prior, then the location head; then the prior's fusion heads and their location head
    on simulated fixes; then the heading head over both kinds of answer (each ranks with those
    before it, so each is fitted on a searcher made after the previous one was set)."""
    if staged.loaded.verifier is not None:
        staged.set_verify_head(fit_verify_head(searcher_of(staged.loaded), dataset, queries))
        if staged.loaded.pipeline.expand is not None:
            staged.set_expand_prior(fit_expand_prior(searcher_of(staged.loaded), dataset, queries))
    staged.set_location_head(fit_location_head(searcher_of(staged.loaded), dataset, queries))
    priors = simulated_priors(dataset, queries)
    heads = fit_prior_heads(searcher_of(staged.loaded), dataset, queries, priors)
    if heads is None:
        log.warning(
            "no simulated fix of the heads' queries has map images to tell apart: prior searches fuse neutrally"
        )
        heads = {}
    staged.set_prior_heads(heads)
    s = searcher_of(staged.loaded)

    def near(q: int, query: Query) -> list[Hit]:
        return s.rank_near(query, priors[q], 10)[0]

    staged.set_prior_heads(heads | {"location": fit_location_head(s, dataset, queries, ranker=near)})
    s = searcher_of(staged.loaded)

    def plain(_q: int, query: Query) -> list[Hit]:
        return s.rank(query, 10)

    def fused(q: int, query: Query) -> list[Hit]:
        return s.rank_near(query, priors[q], 10)[0]

    staged.set_heading_head(
        fit_heading_head(dataset, queries, [plain, fused], location_heads=[s.location_head, s.prior_location_head])
    )
