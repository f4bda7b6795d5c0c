#!/usr/bin/env python3
"""Index build time of all map images, from their files, with N worker processes.

    python bench/index_build.py --data ../shared/datasets/london --jobs 2

What `imgsearch index` does per map image, with the fitted vocabulary and encoder of the served
index version (so no k-means or training is timed), in a fresh temporary folder so no cache helps:
1. vectors: decode, the preset's ORB, VLAD (features.extract.map_files: a process pool with a
   progress bar; each worker reads its files one at a time), embedded in batches as they arrive
   and added to a FAISS index, so neither the images nor all their vectors are held at once;
2. verification keypoints: indexer.build.build_map_features (the indexer's own function).
Part of the suite: bench/run.py runs it in a process of its own, once with every core and once pinned
to one core (pinned before exec, so that the libraries size their thread pools for it), and records
the JSON line it prints in its own section of bench/results.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from common.parallel import map_files
from common.pipeline import Pipeline, VectorConf
from common.settings import Settings
from dataset.layout import DatasetError, load_dataset
from features.decode import ImageDecodeError
from features.extract import image_to_features
from features.orb import NoKeypointsError
from indexer import store
from indexer.build import build_map_features
from model.vectorize import Vectorizer

BATCH = 64


@functools.lru_cache(maxsize=1)
def _vectorizer(path: str, conf: VectorConf) -> Vectorizer:
    """Loaded once per worker process."""
    return Vectorizer.load(Path(path), conf)


def _map_vector(path: str, job: tuple[Pipeline, str]) -> np.ndarray | None:
    conf, vectorizer_path = job
    try:
        features = image_to_features(Path(path).read_bytes(), conf.features)
    except (ImageDecodeError, NoKeypointsError):
        return None
    return _vectorizer(vectorizer_path, conf.vector)(features)


def build(settings: Settings, jobs: int) -> dict[str, Any]:
    dataset = load_dataset(settings.data_root)
    loaded = store.load(
        store.current_version(store.index_family(settings.artifacts, settings.data_root, settings.preset))
    )
    conf = (loaded.pipeline, str(loaded.directory / "vectorizer.npz"))
    files = [dataset.image_path(p) for p in dataset.database.paths]
    for f in files:  # the same page cache for every run: read each file once before timing
        f.read_bytes()
    encoder, vectorizer = loaded.encoder, loaded.vectorizer
    t0 = time.perf_counter()
    cpu0 = sum(getattr(resource.getrusage(resource.RUSAGE_SELF), f) for f in ("ru_utime", "ru_stime"))
    index = store.new_flat_index(encoder.dim)
    batch: list[np.ndarray] = []
    ids: list[int] = []

    def flush() -> None:
        if batch:
            # While the worker processes run, one BLAS thread here: the cores are theirs.
            with threadpool_limits(1 if jobs > 1 else None):
                emb = encoder.embed(np.stack(batch))
            index.add_with_ids(emb, np.array(ids, dtype=np.int64))
            batch.clear()
            ids.clear()

    for i, vec in enumerate(map_files(_map_vector, files, conf, jobs, desc="vectors")):
        batch.append(vec if vec is not None else np.zeros(encoder.input_dim, np.float32))
        ids.append(i)
        if len(batch) == BATCH:
            flush()
    flush()
    vectors_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="imgsearch-bench-") as tmp:
        t1 = time.perf_counter()
        map_features = build_map_features(loaded.pipeline, dataset, vectorizer, Path(tmp), jobs)
        verify_s = time.perf_counter() - t1
    self_, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = self_.ru_utime + self_.ru_stime + children.ru_utime + children.ru_stime - cpu0
    return {
        "jobs": jobs,
        "images": len(files),
        "indexed": int(index.ntotal),
        "verify_keypoints": len(map_features.xy),
        "vectors_s": round(vectors_s, 2),
        "verify_s": round(verify_s, 2),
        "total_s": round(vectors_s + verify_s, 2),
        "cpu_s": round(cpu_s, 1),  # user + system, this process and its workers
        "load_avg": [round(v, 2) for v in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--artifacts", type=Path, default=Path(__file__).resolve().parents[1] / "artifacts")
    p.add_argument("--preset", default=Settings().preset)
    p.add_argument("-j", "--jobs", type=int, required=True, help="feature extraction processes")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    try:
        result = build(Settings(data=args.data, artifacts=args.artifacts, preset=args.preset), args.jobs)
    except (DatasetError, store.IndexLoadError, OSError, ValueError) as e:
        print(f"index_build: {e} (build the index first: imgsearch build)", file=sys.stderr)
        return 2
    print("INDEX_BUILD_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
