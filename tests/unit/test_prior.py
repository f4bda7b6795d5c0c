"""The position prior: the spatial index, the fusion of a visual score with a fix, and its fitted heads."""

from __future__ import annotations

import numpy as np
import pytest

from dataset.layout import Location
from indexer.store import ImageRecord
from retrieval.heads import _fusion_head
from retrieval.prior import NEUTRAL_HEAD, Prior, fuse, simulated_prior
from retrieval.spatial import Places


def _records(xy: np.ndarray, first_id: int = 0) -> dict[int, ImageRecord]:
    return {
        first_id + i: ImageRecord(first_id + i, f"m{i}.jpg", Location(float(e), float(n), 0.0))
        for i, (e, n) in enumerate(xy)
    }


def _brute(images: dict[int, ImageRecord], e: float, n: float, r: float) -> list[int]:
    d = {i: np.hypot(rec.loc.easting - e, rec.loc.northing - n) for i, rec in images.items()}
    return sorted((i for i in d if d[i] <= r), key=lambda i: (d[i], i))


def test_places_within_a_radius_are_those_a_brute_force_finds_nearest_first() -> None:
    rng = np.random.default_rng(3)
    images = _records(rng.uniform(0, 2000, (3000, 2)))
    places = Places.of(images)
    for e, n, r in [(1000, 1000, 100), (0, 0, 250), (1999, 5, 40), (5000, 5000, 100), (700, 300, 5000)]:
        ids, d = places.within(e, n, r)
        assert ids.tolist() == _brute(images, e, n, r)
        assert np.all(np.diff(d) >= 0) and np.all(d <= r)
    assert len(places) == 3000


def test_online_changes_are_in_the_places_at_once() -> None:
    images = _records(np.array([[0.0, 0.0], [10.0, 0.0], [500.0, 500.0]]))
    places = Places.of(images)
    changed = dict(images)
    changed[7] = ImageRecord(7, "new.jpg", Location(3.0, 4.0, 0.0))  # added
    changed[1] = ImageRecord(1, "m1.jpg", Location(499.0, 500.0, 0.0))  # moved (re-added)
    del changed[0]  # deleted
    after = places.changed(changed, [7, 1, 0])
    assert after.within(0, 0, 20)[0].tolist() == [7]
    assert after.within(500, 500, 5)[0].tolist() == [2, 1]
    assert len(after) == 3
    assert places.within(0, 0, 20)[0].tolist() == [0, 1]  # the searcher before the change keeps its view
    again = after.changed({k: v for k, v in changed.items() if k != 7}, [7])
    assert again.within(0, 0, 20)[0].tolist() == []


def test_a_prior_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="radius_m"):
        Prior(0, 0, 0.0, 10)
    with pytest.raises(ValueError, match="radius_m"):
        Prior(0, 0, 5000.1, 10)
    with pytest.raises(ValueError, match="accuracy_m"):
        Prior(0, 0, 100, 0)


def test_fusion_rises_with_the_visual_score_and_falls_with_the_distance_to_the_fix() -> None:
    prior = Prior(0, 0, 100, 30)
    pen = prior.penalty(np.array([0.0, 30.0, 90.0]))
    assert pen.tolist() == pytest.approx([0.0, 0.5, 4.5])
    near_far = fuse(np.full(3, 0.5), pen, NEUTRAL_HEAD)
    assert near_far[0] == pytest.approx(0.5) and near_far[0] > near_far[1] > near_far[2]
    weak_strong = fuse(np.array([0.2, 0.9]), np.zeros(2), [2.0, 1.0, 0.0])
    assert weak_strong[0] < 0.2 < 0.9 < weak_strong[1]


def test_the_fitted_fusion_head_recovers_how_relevance_was_made() -> None:
    """Labels drawn from a known fusion [a, c, b]: the fit finds it back, signs and all."""
    rng = np.random.default_rng(0)
    truth = [1.5, 0.8, -0.5]
    scores = [rng.uniform(0.01, 0.99, 400) for _ in range(20)]
    pens = [rng.exponential(1.5, 400) for _ in range(20)]
    labels = [rng.random(400) < fuse(s, p, truth) for s, p in zip(scores, pens, strict=True)]
    a, c, b = _fusion_head(scores, pens, labels)
    assert a == pytest.approx(truth[0], abs=0.15) and c == pytest.approx(truth[1], abs=0.15)
    assert b == pytest.approx(truth[2], abs=0.2)


