"""Retrieval metrics as small pure numpy functions over result arrays.

Conventions shared by every function (in the style of faiss ``contrib/evaluation.py``):

- ``ranked``: integer array ``(nq, K)`` of database column indices, best first. ``-1`` marks an
  empty slot ("no result", padding) and never counts as relevant. Any other value must lie in
  ``[0, ndb)`` and a row must not repeat a column (a repeat would count one relevant item twice).
- ``relevance``: bool array ``(nq, ndb)``; ``relevance[i, j]`` is True when database item ``j`` is
  relevant to query ``i``.
- ``gains``: float array ``(nq, ndb)`` of graded relevance in ``[0, 1]`` (for nDCG).
- ``k`` is a positive int and may exceed ``K``: slots past the end of the list count as empty.

Ranks are 1-based in the formulas below. Wrong shapes, dtypes or values raise ``ValueError``.
Per-query functions return float64 arrays of shape ``(nq,)``; ``nq == 0`` gives empty arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import numpy.typing as npt

__all__ = [
    "accuracy_within_margin",
    "average_precision",
    "cluster_bootstrap",
    "fraction_recalled_at_k",
    "hits",
    "ndcg_at_k",
    "precision_at_k",
    "recall_at_k",
    "sign_test",
    "summarize",
]


# ---------------------------------------------------------------------------------------------
# validation helpers


def _check_ranked(ranked: npt.ArrayLike, ndb: int | None = None) -> np.ndarray:
    ranked = np.asarray(ranked)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be a 2-D (nq, K) array, got shape {ranked.shape}")
    if ranked.dtype == bool or not np.issubdtype(ranked.dtype, np.integer):
        raise ValueError(f"ranked must have an integer dtype, got {ranked.dtype}")
    if ranked.size:
        if ranked.min() < -1:
            raise ValueError(f"ranked holds {ranked.min()}; only -1 may mark an empty slot")
        if ndb is not None and ranked.max() >= ndb:
            raise ValueError(f"ranked holds column {ranked.max()} but the database has {ndb} items")
        if ranked.shape[1] > 1:
            s = np.sort(ranked, axis=1)
            if ((s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)).any():
                raise ValueError("ranked repeats a database column within a row")
    return ranked


def _check_matrix(name: str, m: npt.ArrayLike, nq: int) -> np.ndarray:
    m = np.asarray(m)
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (nq, ndb) array, got shape {m.shape}")
    if m.shape[0] != nq:
        raise ValueError(f"{name} has {m.shape[0]} rows but ranked has {nq} queries")
    return m


def _check_relevance(relevance: npt.ArrayLike, nq: int) -> np.ndarray:
    relevance = _check_matrix("relevance", relevance, nq)
    if relevance.dtype != bool:
        raise ValueError(f"relevance must be a bool array, got dtype {relevance.dtype}")
    return relevance


def _check_gains(gains: npt.ArrayLike, nq: int) -> np.ndarray:
    gains = _check_matrix("gains", gains, nq)
    if not (np.issubdtype(gains.dtype, np.floating) or np.issubdtype(gains.dtype, np.integer)):
        raise ValueError(f"gains must be a float array, got dtype {gains.dtype}")
    gains = gains.astype(np.float64, copy=False)
    if gains.size and (not np.isfinite(gains).all() or gains.min() < 0 or gains.max() > 1):
        raise ValueError("gains must be finite and lie in [0, 1]")
    return gains


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return int(k)


def _check_1d_pair(a: npt.ArrayLike, b: npt.ArrayLike, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a)
    b = np.asarray(b)
    for name, x in zip(names, (a, b), strict=True):
        if x.ndim != 1:
            raise ValueError(f"{name} must be a 1-D array, got shape {x.shape}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} differ in length: {a.shape[0]} vs {b.shape[0]}")
    return a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)


def _hits(ranked: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    if relevance.shape[1] == 0:  # empty database: every slot is necessarily -1
        return np.zeros(ranked.shape, dtype=bool)
    rows = np.arange(ranked.shape[0])[:, None]
    hit: np.ndarray = relevance[rows, np.maximum(ranked, 0)] & (ranked >= 0)
    return hit


def _checked_hits(ranked: npt.ArrayLike, relevance: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    ranked = np.asarray(ranked)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be a 2-D (nq, K) array, got shape {ranked.shape}")
    relevance = _check_relevance(relevance, ranked.shape[0])
    ranked = _check_ranked(ranked, relevance.shape[1])
    return _hits(ranked, relevance), relevance


# ---------------------------------------------------------------------------------------------
# per-query metrics


def hits(ranked: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """(nq, K) bool: whether each returned item is relevant to its query. Empty slots (-1) are False."""
    return _checked_hits(ranked, relevance)[0]


def precision_at_k(ranked: np.ndarray, relevance: np.ndarray, k: int) -> np.ndarray:
    """(nq,) float: (#relevant among the first k results) / k.

    The denominator is always k: when K < k, or the list is padded with -1, the missing slots
    count as non-relevant. A query with no relevant item scores 0.0.
    """
    k = _check_k(k)
    h, _ = _checked_hits(ranked, relevance)
    precision: np.ndarray = h[:, :k].sum(axis=1) / k
    return precision


def recall_at_k(ranked: np.ndarray, relevance: np.ndarray, k: int) -> np.ndarray:
    """(nq,) float: the place-recognition recall@k, 1.0 if at least one of the first k results is
    relevant, else 0.0. A query with no relevant item in the database scores 0.0 (``summarize``
    excludes such queries). For the classic IR recall see ``fraction_recalled_at_k``."""
    k = _check_k(k)
    h, _ = _checked_hits(ranked, relevance)
    # h is 2-D, so any(axis=1) is an array, never the scalar numpy's stubs allow for
    return cast(np.ndarray, h[:, :k].any(axis=1)).astype(np.float64)


def fraction_recalled_at_k(ranked: np.ndarray, relevance: np.ndarray, k: int) -> np.ndarray:
    """(nq,) float: classic IR recall, (#relevant among the first k results) / (#relevant items in
    the database for that query). NaN for a query with no relevant item."""
    k = _check_k(k)
    h, relevance = _checked_hits(ranked, relevance)
    n_rel = relevance.sum(axis=1)
    found = h[:, :k].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n_rel > 0, found / np.maximum(n_rel, 1), np.nan)


def average_precision(ranked: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """(nq,) float: average precision over the whole ranked list of length K.

    AP = sum over relevant ranks r of precision@r, divided by min(#relevant in the database, K)
    (not by #relevant alone, so a list of length K that puts relevant items in its first
    min(n_rel, K) slots scores 1.0). NaN for a query with no relevant item; 0.0 when K == 0 and
    the query has relevant items.
    """
    h, relevance = _checked_hits(ranked, relevance)
    return _ap(h, relevance.sum(axis=1))


def _ap(h: np.ndarray, n_rel: np.ndarray) -> np.ndarray:
    big_k = h.shape[1]
    prec_at_hit = np.where(h, np.cumsum(h, axis=1) / np.arange(1, big_k + 1), 0.0)
    ap = prec_at_hit.sum(axis=1) / np.maximum(np.minimum(n_rel, big_k), 1)
    return np.where(n_rel > 0, ap, np.nan)


def ndcg_at_k(ranked: np.ndarray, gains: np.ndarray, k: int) -> np.ndarray:
    """(nq,) float: normalised discounted cumulative gain of the first k results.

    DCG@k = sum over ranks r <= min(k, K) of gains[i, ranked[i, r-1]] / log2(r + 1), with 0 gain
    for empty slots (-1). It is divided by the ideal DCG@k: the same sum over that query's k
    largest gains (all of its row if ndb < k) in decreasing order. NaN when the ideal DCG is 0
    (every gain of the row is 0).
    """
    k = _check_k(k)
    ranked = np.asarray(ranked)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be a 2-D (nq, K) array, got shape {ranked.shape}")
    gains = _check_gains(gains, ranked.shape[0])
    ranked = _check_ranked(ranked, gains.shape[1])
    nq, ndb = gains.shape
    top = ranked[:, :k]
    rows = np.arange(nq)[:, None]
    g = np.where(top >= 0, gains[rows, np.maximum(top, 0)], 0.0) if ndb else np.zeros(top.shape)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = g @ discount[: top.shape[1]]
    m = min(k, ndb)
    ideal = -np.partition(-gains, m - 1, axis=1)[:, :m] if m < ndb else gains  # the row's m largest
    ideal = -np.sort(-ideal, axis=1)
    idcg = ideal @ discount[: ideal.shape[1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), np.nan)


# ---------------------------------------------------------------------------------------------
# aggregate metrics


def accuracy_within_margin(predicted: np.ndarray, target: np.ndarray, margin: float) -> float:
    """Share of pairs with |predicted - target| <= margin, as a python float in [0, 1].

    Both inputs are 1-D numeric arrays of equal, non-zero length (ValueError otherwise); margin
    must be finite and >= 0. A pair with a NaN on either side counts as outside the margin.
    """
    p, t = _check_1d_pair(predicted, target, ("predicted", "target"))
    if p.size == 0:
        raise ValueError("accuracy_within_margin needs at least one pair")
    margin = float(margin)
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be finite and >= 0, got {margin}")
    with np.errstate(invalid="ignore"):
        return float(np.mean(np.abs(p - t) <= margin))


def _mean_or_none(x: np.ndarray) -> float | None:
    return float(x.mean()) if x.size else None


def summarize(
    ranked: np.ndarray,
    relevance: np.ndarray,
    gains: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10, 20, 50),
) -> dict[str, Any]:
    """Mean metrics over the evaluated queries, as a flat JSON-serialisable dict::

        {"n_queries": int, "precision@1": float, ..., "recall@1": float, ..., "mAP": float,
         "ndcg@10": float | None}

    Only queries with at least one relevant item in ``relevance`` are evaluated; the others are
    excluded from every mean, and ``n_queries`` counts the evaluated ones. ``recall@k`` is the
    place-recognition recall (``recall_at_k``). ``ndcg@10`` is None when ``gains`` is None; with
    gains it is the mean of ``ndcg_at_k(..., 10)`` over the evaluated queries whose ideal DCG is
    > 0. Any mean over zero queries is None rather than NaN.
    """
    ks = tuple(_check_k(k) for k in ks)
    if not ks:
        raise ValueError("ks must name at least one cutoff")
    h, relevance = _checked_hits(ranked, relevance)
    keep = relevance.any(axis=1)
    hk = h[keep]
    out: dict[str, Any] = {"n_queries": int(keep.sum())}
    for k in ks:
        out[f"precision@{k}"] = _mean_or_none(hk[:, :k].sum(axis=1) / k)
    for k in ks:
        out[f"recall@{k}"] = _mean_or_none(cast(np.ndarray, hk[:, :k].any(axis=1)).astype(np.float64))
    out["mAP"] = _mean_or_none(_ap(hk, relevance[keep].sum(axis=1)))
    if gains is None:
        out["ndcg@10"] = None
    else:
        nd = ndcg_at_k(ranked, gains, 10)[keep]
        out["ndcg@10"] = _mean_or_none(nd[~np.isnan(nd)])
    return out


def sign_test(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Paired two-sided sign test of per-query scores ``a`` (method A) against ``b`` (method B).

    ``wins`` counts queries with a > b, ``losses`` a < b, ``ties`` a == b. Ties are dropped and the
    p-value is the exact two-sided binomial probability, under p = 1/2 with n = wins + losses,
    of a split at least as uneven as the observed one: min(1, 2 * P(X <= min(wins, losses))).
    p_value is 1.0 when n == 0. Pairs with NaN on either side (e.g. the AP of a query without
    relevant items) are dropped and counted nowhere. Inputs are 1-D numeric arrays of equal
    length (ValueError otherwise).
    """
    x, y = _check_1d_pair(a, b, ("a", "b"))
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    wins = int((x > y).sum())
    losses = int((x < y).sum())
    ties = int((x == y).sum())
    n = wins + losses
    if n == 0:
        p = 1.0
    else:
        # exact integer tail sum C(n, 0) + ... + C(n, m), each term from the previous one
        # (C(n, i+1) = C(n, i) * (n - i) / (i + 1)) instead of a math.comb call per term;
        # int / int true division rounds correctly however large the integers.
        c = tail = math.comb(n, 0)
        for i in range(min(wins, losses)):
            c = c * (n - i) // (i + 1)
            tail += c
        p = min(1.0, 2 * tail / 2**n)
    return {"wins": wins, "losses": losses, "ties": ties, "p_value": float(p)}


def cluster_bootstrap(
    values: np.ndarray, clusters: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile interval of the mean of per-query ``values`` when whole ``clusters`` (e.g. the map
    cells the queries fall in) are resampled with replacement: queries of one area succeed or fail
    together, so resampling them one by one would make the interval too narrow. NaN values (queries
    the metric does not cover) are left out. Each replicate is the mean over the queries of the drawn
    clusters, counted as often as their cluster was drawn. None when no value is left."""
    values, clusters = np.asarray(values, np.float64), np.asarray(clusters)
    if values.shape != clusters.shape or values.ndim != 1:
        raise ValueError(f"values {values.shape} and clusters {clusters.shape} must be 1-D of one length")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError("level must be in (0, 1) and n_boot positive")
    keep = ~np.isnan(values)
    if not keep.any():
        return None
    _, c = np.unique(clusters[keep], return_inverse=True)
    c = c.ravel()
    n_c = int(c.max()) + 1
    sums = np.bincount(c, weights=values[keep], minlength=n_c)
    counts = np.bincount(c, minlength=n_c).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, n_c, size=(n_boot, n_c))
    times = np.zeros((n_boot, n_c))
    np.add.at(times, (np.repeat(np.arange(n_boot), n_c), draws.ravel()), 1.0)
    stats = (times @ sums) / np.maximum(times @ counts, 1e-12)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
