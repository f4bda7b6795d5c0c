"""Indexing stage: embed every map image, build the FAISS index, evaluate it, publish it atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from dataset.layout import Dataset
from dataset.split import load_split
from evaluation.run import evaluate_searcher
from features.extract import load_vectors, vectorizer_path
from features.vectorize import Vectorizer
from indexer import store
from pipeline.encoder import NumpyEncoder
from pipeline.searcher import Searcher

log = logging.getLogger(__name__)


def family_dir(artifacts_data_dir: Path, preset: str) -> Path:
    return artifacts_data_dir / f"index-{preset}"


def main(conf: dict[str, Any], dataset: Dataset, vectors_path: Path, model_dir: Path, out_root: Path) -> Path:
    """Build and publish a new index version of all map images; returns its folder."""
    t0 = time.time()
    encoder = NumpyEncoder.load(model_dir / "encoder.npz")
    xd, ok = load_vectors(vectors_path, dataset.database.paths)
    emb = encoder.embed(xd)
    index = store.new_flat_index(encoder.dim)
    # FAISS ids are the map images' rows in database.json, kept in the id map file as well.
    ids = np.arange(len(dataset.database), dtype=np.int64)
    index.add_with_ids(emb, ids)
    images = [
        store.ImageRecord(int(i), dataset.database.paths[i], tuple(float(v) for v in dataset.database.loc[i]))
        for i in ids
    ]
    model_manifest = (model_dir / "manifest.json").read_text(encoding="utf-8")
    manifest: dict[str, Any] = {
        "preset": conf["preset"],
        "conf": conf,
        "data": str(dataset.root),
        "model": model_dir.name,
        # The model's files and their hashes, as its own manifest lists them.
        "model_files": json.loads(model_manifest)["files"],
        "model_manifest_sha256": hashlib.sha256(model_manifest.encode()).hexdigest(),
        "images_without_features": int((~ok).sum()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.time() - t0, 2),
    }
    if dataset.sim is not None:
        # Retrieval quality of this index on held-out queries, computed once here, served by the API.
        split = load_split(model_dir / "split.json", dataset.queries.paths)
        vectorizer = Vectorizer.load(vectorizer_path(vectors_path), conf["vector"])
        by_id = {r.id: r for r in images}
        loaded = store.LoadedIndex("unpublished", model_dir, manifest, index, by_id, vectorizer, encoder)
        manifest["metrics"] = evaluate_searcher(Searcher(loaded), dataset, split["test"], "test").summary
    files = {
        "vectorizer.npz": vectorizer_path(vectors_path),
        "encoder.npz": model_dir / "encoder.npz",
        "split.json": model_dir / "split.json",
    }
    out = store.publish(family_dir(out_root, conf["preset"]), index, images, files, manifest)
    log.info("published index %s (%d images)", out, index.ntotal)
    return out
