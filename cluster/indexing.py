"""Indexing on a Ray cluster (`imgsearch index --engine ray`): the map images' aggregate vectors,
embeddings and verification keypoints are computed by a Ray Data actor pool; the index is then staged,
calibrated, measured and published, split into shards, by the same code as the embedded engine
(indexer/build.py, cli/stages.py), so the two engines write the same version format and vectors.

Every node reads the images and the model from the same paths: on a real cluster, shared storage
(README, "On a Ray cluster").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import numpy as np

from common.files import npz_arrays, npz_bytes
from common.pipeline import Pipeline
from common.threads import single_threaded_kernels
from dataset.layout import Dataset
from features.orb import OrbFeatures
from indexer.build import MapArrays, image_keypoints, image_vector
from model.encoder import NumpyEncoder
from model.vectorize import Vectorizer
from model.vectors import vectorizer_path
from model.verify import MapFeatures, keypoint_arrays, keypoints_of_arrays

log = logging.getLogger(__name__)

BATCH = 16  # images per actor call: enough to amortise one matrix product of the encoder


class Embedder:
    """A Ray Data actor: loads the vectorizer and encoder once and uses one library thread, since the
    actor pool (one actor per CPU) is the parallelism."""

    def __init__(self, conf: Pipeline, vectorizer_file: str, encoder_file: str) -> None:
        single_threaded_kernels()
        self.conf = conf
        self.vconf = conf.verify_features if conf.verify is not None else None
        self.vectorizer = Vectorizer.load(Path(vectorizer_file), conf.vector)
        self.encoder = NumpyEncoder.load(Path(encoder_file))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        vectors = np.zeros((n, self.encoder.input_dim), np.float32)
        ok = np.zeros(n, bool)
        keypoints = []
        for j, path in enumerate(batch["path"]):
            data = Path(str(path)).read_bytes()
            v = image_vector(data, self.conf, self.vectorizer)
            if v is not None:
                vectors[j], ok[j] = v, True
            if self.vconf is not None:
                feats, words = image_keypoints(data, self.vconf, self.vectorizer)
                keypoints.append(npz_bytes(**keypoint_arrays(feats, words)))
        out = {"id": batch["id"], "ok": ok, "embedding": self.encoder.embed(vectors)}
        if self.vconf is not None:
            out["keypoints"] = np.array(keypoints, dtype=object)
        return out


def _unpack(blob: bytes) -> tuple[OrbFeatures, np.ndarray]:
    return keypoints_of_arrays(npz_arrays(blob))


def embed_map_images(
    conf: Pipeline, dataset: Dataset, vectors_path: Path, model_dir: Path, actors: int | None = None
) -> MapArrays:
    """The engine of `imgsearch index --engine ray` (cli/stages.py: Engine): the model of `model_dir`
    and the vectorizer fitted beside `vectors_path`."""
    return embed_with(conf, dataset, vectorizer_path(vectors_path), model_dir / "encoder.npz", actors)


def embed_with(
    conf: Pipeline, dataset: Dataset, vectorizer_file: Path, encoder_file: Path, actors: int | None = None
) -> MapArrays:
    """MapArrays of every map image, computed on the Ray cluster this process is connected to
    (ray.init first) by `actors` actors of one CPU each (default: one per CPU of the cluster)."""
    import ray

    encoder = NumpyEncoder.load(encoder_file)
    n = len(dataset.database)
    if actors is None:
        actors = max(1, int(ray.cluster_resources().get("CPU", 1)))
    items = [{"id": i, "path": str(dataset.image_path(p).resolve())} for i, p in enumerate(dataset.database.paths)]
    out = ray.data.from_items(items, override_num_blocks=max(1, min(n, actors * 8))).map_batches(
        Embedder,
        fn_constructor_kwargs={
            "conf": conf,
            "vectorizer_file": str(vectorizer_file.resolve()),
            "encoder_file": str(encoder_file.resolve()),
        },
        batch_size=BATCH,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
    )
    embeddings = np.zeros((n, encoder.dim), np.float32)
    ok = np.zeros(n, bool)
    seen = np.zeros(n, bool)
    keypoints: list[tuple[OrbFeatures, np.ndarray] | None] = [None] * n
    # batch_format="numpy": each batch is column -> array (Ray's type is the union of every format)
    batches = cast(Iterable[dict[str, np.ndarray]], out.iter_batches(batch_size=256, batch_format="numpy"))
    for batch in batches:
        ids = batch["id"].astype(np.int64)
        embeddings[ids] = np.stack(list(batch["embedding"]))
        ok[ids], seen[ids] = batch["ok"], True
        for i, blob in zip(ids, batch.get("keypoints", [None] * len(ids)), strict=True):
            if blob is not None:
                keypoints[int(i)] = _unpack(bytes(blob))
    if not seen.all():
        raise RuntimeError(f"the Ray pipeline returned {int(seen.sum())} of {n} map images")
    map_features = None
    if conf.verify is not None:
        kp = [k for k in keypoints if k is not None]
        map_features = MapFeatures.build(list(range(n)), [f for f, _ in kp], [w for _, w in kp])
    log.info("embedded %d map images on the Ray cluster with %d actors", n, actors)
    return MapArrays(embeddings, ok, map_features)
