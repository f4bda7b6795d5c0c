"""Fit the score head: relevance = sigmoid(w * distance + b), by logistic regression on held-out pairs.

Presets whose embedding is not trained through a sigmoid head (raw aggregates, contrastive encoders)
still answer with a score in [0, 1] that means "probability that this map image is relevant".
"""

from __future__ import annotations

import numpy as np


def fit_sigmoid(distance: np.ndarray, label: np.ndarray, l2: float = 1e-6, iters: int = 50) -> tuple[float, float]:
    """Newton's method for the 2-parameter logistic regression of label in [0, 1] on distance."""
    x = np.asarray(distance, np.float64).ravel()
    y = np.asarray(label, np.float64).ravel()
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("need at least two (distance, label) pairs of equal length")
    X = np.column_stack([x, np.ones_like(x)])
    theta = np.zeros(2)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ theta)))
        grad = X.T @ (p - y) + l2 * theta
        hess = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-9:
            break
    return float(theta[0]), float(theta[1])


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
