"""Relevance of image pairs from their locations alone (the rule in the data README).

sim: camera positions < 25 m apart and headings < 40 degrees apart.
fov: area of the intersection of the two viewing sectors (90 degrees wide, 50 m deep) over the area of
one sector; 0 at >= 50 m or headings >= 80 degrees apart.
Headings are compass bearings: 0 = north (+northing), 90 = east (+easting).
"""

from __future__ import annotations

from typing import overload

import numpy as np
import numpy.typing as npt

SIM_DIST_M = 25.0
SIM_HEADING_DEG = 40.0
FOV_DEPTH_M = 50.0
FOV_WIDTH_DEG = 90.0
FOV_HEADING_DEG = 80.0


@overload
def heading_diff(a: np.ndarray, b: npt.ArrayLike) -> np.ndarray: ...
@overload
def heading_diff(a: float, b: float) -> np.float64: ...
def heading_diff(a: npt.ArrayLike, b: npt.ArrayLike) -> np.ndarray | np.float64:
    """Absolute difference of compass headings in degrees, in [0, 180]."""
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) % 360.0
    return np.minimum(d, 360.0 - d)


def _pairwise(loc_a: np.ndarray, loc_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    loc_a, loc_b = np.asarray(loc_a, np.float64), np.asarray(loc_b, np.float64)
    if loc_a.ndim != 2 or loc_a.shape[1] != 3 or loc_b.ndim != 2 or loc_b.shape[1] != 3:
        raise ValueError("locations must have shape (n, 3): easting, northing, heading")
    dist = np.hypot(loc_a[:, None, 0] - loc_b[None, :, 0], loc_a[:, None, 1] - loc_b[None, :, 1])
    return dist, heading_diff(loc_a[:, None, 2], loc_b[None, :, 2])


def pairwise_distance(loc_a: np.ndarray, loc_b: np.ndarray) -> np.ndarray:
    """Camera-to-camera distances (na, nb) in metres."""
    return _pairwise(loc_a, loc_b)[0]


def sim_matrix(loc_a: np.ndarray, loc_b: np.ndarray) -> np.ndarray:
    """Binary relevance (na, nb) bool."""
    dist, dh = _pairwise(loc_a, loc_b)
    return (dist < SIM_DIST_M) & (dh < SIM_HEADING_DEG)


def _sector_samples(n_r: int = 48, n_t: int = 48) -> np.ndarray:
    """Points spread with equal area over the unit-radius sector that looks along +y, (n, 2)."""
    # Cell centres of an equal-area polar grid: r = sqrt(u) makes each ring carry the same area.
    u = (np.arange(n_r) + 0.5) / n_r
    r = np.sqrt(u)
    half = np.deg2rad(FOV_WIDTH_DEG / 2)
    t = -half + (np.arange(n_t) + 0.5) / n_t * 2 * half
    rr, tt = np.meshgrid(r, t, indexing="ij")
    return np.stack([rr * np.sin(tt), rr * np.cos(tt)], axis=-1).reshape(-1, 2)


_SAMPLES = _sector_samples()


def fov_matrix(loc_a: np.ndarray, loc_b: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Graded relevance (na, nb) float32 in [0, 1]: share of sector A's area that sector B covers.

    Computed by equal-area sampling of sector A (2,304 points: about 1% error), only for pairs within
    the distance and heading limits, so it stays fast on all London pairs.
    """
    loc_a, loc_b = np.asarray(loc_a, np.float64), np.asarray(loc_b, np.float64)
    dist, dh = _pairwise(loc_a, loc_b)
    out = np.zeros(dist.shape, dtype=np.float32)
    ia, ib = np.nonzero((dist < FOV_DEPTH_M) & (dh < FOV_HEADING_DEG))
    half = np.deg2rad(FOV_WIDTH_DEG / 2)
    cos_half = np.cos(half)
    for s in range(0, len(ia), chunk):
        a, b = ia[s : s + chunk], ib[s : s + chunk]
        ha = np.deg2rad(loc_a[a, 2])[:, None]
        # Rotate the sample points of the +y sector to compass heading ha, scale, move to A's position.
        px, py = _SAMPLES[None, :, 0] * FOV_DEPTH_M, _SAMPLES[None, :, 1] * FOV_DEPTH_M
        wx = loc_a[a, 0][:, None] + px * np.cos(ha) + py * np.sin(ha)
        wy = loc_a[a, 1][:, None] - px * np.sin(ha) + py * np.cos(ha)
        dx, dy = wx - loc_b[b, 0][:, None], wy - loc_b[b, 1][:, None]
        r = np.hypot(dx, dy)
        hb = np.deg2rad(loc_b[b, 2])[:, None]
        # Inside B's sector: within its depth and within 45 degrees of its viewing direction.
        along = dx * np.sin(hb) + dy * np.cos(hb)
        inside = (r < FOV_DEPTH_M) & (along >= cos_half * r)
        out[a, b] = inside.mean(axis=1)
    return out
