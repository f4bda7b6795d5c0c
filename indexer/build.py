"""Indexing stage: embed every map image, build the FAISS index and the verification keypoints
(`build`), then publish it all as a new version, atomically (`publish`).

Between the two, the caller may fit the verification head and measure the index on held-out queries
through the query path (cli/stages.py does): both need the retrieval layer, which sits above this one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.clock import utc_timestamp
from common.files import atomic_write_text, sha256_bytes
from common.pipeline import FeaturesConf, Pipeline
from common.threads import single_threaded
from dataset.layout import Dataset
from features import local
from features.decode import ImageDecodeError
from features.extract import image_to_features
from features.orb import NoKeypointsError, OrbFeatures
from indexer import store
from indexer.kinds import build_index
from model.encoder import NumpyEncoder
from model.vectorize import Vectorizer
from model.vectors import load_vectors, vectorizer_path
from model.verify import MapFeatures, Verifier

log = logging.getLogger(__name__)

# Until validation queries calibrate it: closer and more inliers = more relevant.
PRIOR_VERIFY_HEAD = [-2.0, 1.0, 0.0]


def build_map_features(
    conf: Pipeline, dataset: Dataset, vectorizer: Vectorizer, out_root: Path, jobs: int | None
) -> MapFeatures:
    """Verification keypoints of every map image, with their visual words."""
    vconf = conf.verify_features
    local_store = local.LocalStore.load(local.main(vconf, dataset, out_root, jobs, names=dataset.database.paths))
    row = local_store.row_of()
    feats = [local_store.get(row[p]) for p in dataset.database.paths]
    with single_threaded():  # thousands of small searches: library threads only add overhead
        words = [vectorizer.words(f.descriptors) if len(f.descriptors) else np.zeros(0, np.int64) for f in feats]
    return MapFeatures.build(list(range(len(dataset.database))), feats, words)


@dataclass
class StagedIndex:
    """A complete index in memory, searchable, not yet published."""

    loaded: store.LoadedIndex
    family: Path
    files: dict[str, Path]  # version file name -> where it is now
    staged: list[Path] = field(default_factory=list)  # files written only to be copied in, removed after
    t0: float = field(default_factory=time.time)
    shards: int = 1  # published split into this many shards by image id (indexer/store.py)
    # The staging folder (store.staging) holding the version's files, when others wrote its shards
    # (stage_written); None: the index is in memory, written at publish.
    directory: Path | None = None

    def set_verify_head(self, head: list[float]) -> None:
        assert self.loaded.verifier is not None
        self.loaded.verifier.head = np.asarray(head, np.float64)
        self.loaded.manifest["verify_head"] = [float(v) for v in head]

    def set_location_head(self, head: list[float]) -> None:
        self.loaded.manifest["location_head"] = [float(v) for v in head]

    def set_prior_heads(self, heads: dict[str, list[float]]) -> None:
        self.loaded.manifest["prior_heads"] = {k: [float(v) for v in h] for k, h in heads.items()}

    def set_heading_head(self, head: list[float]) -> None:
        self.loaded.manifest["heading_head"] = [float(v) for v in head]

    def set_expand_prior(self, prior: float) -> None:
        assert self.loaded.verifier is not None
        self.loaded.verifier.expand_prior = float(prior)
        self.loaded.manifest["verify_expand_prior"] = float(prior)


@dataclass
class MapArrays:
    """What indexing computes for the map images, in database.json order, by whichever engine."""

    embeddings: np.ndarray  # (n, dim) float32
    ok: np.ndarray  # (n,) bool: False for an image without features (it gets the zero vector's embedding)
    keypoints: MapFeatures | None  # verification keypoints, for presets that verify


@dataclass
class WrittenShards:
    """What the writers of a version's shards (cluster/indexing.py) tell its publisher: no vectors or
    keypoints, only which images had features and what each shard's files are."""

    ok: np.ndarray  # (n,) bool, in database.json order: False for an image without features
    kinds: list[str]  # each shard's index kind
    checksums: dict[str, str]  # every shard file's sha256


def image_vector(data: bytes, conf: Pipeline, vectorizer: Vectorizer) -> np.ndarray | None:
    """The aggregate vector of one map image, as the vectors stage makes it (None: no features)."""
    try:
        feats = image_to_features(data, conf.features)
    except (ImageDecodeError, NoKeypointsError):
        return None
    return vectorizer(feats) if len(feats.descriptors) else None


def image_keypoints(data: bytes, vconf: FeaturesConf, vectorizer: Vectorizer) -> tuple[OrbFeatures, np.ndarray]:
    """Verification keypoints of one map image and their visual words, as build_map_features makes them."""
    try:
        feats = image_to_features(data, vconf)
    except (ImageDecodeError, NoKeypointsError):
        feats = OrbFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8))
    words = vectorizer.words(feats.descriptors) if len(feats.descriptors) else np.zeros(0, np.int64)
    return feats, words


def embed_map_images(
    conf: Pipeline, dataset: Dataset, vectors_path: Path, model_dir: Path, out_root: Path, jobs: int | None
) -> MapArrays:
    """The embedded engine: embeddings from the vectors stage's cache, keypoints in `jobs` processes."""
    encoder = NumpyEncoder.load(model_dir / "encoder.npz")
    xd, ok = load_vectors(vectors_path, dataset.database.paths)
    keypoints = None
    if conf.verify is not None:
        vectorizer = Vectorizer.load(vectorizer_path(vectors_path), conf.vector)
        keypoints = build_map_features(conf, dataset, vectorizer, out_root, jobs)
    return MapArrays(encoder.embed(xd), ok, keypoints)