def test_a_simulated_fix_is_reproducible_and_as_noisy_as_asked() -> None:
    truth = np.array([1000.0, 2000.0, 90.0])
    a = [simulated_prior(truth, 30.0, 100.0, np.random.default_rng(s)) for s in range(2000)]
    b = simulated_prior(truth, 30.0, 100.0, np.random.default_rng(5))
    assert (a[5].easting, a[5].northing) == (b.easting, b.northing)
    err = np.array([[p.easting - 1000.0, p.northing - 2000.0] for p in a])
    assert err.std(axis=0) == pytest.approx([30.0, 30.0], rel=0.1)
    assert a[0].radius_m == 100.0 and a[0].accuracy_m == 30.0


def test_a_weight_fitted_backwards_is_left_out_and_the_rest_refitted() -> None:
    from retrieval.heads import nonnegative_logistic

    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 3))
    y = (rng.random(3000) < 1 / (1 + np.exp(-(2.0 * x[:, 0] - 1.0 * x[:, 1] + 0.5)))).astype(float)
    w = nonnegative_logistic(x, y)
    assert w[1] == 0.0 and w[2] == pytest.approx(0.0, abs=0.15)  # the backwards one is out
    assert w[0] == pytest.approx(2.0 * 0.8, rel=0.35) and np.all(w[:3] >= 0)


def test_verified_fusion_weighs_distance_inliers_and_the_fix() -> None:
    from retrieval.prior import fuse_verified

    pen = np.array([0.0, 0.0, 0.0, 2.0])
    p = fuse_verified(np.array([1.0, 1.5, 1.0, 1.0]), np.array([20, 20, 5, 20]), pen, [2.0, 1.0, 0.5, 0.0], pen)
    assert p[0] > p[1] and p[0] > p[2] and p[0] > p[3]  # nearer, better verified, nearer the fix
    z = -2.0 * 1.0 + np.log1p(20) - 0.5 * 2.0
    assert p[3] == pytest.approx(1 / (1 + np.exp(-z)))
    # Without a fitted head: the verification's own score with the neutral fusion.
    assert fuse_verified(np.ones(2), np.ones(2), np.zeros(2), None, np.array([0.3, 0.7])) == pytest.approx([0.3, 0.7])


def test_prior_figures_by_hand() -> None:
    from evaluation.prior_cv import figures

    sim = np.array([[True, False, False], [False, False, True], [False, True, False]])
    ranked = [[0, 1], [0, 2], []]
    loc_err = np.array([10.0, np.nan, 30.0])
    head_err = np.array([5.0, np.nan, 40.0])
    f = figures(ranked, sim, loc_err, head_err, np.array([0, 1, 2]))
    assert f["recall@1"] == pytest.approx(1 / 3, abs=1e-4) and f["recall@10"] == pytest.approx(2 / 3, abs=1e-4)
    assert f["precision@10"] == pytest.approx(2 / 30, abs=1e-4)
    assert f["localised_within_25m"] == pytest.approx(1 / 3, abs=1e-4) and f["localisation_right"] == pytest.approx(0.5)
    assert f["localisation_answered"] == pytest.approx(2 / 3, abs=1e-4) and f["localisation_median_m"] == 20.0
    assert f["heading_within_30deg"] == pytest.approx(0.5) and f["heading_median_deg"] == 22.5


def test_listwise_weights_recover_the_trade_off_that_ranks_the_relevant_first() -> None:
    from retrieval.heads import listwise_weights

    rng = np.random.default_rng(0)
    truth = np.array([2.0, 1.0, 0.5])
    feats, labels = [], []
    for _ in range(1000):
        x = rng.normal(size=(20, 3)) * [1.0, 3.0, 0.5]  # features of different spreads
        p = np.exp(x @ truth - (x @ truth).max())
        y = np.zeros(20, bool)
        y[rng.choice(20, p=p / p.sum())] = True
        feats.append(x)
        labels.append(y)
    w = listwise_weights(feats, labels)
    assert np.all(w >= 0)
    assert w[1] / w[0] == pytest.approx(0.5, rel=0.2) and w[2] / w[0] == pytest.approx(0.25, rel=0.4)
