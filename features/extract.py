"""Features stage: every image of a data folder -> its fixed-length vector, cached on disk.

`image_to_features` is the one function that turns image bytes into local features; the service
calls it for uploads and this stage calls it for the data folder, so both sides see the same features.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from dataset.layout import Dataset
from features import local
from features.decode import ImageDecodeError, decode_image
from features.orb import NoKeypointsError, OrbFeatures, extract_orb
from features.vectorize import Vectorizer
from pipeline.presets import conf_hash
from pipeline.runtime import single_threaded, single_threaded_kernels

log = logging.getLogger(__name__)
T = TypeVar("T")


def image_to_features(data: bytes, conf: dict[str, Any]) -> OrbFeatures:
    """Image bytes -> ORB features. Raises ImageDecodeError or NoKeypointsError."""
    gray = decode_image(data, conf["image"]["max_side"])
    return extract_orb(gray, conf["features"])


def _vector_of_file(path: str, conf: dict[str, Any]) -> np.ndarray | None:
    try:
        return Vectorizer(conf["vector"])(image_to_features(Path(path).read_bytes(), conf))
    except (ImageDecodeError, NoKeypointsError):
        return None


def _apply(job: tuple[Callable[[str, dict[str, Any]], T], str, dict[str, Any]]) -> T:
    fn, path, conf = job
    return fn(path, conf)


def map_files(
    fn: Callable[[str, dict[str, Any]], T],
    paths: Iterable[Path],
    conf: dict[str, Any],
    workers: int | None = None,
    desc: str = "features",
) -> Iterator[T]:
    """fn(path, conf) for every file, in order, on every core, with a progress bar.

    Files are read inside the workers one at a time, so no more than a few images are in memory.
    Each worker process runs its numeric libraries on one thread: with one process per core, their
    own thread pools (BLAS, OpenMP in FAISS, OpenCV) would oversubscribe the cores (bench/index_build.py).
    """
    jobs = [(fn, str(p), conf) for p in paths]
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=None)
    if workers == 1:
        results: Iterator[T] = map(_apply, jobs)
    else:
        # Spawned, not forked: a child forked after OpenCV's or OpenMP's thread pools have run in this
        # process hangs in cv2.setNumThreads (`make run` did, right after generating the demo data).
        pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=single_threaded_kernels
        )
        results = pool.map(_apply, jobs, chunksize=16)
    try:
        for result in results:
            yield result
            bar.update()
    finally:
        bar.close()
        if workers != 1:
            pool.shutdown(cancel_futures=True)


def features_tag(conf: dict[str, Any]) -> str:
    return f"{conf['vector']['name']}-{conf_hash(conf, 'image', 'features', 'vector')}"


def vectorizer_path(vectors_path: Path) -> Path:
    """The fitted vectorizer saved beside a vectors file."""
    return vectors_path.with_name(vectors_path.name.replace("vectors-", "vectorizer-", 1))


def _save_vectors(out: Path, names: list[str], vectors: np.ndarray, ok: np.ndarray) -> Path:
    if not ok.all():
        log.warning("%d of %d images have no ORB features; they get a zero vector", (~ok).sum(), len(ok))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, names=np.array(names), vectors=vectors, ok=ok)
    os.replace(tmp, out)  # never leave a half-written cache under the final name
    return out


def main(conf: dict[str, Any], dataset: Dataset, out_dir: Path, workers: int | None = None) -> Path:
    """Vectors of all map and query images of `dataset`, keyed by image path; returns the file.

    A vectorizer that learns (vocabulary, idf) is fitted on the map images only: they are the
    indexed database, with no query and no ground truth involved.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"vectors-{features_tag(conf)}.npz"
    if out.exists() and vectorizer_path(out).exists():
        return out
    names = dataset.database.paths + dataset.queries.paths
    vectorizer = Vectorizer(conf["vector"])
    vectors = np.zeros((len(names), vectorizer.dim), dtype=np.float32)
    ok = np.zeros(len(names), dtype=bool)
    if not vectorizer.needs_fit:
        files = [dataset.image_path(n) for n in names]
        for i, vec in enumerate(map_files(_vector_of_file, files, conf, workers)):
            if vec is not None:
                vectors[i], ok[i] = vec, True
    else:
        store = local.LocalStore.load(local.main(conf, dataset, out_dir, workers))
        row = store.row_of()
        map_sets = [store.get(row[n]).descriptors for n in dataset.database.paths]
        vectorizer = vectorizer.fit([d for d in map_sets if len(d)], seed=int(conf["model"]["seed"]))
        with single_threaded():  # one image at a time: library threads only add overhead
            for i, name in enumerate(tqdm(names, desc="aggregate", unit="img", disable=None)):
                feats = store.get(row[name])
                if len(feats.descriptors):
                    vectors[i], ok[i] = vectorizer(feats), True
    vectorizer.save(vectorizer_path(out))
    return _save_vectors(out, names, vectors, ok)


def load_vectors(path: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Vectors and ok-mask for `names`, in that order, from a cache written by `main`."""
    with np.load(path, allow_pickle=False) as z:
        row = {str(n): i for i, n in enumerate(z["names"])}
        missing = [n for n in names if n not in row]
        if missing:
            raise KeyError(f"{path}: no vectors for {len(missing)} images, e.g. {missing[0]!r}")
        idx = np.array([row[n] for n in names], dtype=np.int64)
        return z["vectors"][idx], z["ok"][idx]