def _head_files(vectors_path: Path, model_dir: Path) -> dict[str, Path]:
    """The model files every version holds: version file name -> where it is now."""
    return {
        "vectorizer.npz": vectorizer_path(vectors_path),
        "encoder.npz": model_dir / "encoder.npz",
        "split.json": model_dir / "split.json",
    }


def _manifest(conf: Pipeline, dataset: Dataset, model_dir: Path, ok: np.ndarray) -> dict[str, Any]:
    model_manifest = (model_dir / "manifest.json").read_text(encoding="utf-8")
    return {
        "preset": conf.name,
        "conf": conf.to_json(),
        "data": str(dataset.root),
        "model": model_dir.name,
        # The model's files and their hashes, as its own manifest lists them.
        "model_files": json.loads(model_manifest)["files"],
        "model_manifest_sha256": sha256_bytes(model_manifest.encode()),
        "images_without_features": int((~ok).sum()),
    }


def build(
    conf: Pipeline,
    dataset: Dataset,
    vectors_path: Path,
    model_dir: Path,
    out_root: Path,
    jobs: int | None = None,
    arrays: MapArrays | None = None,
    shards: int = 1,
) -> StagedIndex:
    """Stage a new index version of all map images, embedded with the model in `model_dir`: by this
    process (`jobs` extraction processes) unless `arrays` were computed elsewhere (cluster/indexing.py).
    It is published split into `shards` by image id."""
    t0 = time.time()
    arrays = arrays or embed_map_images(conf, dataset, vectors_path, model_dir, out_root, jobs)
    encoder = NumpyEncoder.load(model_dir / "encoder.npz")
    vectorizer = Vectorizer.load(vectorizer_path(vectors_path), conf.vector)
    if arrays.embeddings.shape != (len(dataset.database), encoder.dim):
        raise ValueError(f"embeddings of shape {arrays.embeddings.shape} for {len(dataset.database)} map images")
    # FAISS ids are the map images' rows in database.json, kept in the id map file as well; the
    # index's kind follows the collection's size (indexer/kinds.py).
    ids = np.arange(len(dataset.database), dtype=np.int64)
    index = build_index(conf.index, arrays.embeddings, ids)
    images = {i: store.ImageRecord(i, dataset.database.paths[i], dataset.database.location(i)) for i in ids.tolist()}
    files = _head_files(vectors_path, model_dir)
    manifest = _manifest(conf, dataset, model_dir, arrays.ok)
    verifier, staged = None, []
    if conf.verify is not None:
        if arrays.keypoints is None:
            raise ValueError("the preset verifies, but no verification keypoints were computed")
        files["verify.npz"] = arrays.keypoints.save(out_root / f".verify-{conf.name}.npz")
        staged.append(files["verify.npz"])
        verifier = Verifier(conf.verify, conf.expand, arrays.keypoints, vectorizer.n_words, head=PRIOR_VERIFY_HEAD)
        manifest["verify_head"] = PRIOR_VERIFY_HEAD
    family = store.family_dir(out_root, conf.name)
    loaded = store.LoadedIndex(
        "unpublished", family / "unpublished", manifest, index, images, vectorizer, encoder, verifier
    )
    return StagedIndex(loaded, family, files, staged, t0, shards)


def stage_written(
    conf: Pipeline,
    dataset: Dataset,
    vectors_path: Path,
    model_dir: Path,
    directory: Path,
    written: WrittenShards,
    shards: int,
) -> StagedIndex:
    """The head of a version whose `shards` were written into the staging folder `directory` by others
    (cluster/indexing.py): the id map and models are added, with a manifest that makes the folder
    loadable (heads not fitted yet), and the head is loaded, to be searched through the shards."""
    t0 = time.time()
    if len(written.ok) != len(dataset.database) or len(written.kinds) != shards:
        raise ValueError(f"{len(written.ok)} images in {len(written.kinds)} shards written, not {shards}")
    encoder = NumpyEncoder.load(model_dir / "encoder.npz")
    images = [
        store.ImageRecord(i, dataset.database.paths[i], dataset.database.location(i))
        for i in range(len(dataset.database))
    ]
    files = _head_files(vectors_path, model_dir)
    manifest = _manifest(conf, dataset, model_dir, written.ok) | {"dim": encoder.dim, "index_kinds": written.kinds}
    if conf.verify is not None:
        manifest["verify_head"] = PRIOR_VERIFY_HEAD
    checksums = written.checksums | store.write_head(directory, images, files)
    manifest = store.staged_manifest(dict(manifest, checksums=checksums), images, shards)
    atomic_write_text(directory / "manifest.json", json.dumps(manifest, indent=1))
    try:
        head = store.load(directory, store.Part(None, shards))
    except store.IndexLoadError as e:
        raise ValueError(f"the written shards do not make a version: {e}") from e
    return StagedIndex(head, directory.parent, {}, [], t0, shards, directory)


def publish(staged: StagedIndex, metrics: dict[str, Any] | None = None) -> Path:
    """Publish a staged index as the family's new current version (with its held-out `metrics`,
    if measured); returns the version folder."""
    manifest = dict(staged.loaded.manifest, created=utc_timestamp(), build_seconds=round(time.time() - staged.t0, 2))
    if metrics is not None:
        manifest["metrics"] = metrics
    images = [staged.loaded.images[i] for i in sorted(staged.loaded.images)]
    if staged.directory is not None:
        family, checksums = staged.family, manifest["checksums"]
        out = store.publish_staged(family, staged.directory, images, manifest, staged.shards, checksums)
        log.info("published index %s (%d images, shards written by others)", out, len(images))
        return out
    try:
        out = store.publish(staged.family, staged.loaded.index, images, staged.files, manifest, staged.shards)
    finally:
        for f in staged.staged:
            f.unlink(missing_ok=True)
    log.info("published index %s (%d images)", out, staged.loaded.index.ntotal)
    return out
