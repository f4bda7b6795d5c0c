"""Unsupervised linear projections of the aggregate vectors."""

from __future__ import annotations

import numpy as np


def pca_projection(x: np.ndarray, dim: int, whiten_power: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(d, dim) projection onto the top principal directions of x, each divided by its variance to
    the power `whiten_power` (0: none, 0.5: full whitening), and the offset -mean @ P."""
    mean = x.mean(axis=0)
    xc = (x - mean).astype(np.float32)
    # Gram-matrix form: there are fewer images than dimensions.
    vals, vecs = np.linalg.eigh((xc @ xc.T).astype(np.float64))
    top = np.argsort(vals)[::-1][: min(dim, len(x) - 1)]
    vals = np.maximum(vals[top], 1e-12)
    proj = (xc.T @ vecs[:, top].astype(np.float32)) / np.sqrt(vals).astype(np.float32)
    proj /= ((vals / len(x)) ** whiten_power).astype(np.float32)
    return proj.astype(np.float32), (-mean @ proj).astype(np.float32)
