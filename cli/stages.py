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
from pathlib import Path

from common.pipeline import Pipeline, get_pipeline
from common.threads import single_threaded
from dataset import synthetic
from dataset.layout import Dataset, load_dataset
from dataset.split import load_split
from evaluation import cv, prior_cv
from indexer import build as index_build
from indexer import store
from model import train, vectors
from retrieval.heads import analyse_queries, fit_heads
from retrieval.searcher import Searcher


def ensure_data(data: Path | None, demo_dir: Path) -> Path:
    """The data folder to use: the given one, or the demo data (generated when missing)."""
    if data is not None:
        return data
    return synthetic.main(demo_dir, synthetic.confs["demo"])


def _vectors_and_model(conf: Pipeline, dataset: Dataset, out_root: Path, jobs: int | None) -> tuple[Path, Path]:
    vectors_path = vectors.main(conf, dataset, out_root, jobs)
    return vectors_path, train.main(conf, dataset, vectors_path, out_root)


def run_train(preset: str, dataset: Dataset, artifacts: Path, jobs: int | None = None) -> Path:
    """The preset's served model folder (fitted on every labelled query), with the vectors it needs,
    made when missing."""
    return _vectors_and_model(get_pipeline(preset), dataset, store.data_dir(artifacts, dataset.root), jobs)[1]


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


# Computes the map images' embeddings and keypoints elsewhere (cluster/indexing.py on Ray):
# (pipeline, dataset, vectors file, model folder) -> MapArrays.
Engine = Callable[[Pipeline, Dataset, Path, Path], index_build.MapArrays]


def run_index(
    preset: str,
    dataset: Dataset,
    artifacts: Path,
    jobs: int | None = None,
    force: bool = False,
    shards: int | None = None,
    engine: Engine | None = None,
) -> Path:
    """The current index version of `preset`, built and published unless one of the same model and
    settings (and `shards`, if given) is current already (or `force`). The model is trained here;
    `engine`, if given, embeds the map images (default: this process and `jobs` workers)."""
    conf = get_pipeline(preset)
    out_root = store.data_dir(artifacts, dataset.root)
    vectors_path, model_dir = _vectors_and_model(conf, dataset, out_root, jobs)
    if not force and (current := _current_matches(store.family_dir(out_root, preset), model_dir, conf, shards)):
        return current
    arrays = engine(conf, dataset, vectors_path, model_dir) if engine is not None else None
    staged = index_build.build(conf, dataset, vectors_path, model_dir, out_root, jobs, arrays, shards or 1)
    metrics = None
    if dataset.sim is not None:
        split = load_split(model_dir / "split.json", dataset.queries.paths)
        # One query at a time, as the service runs them: single-threaded kernels are faster per query.
        with single_threaded():
            fit_heads(staged, dataset, analyse_queries(Searcher(staged.loaded), dataset, split["val"]))
        # What the served index will get on areas it never saw: the same fitting, cross-validated.
        figures = cv.CrossValidation.load(cv.main(conf, dataset, vectors_path, out_root, jobs))
        metrics = dict(figures.cv, test=figures.test)
    return index_build.publish(staged, metrics)


def build_all(data: Path | None, artifacts: Path, preset: str, jobs: int | None = None) -> Path:
    root = ensure_data(data, artifacts / "demo-data")
    return run_index(preset, load_dataset(root), artifacts, jobs)
