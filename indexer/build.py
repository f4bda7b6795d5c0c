"""Indexing stage: embed every map image, build the FAISS index, store the verification keypoints,
calibrate the scores and evaluate on held-out queries, then publish it all atomically."""

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
from features import local
from features.decode import ImageDecodeError
from features.extract import load_vectors, vectorizer_path
from features.orb import NoKeypointsError
from features.vectorize import Vectorizer
from indexer import store
from model.calibrate import fit_logistic
from pipeline.encoder import NumpyEncoder
from pipeline.presets import verify_features_conf
from pipeline.runtime import single_threaded
from pipeline.searcher import Searcher
from verification.geometric import MapFeatures, Verifier

log = logging.getLogger(__name__)


def family_dir(artifacts_data_dir: Path, preset: str) -> Path:
    return artifacts_data_dir / f"index-{preset}"


def build_map_features(
    conf: dict[str, Any], dataset: Dataset, vectorizer: Vectorizer, out_root: Path, workers: int | None
) -> MapFeatures:
    """Verification keypoints of every map image, with their visual words."""
    vconf = verify_features_conf(conf)
    local_store = local.LocalStore.load(local.main(vconf, dataset, out_root, workers, names=dataset.database.paths))
    row = local_store.row_of()
    feats = [local_store.get(row[p]) for p in dataset.database.paths]
    with single_threaded():  # thousands of small searches: library threads only add overhead
        words = [vectorizer.words(f.descriptors) if len(f.descriptors) else np.zeros(0, np.int64) for f in feats]
    return MapFeatures.build(list(range(len(dataset.database))), feats, words)


def calibrate_verification(searcher: Searcher, dataset: Dataset, rows: np.ndarray) -> list[float]:
    """Logistic head over (distance, log1p(inliers)) fitted on the shortlists of validation queries."""
    feats, labels = [], []
    for q in rows:
        try:
            query = searcher.analyze(dataset.image_path(dataset.queries.paths[q]).read_bytes())
        except (ImageDecodeError, NoKeypointsError):
            continue  # nothing to learn from this query
        hits = searcher.search_embedding(query.embedding, searcher.verifier.conf["n"])
        ids = [h.id for h in hits]
        inl = searcher.verifier.inliers(query.verify_features, query.verify_words, ids)
        feats.append(np.column_stack([[h.distance for h in hits], np.log1p(inl)]))
        labels.append(dataset.sim[q, ids])
    w = fit_logistic(np.concatenate(feats), np.concatenate(labels).astype(np.float64))
    return [float(v) for v in w]


def main(
    conf: dict[str, Any],
    dataset: Dataset,
    vectors_path: Path,
    model_dir: Path,
    out_root: Path,
    workers: int | None = None,
) -> Path:
    """Build and publish a new index version of all map images; returns its folder."""
    t0 = time.time()
    encoder = NumpyEncoder.load(model_dir / "encoder.npz")
    vectorizer = Vectorizer.load(vectorizer_path(vectors_path), conf["vector"])
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
    files = {
        "vectorizer.npz": vectorizer_path(vectors_path),
        "encoder.npz": model_dir / "encoder.npz",
        "split.json": model_dir / "split.json",
    }
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
    }
    verifier = None
    if conf["verify"] is not None:
        map_features = build_map_features(conf, dataset, vectorizer, out_root, workers)
        files["verify.npz"] = map_features.save(out_root / f".verify-{conf['preset']}.npz")
        # A prior head (closer and more inliers = more relevant) until validation queries calibrate it.
        verifier = Verifier(conf["verify"], map_features, vectorizer.n_words, head=[-2.0, 1.0, 0.0])
    by_id = {r.id: r for r in images}
    loaded = store.LoadedIndex("unpublished", model_dir, manifest, index, by_id, vectorizer, encoder, verifier)
    if dataset.sim is not None:
        split = load_split(model_dir / "split.json", dataset.queries.paths)
        # One query at a time, as the service runs them: single-threaded kernels are faster per query.
        with single_threaded():
            if verifier is not None:
                verifier.head = np.asarray(calibrate_verification(Searcher(loaded), dataset, split["val"]))
                manifest["verify_head"] = verifier.head.tolist()
            # Retrieval quality of this index on held-out queries, computed once here, served by the API.
            manifest["metrics"] = evaluate_searcher(Searcher(loaded), dataset, split["test"], "test").summary
    manifest["build_seconds"] = round(time.time() - t0, 2)
    out = store.publish(family_dir(out_root, conf["preset"]), index, images, files, manifest)
    if "verify.npz" in files:
        files["verify.npz"].unlink()  # staged here only to be copied into the version folder
    log.info("published index %s (%d images)", out, index.ntotal)
    return out
