"""Training pairs and splits: balanced pairs, split by query, graded or binary targets."""

from __future__ import annotations

import numpy as np
import pytest

from common.pipeline import SplitConf
from dataset.split import split_queries
from model.train import TrainingError, sample_pairs

CONF = SplitConf(train=0.8, val=0.1, test=0.1, cell_m=100.0, seed=3)


def grid_locations(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(0, 2000, n), rng.uniform(0, 2000, n), rng.uniform(0, 360, n)])


def test_split_by_area_is_disjoint_seeded_and_keeps_cells_whole() -> None:
    loc = grid_locations(1000)
    a = split_queries(loc, CONF)
    assert all(np.array_equal(a[s], split_queries(loc, CONF)[s]) for s in a)
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(1000))
    cells = {s: {tuple(c) for c in np.floor(loc[a[s], :2] / 100).astype(int)} for s in a}
    # No cell of the map has queries in two splits: test areas are unseen in training.
    assert not cells["train"] & cells["test"] and not cells["val"] & cells["test"] and not cells["train"] & cells["val"]
    assert 60 <= len(a["test"]) <= 140 and 60 <= len(a["val"]) <= 140  # ~10% each, whole cells
    assert not np.array_equal(a["test"], split_queries(loc, CONF.model_copy(update={"seed": 4}))["test"])


def test_split_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError):
        split_queries(grid_locations(10), CONF.model_copy(update={"train": 0.9, "val": 0.2}))


def test_pairs_are_balanced_and_labelled_from_target() -> None:
    rng = np.random.default_rng(0)
    sim = np.zeros((4, 20), bool)
    sim[0, [1, 2, 3]] = True
    sim[2, [5]] = True  # query 1 and 3 have no relevant map image: no pairs from them
    fov = np.where(sim, 0.7, 0.0).astype(np.float32)
    q, d, y = sample_pairs(np.arange(4), sim, fov, 1, rng)
    assert set(q) == {0, 2}
    assert sim[q, d].sum() == (~sim[q, d]).sum() == 4
    assert np.array_equal(y, fov[q, d]) and np.isclose(y, 0.7).sum() == 4


def test_no_relevant_pairs_is_an_error() -> None:
    with pytest.raises(TrainingError, match="nothing to train on"):
        sample_pairs(np.arange(2), np.zeros((2, 5), bool), np.zeros((2, 5), np.float32), 1, np.random.default_rng(0))


def test_small_map_still_gets_every_split() -> None:
    # 30 queries along 150 m: one 250 m cell would put them all in train.
    loc = np.column_stack([np.linspace(0, 150, 30), np.zeros(30), np.zeros(30)])
    split = split_queries(loc, CONF.model_copy(update={"cell_m": 250.0}))
    assert all(len(v) > 0 for v in split.values())


def test_pca_projection_orders_and_whitens() -> None:
    from model.projection import pca_projection

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)) * np.array([10.0, 5.0, 2.0, 1.0, 0.5, 0.1])
    proj, offset = pca_projection(x, 3)
    y = x @ proj + offset
    assert np.allclose(y.mean(axis=0), 0, atol=1e-4)
    var = y.var(axis=0)
    assert var[0] > var[1] > var[2]  # the top directions, largest first
    assert np.allclose(np.abs(proj[:3, :3]), np.eye(3), atol=0.05)
    white, off = pca_projection(x, 3, whiten_power=0.5)
    assert np.allclose((x @ white + off).var(axis=0), 1.0, rtol=0.05)  # full whitening: unit variance
