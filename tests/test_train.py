"""Training pairs and splits: balanced pairs, split by query, graded or binary targets."""

from __future__ import annotations

import numpy as np
import pytest

from dataset.split import split_queries
from model.train import TrainingError, sample_pairs


def test_split_by_query_is_disjoint_and_seeded() -> None:
    conf = {"train": 0.8, "val": 0.1, "test": 0.1, "seed": 3}
    a = split_queries(101, conf)
    b = split_queries(101, conf)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert sum(len(v) for v in a.values()) == 101
    assert len(set(a["train"]) & set(a["test"])) == 0 and len(set(a["val"]) & set(a["test"])) == 0
    assert len(a["test"]) == 10 and len(a["val"]) == 10
    assert not np.array_equal(a["test"], split_queries(101, conf | {"seed": 4})["test"])


def test_split_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError):
        split_queries(10, {"train": 0.9, "val": 0.2, "test": 0.1, "seed": 0})


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
