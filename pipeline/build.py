"""Build whatever is missing, in order: demo data -> features -> model -> index.

Each stage is skipped when its artifact (named by the settings that produced it) already exists.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dataset import synthetic
from dataset.layout import Dataset, data_tag, load_dataset
from features import extract
from indexer import build as index_build
from indexer import store
from model import train
from pipeline.presets import get_conf

log = logging.getLogger(__name__)


def ensure_data(data: Path | None, demo_dir: Path) -> Path:
    """The data folder to use: the given one, or the demo data (generated when missing)."""
    if data is not None:
        return data
    return synthetic.main(demo_dir, synthetic.confs["demo"])


def data_artifacts(artifacts: Path, root: Path) -> Path:
    return artifacts / data_tag(root)


def index_family(artifacts: Path, root: Path, preset: str) -> Path:
    return index_build.family_dir(data_artifacts(artifacts, root), preset)


def run_features(preset: str, dataset: Dataset, artifacts: Path, workers: int | None = None) -> Path:
    return extract.main(get_conf(preset), dataset, data_artifacts(artifacts, dataset.root), workers)


def run_train(preset: str, dataset: Dataset, artifacts: Path, workers: int | None = None) -> Path:
    vectors = run_features(preset, dataset, artifacts, workers)
    return train.main(get_conf(preset), dataset, vectors, data_artifacts(artifacts, dataset.root))


def run_index(preset: str, dataset: Dataset, artifacts: Path, workers: int | None = None, force: bool = False) -> Path:
    conf = get_conf(preset)
    out_root = data_artifacts(artifacts, dataset.root)
    vectors = extract.main(conf, dataset, out_root, workers)
    model_dir = train.main(conf, dataset, vectors, out_root)
    if not force:
        try:
            current = store.current_version(index_build.family_dir(out_root, preset))
            manifest = json.loads((current / "manifest.json").read_text(encoding="utf-8"))
            if manifest.get("model") == model_dir.name and manifest.get("conf") == conf:
                return current
        except (store.IndexLoadError, OSError, json.JSONDecodeError):
            pass  # nothing usable yet: build it
    return index_build.main(conf, dataset, vectors, model_dir, out_root, workers)


def build_all(data: Path | None, artifacts: Path, preset: str, workers: int | None = None) -> Path:
    root = ensure_data(data, artifacts / "demo-data")
    dataset = load_dataset(root)
    return run_index(preset, dataset, artifacts, workers)
