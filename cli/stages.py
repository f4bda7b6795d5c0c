"""Build whatever is missing, in order: demo data -> features -> vectors -> model -> index.

Each stage is skipped when its artifact (named by the settings that produced it) already exists.
The index stage is composed here because it spans layers: the indexer stages the index, the search
layer fits the heads through the query path, the evaluation cross-validates the same fitting over
areas (evaluation/cv.py) for the figures the index is published with, and only then does the indexer
publish it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from common.pipeline import Pipeline, get_pipeline
from common.threads import single_threaded
from dataset import synthetic
from dataset.layout import Dataset, load_dataset
from dataset.split import load_split
from evaluation import cv, prior_cv
from indexer import build as index_build
from indexer import store
from indexer.store import LoadedIndex
from model import train, vectors
from model.vectors import vectorizer_path
from retrieval.heads import analyse_queries, fit_heads
from retrieval.searcher import Searcher
from retrieval.shards import ShardCalls


def ensure_data(data: Path | None, demo_dir: Path) -> Path:
    """The data folder to use: the given one, or the demo data (generated when missing)."""
    if data is not None:
        return data
    return synthetic.main(demo_dir, synthetic.confs["demo"])


def vectors_and_model(conf: Pipeline, dataset: Dataset, out_root: Path, jobs: int | None) -> tuple[Path, Path]:
    """The vectors file and the served model folder of `conf` (made when missing)."""
    vectors_path = vectors.main(conf, dataset, out_root, jobs)
    return vectors_path, train.main(conf, dataset, vectors_path, out_root)


def run_train(preset: str, dataset: Dataset, artifacts: Path, jobs: int | None = None) -> Path:
    """The preset's served model folder (fitted on every labelled query), with the vectors it needs,
    made when missing."""
    return vectors_and_model(get_pipeline(preset), dataset, store.data_dir(artifacts, dataset.root), jobs)[1]


def run_cv(preset: str, dataset: Dataset, artifacts: Path, jobs: int | None = None) -> Path:
    """The preset's area-fold cross-validation and test-split look (evaluation/cv.py), made when
    missing; returns its json file."""
    conf = get_pipeline(preset)
    out_root = store.data_dir(artifacts, dataset.root)
    return cv.main(conf, dataset, vectors.main(conf, dataset, out_root, jobs), out_root, jobs)


def run_prior_cv(
    preset: str,
    dataset: Dataset,
    artifacts: Path,
    scenarios: list[prior_cv.Scenario],
    seed: int,
    jobs: int | None = None,
) -> Path:
    """The preset's cross-validated searches with simulated position priors (evaluation/prior_cv.py)."""
    conf = get_pipeline(preset)
    out_root = store.data_dir(artifacts, dataset.root)
    return prior_cv.main(conf, dataset, vectors.main(conf, dataset, out_root, jobs), out_root, scenarios, seed, jobs)


def _current_matches(family: Path, model_dir: Path, conf: Pipeline, shards: int | None) -> Path | None:
    try:
        current = store.current_version(family)
        manifest = json.loads((current / "manifest.json").read_text(encoding="utf-8"))
    except (store.IndexLoadError, OSError, json.JSONDecodeError):
        return None  # nothing usable yet: build it
    same = manifest.get("model") == model_dir.name and manifest.get("conf") == conf.to_json()
    return current if same and shards in (None, manifest.get("shards", 1)) else None


class ShardEngine(Protocol):
    """Indexing elsewhere (cluster/indexing.py: RayEngine): others write a staged version's shards
    and serve them while the heads are fitted; this process holds no vectors."""

    def write(
        self, conf: Pipeline, dataset: Dataset, vectorizer_file: Path, encoder_file: Path, directory: Path, shards: int
    ) -> index_build.WrittenShards: ...

    def serve(self, directory: Path, shards: int) -> AbstractContextManager[ShardCalls]: ...


def run_index(
    preset: str,
    dataset: Dataset,
    artifacts: Path,
    jobs: int | None = None,
    force: bool = False,
    shards: int | None = None,
    engine: ShardEngine | None = None,
) -> Path:
    """The current index version of `preset`, built and published unless one of the same model and
    settings (and `shards`, if given) is current already (or `force`). The model is trained here;
    the map images are embedded by this process and `jobs` workers, or by `engine`, which writes the
    shards itself."""
    conf = get_pipeline(preset)
    out_root = store.data_dir(artifacts, dataset.root)
    vectors_path, model_dir = vectors_and_model(conf, dataset, out_root, jobs)
    if not force and (current := _current_matches(store.family_dir(out_root, preset), model_dir, conf, shards)):
        return current
    if engine is None:
        staged = index_build.build(conf, dataset, vectors_path, model_dir, out_root, jobs, shards=shards or 1)
        return index_build.publish(staged, _heads_and_metrics(staged, dataset, vectors_path, model_dir, out_root, jobs))
    return index_with(engine, conf, dataset, vectors_path, model_dir, out_root, shards or 2, jobs)


def index_with(
    engine: ShardEngine,
    conf: Pipeline,
    dataset: Dataset,
    vectors_path: Path,
    model_dir: Path,
    out_root: Path,
    shards: int,
    jobs: int | None = None,
    metrics: bool = True,
) -> Path:
    """A new version in `shards` written by `engine`, its heads fitted through the staged shards and
    (`metrics`) the preset's cross-validated figures added, published."""
    family = store.family_dir(out_root, conf.name)
    with store.staging(family) as directory:
        written = engine.write(
            conf, dataset, vectorizer_path(vectors_path), model_dir / "encoder.npz", directory, shards
        )
        staged = index_build.stage_written(conf, dataset, vectors_path, model_dir, directory, written, shards)
        with engine.serve(directory, shards) as client:

            def searcher_of(loaded: LoadedIndex) -> Searcher:
                return Searcher(loaded, shards=client)

            figures = _heads_and_metrics(staged, dataset, vectors_path, model_dir, out_root, jobs, searcher_of, metrics)
        return index_build.publish(staged, figures)


def _heads_and_metrics(
    staged: index_build.StagedIndex,
    dataset: Dataset,
    vectors_path: Path,
    model_dir: Path,
    out_root: Path,
    jobs: int | None,
    searcher_of: Callable[[LoadedIndex], Searcher] = Searcher,
    metrics: bool = True,
) -> dict[str, Any] | None:
    """Fit the staged index's heads on the validation queries; the figures it is published with."""
    if dataset.sim is None:
        return None
    conf = staged.loaded.pipeline
    split = load_split(model_dir / "split.json", dataset.queries.paths)
    # One query at a time, as the service runs them: single-threaded kernels are faster per query.
    with single_threaded():
        analysed = analyse_queries(searcher_of(staged.loaded), dataset, split["val"])
        fit_heads(staged, dataset, analysed, searcher_of)
    if not metrics:
        return None
    # What the served index will get on areas it never saw: the same fitting, cross-validated.
    figures = cv.CrossValidation.load(cv.main(conf, dataset, vectors_path, out_root, jobs))
    return dict(figures.cv, test=figures.test)


def build_all(data: Path | None, artifacts: Path, preset: str, jobs: int | None = None) -> Path:
    root = ensure_data(data, artifacts / "demo-data")
    return run_index(preset, load_dataset(root), artifacts, jobs)
