"""Linear projections of the aggregate vectors: unsupervised (PCA) and learned from matching pairs."""

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


def pair_whitening(
    z: np.ndarray, first: np.ndarray, second: np.ndarray, weights: np.ndarray, shrink: float
) -> np.ndarray:
    """(d, d) whitening by the covariance of matching-pair differences: the directions in which two
    views of one place differ (season, light, viewpoint) are shrunk, the others stretched.

    This is the first half of the learned whitening of Mikolajczyk & Matas (2007) and Radenovic et al.
    (2016), C_S^(-1/2) with C_S = sum_p w_p (z_a - z_b)(z_a - z_b)^T / sum_p w_p over the pairs
    (first[p], second[p]) of rows of z. Its second half, a rotation onto the top inter-class
    directions that also drops dimensions, lost recall on the validation areas, so it is left out (a
    rotation alone changes no distance). `shrink` in [0, 1) pulls C_S towards a multiple of the
    identity, so directions that few pairs span are not blown up.
    """
    first, second = np.asarray(first, np.int64), np.asarray(second, np.int64)
    w = np.asarray(weights, np.float64)
    if not (len(first) == len(second) == len(w)) or len(w) == 0:
        raise ValueError("pair_whitening needs one weight per pair and at least one pair")
    if not 0.0 <= shrink < 1.0:
        raise ValueError(f"shrink must lie in [0, 1), got {shrink}")
    dim = z.shape[1]
    cov = np.zeros((dim, dim), np.float64)
    for s in range(0, len(w), 8192):  # in chunks: the differences of all pairs need not fit at once
        d = (z[first[s : s + 8192]] - z[second[s : s + 8192]]).astype(np.float64)
        cov += (d * w[s : s + 8192, None]).T @ d
    cov /= w.sum()
    cov = (1.0 - shrink) * cov + shrink * (np.trace(cov) / dim) * np.eye(dim)
    vals, vecs = np.linalg.eigh(cov)
    whitening: np.ndarray = (vecs / np.sqrt(np.maximum(vals, 1e-12))).astype(np.float32)
    return whitening


def balanced_axes(x: np.ndarray, bins: int) -> np.ndarray:
    """(d, d) orthonormal basis: the principal axes of x dealt into `bins` groups of consecutive
    columns (as equal in size as d allows), each axis in turn (largest variance first) to the open
    group with the least variance so far. A rotation changes no distance; it matters to product
    quantisation, whose sub-vectors are consecutive values: in this basis they are uncorrelated and
    share the variance evenly, instead of each quantising a slice of correlated raw dimensions
    (indexer/kinds.py; docs/presets.md has what it does to the London queries among a million entries).
    Column signs are fixed (largest entry positive), so the basis does not
    depend on the eigen solver's choice."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or bins < 1:
        raise ValueError(f"balanced_axes needs (n, d) values and at least one group, got {x.shape} and {bins}")
    d = x.shape[1]
    bins = min(bins, d)
    xc = x - x.mean(axis=0)
    vals, vecs = np.linalg.eigh(xc.T @ xc / max(len(x) - 1, 1))
    order = np.argsort(vals, kind="stable")[::-1]
    vals, vecs = np.maximum(vals[order], 0.0), vecs[:, order]
    vecs *= np.where(vecs[np.abs(vecs).argmax(axis=0), np.arange(d)] < 0, -1.0, 1.0)
    size = np.full(bins, d // bins)
    size[: d % bins] += 1
    first = np.concatenate([[0], np.cumsum(size)[:-1]])
    load, fill = np.zeros(bins), np.zeros(bins, np.int64)
    columns = np.empty(d, np.int64)
    for axis, var in enumerate(vals):
        open_groups = np.flatnonzero(fill < size)
        group = int(open_groups[np.argmin(load[open_groups])])
        columns[first[group] + fill[group]] = axis
        fill[group] += 1
        load[group] += var
    return vecs[:, columns].astype(np.float32)
