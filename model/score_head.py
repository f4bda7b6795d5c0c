"""Fit the score head: relevance = sigmoid(w * distance + b), by logistic regression on held-out pairs.

Presets whose embedding is not trained through a sigmoid head (raw aggregates, contrastive encoders)
still answer with a score in [0, 1] that means "probability that this map image is relevant".
"""

from __future__ import annotations

import numpy as np


def fit_logistic(features: np.ndarray, label: np.ndarray, l2: float = 1e-6, iters: int = 50) -> np.ndarray:
    """Newton's method for logistic regression of label in [0, 1] on (n, d) features plus a bias.
    Returns d + 1 weights, the bias last."""
    X = np.asarray(features, np.float64)
    X = X[:, None] if X.ndim == 1 else X
    y = np.asarray(label, np.float64).ravel()
    if len(X) != len(y) or len(X) < 2:
        raise ValueError("need at least two (features, label) rows of equal length")
    X = np.column_stack([X, np.ones(len(X))])
    theta = np.zeros(X.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(X @ theta, -50, 50)))
        grad = X.T @ (p - y) + l2 * theta
        hess = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(X.shape[1])
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-9:
            break
    return theta


def fit_sigmoid(distance: np.ndarray, label: np.ndarray, l2: float = 1e-6, iters: int = 50) -> tuple[float, float]:
    """The 2-parameter case: relevance = sigmoid(w * distance + b)."""
    w, b = fit_logistic(np.asarray(distance, np.float64).ravel(), label, l2, iters)
    return float(w), float(b)


def pair_distances(
    emb_q: np.ndarray, emb_d: np.ndarray, sim: np.ndarray, n_neg: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Distances and labels of every relevant (query, map) pair and n_neg random others per query."""
    ds, ys = [], []
    for i in range(len(emb_q)):
        pos = np.flatnonzero(sim[i])
        neg = rng.choice(len(emb_d), size=min(n_neg, len(emb_d)), replace=False)
        cols = np.concatenate([pos, neg])
        ds.append(np.linalg.norm(emb_d[cols] - emb_q[i], axis=1))
        ys.append(sim[i, cols].astype(np.float64))
    return np.concatenate(ds), np.concatenate(ys)
