"""A rough position of the photo (a phone's GPS fix) as a prior on the search.

With a prior the candidates are the map images within its radius (retrieval/spatial.py), all of them
scored by the visual pipeline, and the ranking fuses the visual evidence with how far each stands
from the fix, through its penalty d^2 / (2 sigma^2) (d the map image's distance to the fix, sigma
the fix's stated accuracy): the first stage's score by P = sigmoid(a * logit(score) - c * penalty +
b), a verified candidate's distance, inliers and penalty by fuse_verified. The heads are fitted on
simulated fixes of labelled queries (retrieval/heads.py: fit_prior_heads); an index fitted without
labels uses NEUTRAL_HEAD (the visual score's odds times the fix's Gaussian likelihood).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_RADIUS_M = 5000.0
NEUTRAL_HEAD = (1.0, 1.0, 0.0)
# The fixes a prior head is fitted on: a phone's 1-sigma error per axis in a street (m), drawn
# uniformly, and the radius a client would ask for around each (about 3.3 sigma: 100 m at 30 m).
FIT_SIGMAS_M = (10.0, 20.0, 30.0, 50.0, 80.0)
FIT_RADIUS_PER_SIGMA = 10.0 / 3.0


@dataclass(frozen=True)
class Prior:
    """Where the photo was roughly taken, in the index's UTM metres."""

    easting: float
    northing: float
    radius_m: float  # only map images within it are candidates
    accuracy_m: float  # 1-sigma of the fix per axis

    def __post_init__(self) -> None:
        if not 0.0 < self.radius_m <= MAX_RADIUS_M:
            raise ValueError(f"radius_m must be in (0, {MAX_RADIUS_M:g}]; got {self.radius_m}")
        if not self.accuracy_m > 0.0:
            raise ValueError(f"accuracy_m must be > 0; got {self.accuracy_m}")

    def penalty(self, distance_m: np.ndarray) -> np.ndarray:
        """d^2 / (2 sigma^2): minus the log-likelihood of the fix, up to a constant."""
        return np.asarray(distance_m, np.float64) ** 2 / (2.0 * self.accuracy_m**2)


def logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, np.float64), 1e-9, 1.0 - 1e-9)
    out: np.ndarray = np.log(q / (1.0 - q))
    return out


def fuse(score: np.ndarray, penalty: np.ndarray, head: list[float] | tuple[float, ...] | None) -> np.ndarray:
    """P(relevant) from a visual score and the fix's penalty, by the head [a, c, b]."""
    a, c, b = NEUTRAL_HEAD if head is None else head
    return _sigmoid(a * logit(score) - c * np.asarray(penalty, np.float64) + b)


def fuse_verified(
    distance: np.ndarray, inliers: np.ndarray, penalty: np.ndarray, head: list[float] | None, neutral: np.ndarray
) -> np.ndarray:
    """P(relevant) of a verified candidate from its embedding distance, inliers and the fix's penalty,
    by the head [w_distance, w_inliers, c, b]: sigmoid(-w_distance * distance + w_inliers *
    log(1 + inliers) - c * penalty + b). Without a fitted head: fuse() of the verification's own
    score (`neutral`) with NEUTRAL_HEAD."""
    if head is None:
        return fuse(neutral, penalty, None)
    wd, wi, c, b = head
    z = -wd * np.asarray(distance, np.float64) + wi * np.log1p(np.asarray(inliers, np.float64)) - c * penalty + b
    return _sigmoid(z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))
    return out


def simulate_fix(truth: np.ndarray, sigma_m: float, rng: np.random.Generator) -> np.ndarray:
    """A phone's fix of the true (easting, northing): Gaussian noise of sigma_m per axis."""
    return np.asarray(truth[:2], np.float64) + rng.normal(0.0, sigma_m, 2)


def simulated_prior(truth: np.ndarray, sigma_m: float, radius_m: float, rng: np.random.Generator) -> Prior:
    e, n = simulate_fix(truth, sigma_m, rng)
    return Prior(float(e), float(n), radius_m, sigma_m)
