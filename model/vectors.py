"""Vectors stage: the local features of every image of a data folder -> its fixed-length vector,
cached on disk with the fitted vectorizer beside it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.files import atomic_savez
from common.parallel import map_files
from common.pipeline import Pipeline
from common.threads import single_threaded
from dataset.layout import Dataset
from features import local
from features.decode import ImageDecodeError
from features.extract import image_to_features
from features.orb import NoKeypointsError
from model.vectorize import Vectorizer

log = logging.getLogger(__name__)


def _vector_of_file(path: str, conf: Pipeline) -> np.ndarray | None:
    try:
        return Vectorizer(conf.vector)(image_to_features(Path(path).read_bytes(), conf.features))
    except (ImageDecodeError, NoKeypointsError):
        return None


def features_tag(conf: Pipeline) -> str:
    return f"{conf.vector.name}-{conf.digest('features', 'vector')}"


def vectorizer_path(vectors_path: Path) -> Path:
    """The fitted vectorizer saved beside a vectors file."""
    return vectors_path.with_name(vectors_path.name.replace("vectors-", "vectorizer-", 1))


def main(conf: Pipeline, dataset: Dataset, out_dir: Path, jobs: int | None = None) -> Path:
    """Vectors of all map and query images of `dataset`, keyed by image path; returns the file.

    A vectorizer that learns (vocabulary, idf) is fitted on the map images only: they are the
    indexed database, with no query and no ground truth involved.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"vectors-{features_tag(conf)}.npz"
    if out.exists() and vectorizer_path(out).exists():
        return out
    names = dataset.database.paths + dataset.queries.paths
    vectorizer = Vectorizer(conf.vector)
    vectors = np.zeros((len(names), vectorizer.dim), dtype=np.float32)
    ok = np.zeros(len(names), dtype=bool)
    if not vectorizer.needs_fit:
        files = [dataset.image_path(n) for n in names]
        for i, vec in enumerate(map_files(_vector_of_file, files, conf, jobs)):
            if vec is not None:
                vectors[i], ok[i] = vec, True
    else:
        store = local.LocalStore.load(local.main(conf.features, dataset, out_dir, jobs))
        row = store.row_of()
        map_sets = [store.get(row[n]).descriptors for n in dataset.database.paths]
        vectorizer = vectorizer.fit([d for d in map_sets if len(d)], seed=conf.vector.seed)
        with single_threaded():  # one image at a time: library threads only add overhead
            for i, name in enumerate(tqdm(names, desc="aggregate", unit="img", disable=None)):
                feats = store.get(row[name])
                if len(feats.descriptors):
                    vectors[i], ok[i] = vectorizer(feats), True
    if not ok.all():
        log.warning("%d of %d images have no ORB features; they get a zero vector", (~ok).sum(), len(ok))
    vectorizer.save(vectorizer_path(out))
    # Written last: its presence says the vectorizer beside it is complete too.
    return atomic_savez(out, names=np.array(names), vectors=vectors, ok=ok)


def load_vectors(path: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Vectors and ok-mask for `names`, in that order, from a cache written by `main`."""
    with np.load(path, allow_pickle=False) as z:
        row = {str(n): i for i, n in enumerate(z["names"])}
        missing = [n for n in names if n not in row]
        if missing:
            raise KeyError(f"{path}: no vectors for {len(missing)} images, e.g. {missing[0]!r}")
        idx = np.array([row[n] for n in names], dtype=np.int64)
        return z["vectors"][idx], z["ok"][idx]
