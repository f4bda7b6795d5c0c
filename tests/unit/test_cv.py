"""Area-fold cross-validation's pure parts: folds of whole cells, what each fit learns from, the
bootstrap over cells and the per-query figures behind the intervals."""

from __future__ import annotations

import numpy as np
import pytest

from common.pipeline import SplitConf
from common.retrieval_metrics import cluster_bootstrap, summarize
from dataset.split import area_folds, cells_of, fit_split
from evaluation.cv import fold_splits, per_query

CONF = SplitConf(cell_m=250.0, seed=3)


def city(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(0, 3000, n), rng.uniform(0, 3000, n), rng.uniform(0, 360, n)])


def test_folds_are_whole_cells_balanced_and_seeded() -> None:
    loc = city(2000)
    fold, cell = area_folds(loc, 5, 250.0, seed=1)
    assert np.array_equal(cell, cells_of(loc, 250.0))
    assert all(len(set(fold[cell == c].tolist())) == 1 for c in np.unique(cell))  # no cell in two folds
    sizes = np.bincount(fold, minlength=5)
    biggest_cell = np.bincount(cell).max()
    assert sizes.max() - sizes.min() <= biggest_cell  # dealt to the emptiest fold: about equal
    assert np.array_equal(fold, area_folds(loc, 5, 250.0, seed=1)[0])
    assert not np.array_equal(fold, area_folds(loc, 5, 250.0, seed=2)[0])


def test_a_small_map_gets_smaller_cells_to_fill_the_folds() -> None:
    loc = np.column_stack([np.linspace(0, 300, 40), np.zeros(40), np.zeros(40)])  # two 250 m cells
    fold, cell = area_folds(loc, 5, 250.0, seed=0)
    assert set(fold.tolist()) == set(range(5)) and cell.max() + 1 >= 5
    with pytest.raises(ValueError, match="folds"):
        area_folds(loc[:3], 5, 250.0, seed=0)


def test_fit_split_keeps_head_cells_apart_or_samples_in_sample() -> None:
    loc = city(1000)
    rows = np.arange(0, 1000, 2)  # the rows a fit may learn from
    apart = fit_split(loc, rows, CONF)
    assert set(apart["train"]) | set(apart["val"]) == set(rows.tolist())
    assert not set(apart["train"]) & set(apart["val"])
    assert not set(cells_of(loc, 250.0)[apart["train"]]) & set(cells_of(loc, 250.0)[apart["val"]])
    assert 0.05 < len(apart["val"]) / len(rows) < 0.2  # val / (train + val) = 1/9 of the rows
    inside = fit_split(loc, rows, CONF.model_copy(update={"val": 0.0, "train": 0.9, "head_queries": 100}))
    assert np.array_equal(inside["train"], rows) and len(inside["val"]) == 100
    assert set(inside["val"]) <= set(rows.tolist())


def test_no_fold_fits_on_its_own_queries_or_the_test_split() -> None:
    loc = city(1500)
    pool, fold, _, splits = fold_splits(loc, CONF)
    test_split = np.setdiff1d(np.arange(1500), pool)
    assert len(splits) == CONF.folds and 0 < len(test_split) < 300
    cells = cells_of(loc, 250.0)
    for f, split in enumerate(splits):
        assert np.array_equal(split["test"], pool[fold == f])
        learnt = np.union1d(split["train"], split["val"])
        assert not set(learnt) & set(split["test"]) and not set(learnt) & set(test_split)
        assert not set(cells[learnt]) & set(cells[split["test"]])  # held-out areas, not just queries
    assert np.array_equal(np.sort(np.concatenate([s["test"] for s in splits])), pool)


def test_cluster_bootstrap_by_hand() -> None:
    assert cluster_bootstrap(np.full(6, 0.25), np.arange(6)) == pytest.approx((0.25, 0.25))
    lo, hi = cluster_bootstrap(np.array([0.0, 1.0]), np.array([0, 1]), n_boot=4000)
    assert (lo, hi) == (0.0, 1.0)  # replicates are 0, 0.5 or 1; each end has probability 1/4
    # NaN values are left out: the same as without them.
    a = cluster_bootstrap(np.array([1.0, np.nan, 0.0, 1.0]), np.array([0, 0, 1, 2]), seed=5)
    assert a == cluster_bootstrap(np.array([1.0, 0.0, 1.0]), np.array([0, 1, 2]), seed=5)
    assert cluster_bootstrap(np.array([np.nan]), np.array([0])) is None
    with pytest.raises(ValueError):
        cluster_bootstrap(np.zeros(3), np.zeros(2))


def test_whole_cells_resampled_give_wider_intervals_than_queries() -> None:
    # 20 areas of 10 queries that all succeed or all fail together.
    values = np.repeat(np.random.default_rng(0).integers(0, 2, 20), 10).astype(float)
    by_cell = cluster_bootstrap(values, np.repeat(np.arange(20), 10))
    by_query = cluster_bootstrap(values, np.arange(200))
    assert by_cell is not None and by_query is not None
    assert by_cell[1] - by_cell[0] > 2 * (by_query[1] - by_query[0])


def test_per_query_figures_average_to_the_summary() -> None:
    rng = np.random.default_rng(0)
    sim = rng.random((40, 60)) < 0.05
    sim[3] = False  # a query without a relevant map image counts nowhere
    ranked = np.array([rng.permutation(60)[:50] for _ in range(40)])
    ranked[5, 20:] = -1
    err = np.where(rng.random(40) < 0.5, rng.uniform(0, 60, 40), np.nan)
    values = per_query(ranked, sim, err)
    figures = summarize(ranked, sim)
    for key in ("recall@1", "recall@10", "recall@50", "precision@10", "mAP"):
        assert np.nanmean(values[key]) == pytest.approx(figures[key])
        assert np.isnan(values[key][3])
    assert values["localised_within_25m"].mean() == pytest.approx((np.nan_to_num(err, nan=99) < 25).mean())
    answered = ~np.isnan(err)
    assert np.nanmean(values["localisation_right"]) == pytest.approx((err[answered] < 25).mean())


def test_cross_validations_are_named_by_everything_that_decides_their_figures() -> None:
    from common.pipeline import Pipeline, get_pipeline
    from evaluation.cv import STAGES, cv_name

    assert set(STAGES) == set(Pipeline.model_fields) - {"name"}
    conf = get_pipeline("default")
    assert cv_name(conf) == cv_name(get_pipeline("default")) and cv_name(conf).startswith("cv-default-")
    assert conf.verify is not None
    changed = [
        conf.model_copy(update={"split": conf.split.model_copy(update={"folds": 4})}),
        conf.model_copy(update={"verify": conf.verify.model_copy(update={"head": "listwise"})}),
        conf.model_copy(update={"expand": None}),
        conf.model_copy(update={"index": conf.index.model_copy(update={"kind": "exact"})}),
    ]
    assert len({cv_name(c) for c in [conf, *changed]}) == 5
