"""Relevance from locations: hand cases, and agreement with the course's ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dataset.layout import load_dataset
from dataset.relevance import fov_matrix, heading_diff, sim_matrix


def test_heading_diff_wraps() -> None:
    assert heading_diff(np.array([350.0]), np.array([10.0]))[0] == 20.0
    assert heading_diff(np.array([0.0]), np.array([180.0]))[0] == 180.0


def test_hand_cases() -> None:
    a = np.array([[0.0, 0.0, 0.0]])
    b = np.array(
        [
            [0.0, 0.0, 0.0],  # same camera: full overlap
            [0.0, 24.0, 30.0],  # close, similar heading: sim
            [0.0, 26.0, 0.0],  # too far for sim, overlapping sectors
            [0.0, 0.0, 180.0],  # back to back: nothing shared
            [60.0, 0.0, 0.0],  # beyond 50 m
        ]
    )
    assert sim_matrix(a, b).tolist() == [[True, True, False, False, False]]
    fov = fov_matrix(a, b)[0]
    assert abs(fov[0] - 1.0) < 1e-6
    assert 0.2 < fov[2] < 0.9
    assert fov[3] == 0 and fov[4] == 0
    # Moving forward along the view direction keeps the far part in view: overlap shrinks with distance.
    ahead = fov_matrix(a, np.array([[0.0, d, 0.0] for d in (5.0, 15.0, 30.0)]))[0]
    assert ahead[0] > ahead[1] > ahead[2] > 0


def test_matches_course_ground_truth(london: Path) -> None:
    ds = load_dataset(london, check_files=False)
    sim = sim_matrix(ds.queries.loc, ds.database.loc)
    assert np.array_equal(sim, ds.sim)
    fov = fov_matrix(ds.queries.loc, ds.database.loc)
    err = np.abs(fov - ds.fov)
    assert err.max() < 0.03  # equal-area sampling of the sector: about 1% error
    assert err[ds.fov > 0].mean() < 0.005
