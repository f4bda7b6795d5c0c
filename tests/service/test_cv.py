"""Area-fold cross-validation end to end on the tiny synthetic data: every fold refitted, the
out-of-fold answers pooled and saved, the queries ranked as the query path ranks them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cli.stages import run_cv, run_index
from common.pipeline import get_pipeline
from dataset.layout import load_dataset
from evaluation.cv import CrossValidation, Fitter, fold_splits, per_query
from indexer import store
from model import vectors
from retrieval.searcher import Searcher

PRESET = "vlad-verify"  # verifies: every head is refitted per fold


@pytest.fixture(scope="module")
def cv_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CrossValidation]:
    artifacts = tmp_path_factory.mktemp("cv-artifacts")
    return artifacts, CrossValidation.load(run_cv(PRESET, load_dataset(tiny_data), artifacts, jobs=1))


def test_every_query_outside_the_test_split_is_answered_once_out_of_fold(
    tiny_data: Path, cv_run: tuple[Path, CrossValidation]
) -> None:
    _, result = cv_run
    ds = load_dataset(tiny_data)
    conf = get_pipeline(PRESET)
    pool, fold, _, splits = fold_splits(ds.queries.loc, conf.split, np.asarray(ds.sim.any(axis=1)))
    assert np.array_equal(result.rows, pool) and np.array_equal(result.fold, fold)
    assert result.ranked.shape == (len(pool), 50) and result.cv["queries_total"] == len(pool)
    for f, split in enumerate(splits):
        assert np.array_equal(split["test"], pool[fold == f])
        assert not set(split["train"]) & set(split["test"]) and not set(split["val"]) & set(split["test"])
    # The served figures are the means of the saved per-query answers, inside their intervals.
    values = per_query(result.ranked, ds.sim[pool], result.loc_error)
    for key in ("recall@1", "recall@10", "precision@10", "mAP"):
        assert result.cv[key] == pytest.approx(np.nanmean(values[key]))
        lo, hi = result.cv["intervals"][key]
        assert lo <= result.cv[key] <= hi
    assert result.test is not None and result.test["queries_total"] == len(ds.queries) - len(pool)


def test_cross_validation_is_reproducible_and_reused(tiny_data: Path, cv_run: tuple[Path, CrossValidation]) -> None:
    artifacts, result = cv_run
    ds = load_dataset(tiny_data)
    saved = run_cv(PRESET, ds, artifacts, jobs=1)  # cached: not computed again
    assert CrossValidation.load(saved).cv["computed_at"] == result.cv["computed_at"]
    saved.unlink()
    again = CrossValidation.load(run_cv(PRESET, ds, artifacts, jobs=1))
    assert np.array_equal(again.ranked, result.ranked)
    assert np.array_equal(again.loc_error, result.loc_error, equal_nan=True)


def test_folds_see_queries_exactly_as_the_query_path(tiny_data: Path, tmp_path: Path) -> None:
    ds = load_dataset(tiny_data)
    conf = get_pipeline(PRESET)
    version = run_index(PRESET, ds, tmp_path, jobs=1)
    searcher = Searcher(store.load(version))
    out_root = store.data_dir(tmp_path, ds.root)
    fitter = Fitter(conf, ds, vectors.main(conf, ds, out_root, 1), out_root, 1)
    staged_like = type("Staged", (), {"loaded": searcher.loaded})()
    fitted = dict(fitter.queries(staged_like, np.arange(len(ds.queries))))  # type: ignore[arg-type]
    assert fitted
    for q, query in fitted.items():
        direct = searcher.analyze(ds.image_path(ds.queries.paths[q]).read_bytes())
        assert np.array_equal(direct.embedding, query.embedding)
        assert direct.verify_features is not None and query.verify_features is not None
        assert np.array_equal(direct.verify_features.xy, query.verify_features.xy)
        assert np.array_equal(direct.verify_words, query.verify_words)
    # The served index reports the cross-validation it was published with.
    metrics = searcher.loaded.manifest["metrics"]
    assert metrics["split"] == "cv" and metrics["folds"] == conf.split.folds and metrics["test"]["split"] == "test"
