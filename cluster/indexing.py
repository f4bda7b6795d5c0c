"""Indexing on a Ray cluster (`imgsearch index --engine ray`): the workers write the index's shards,
the driver holds no vectors.

1. A Ray Data actor pool computes each map image's aggregate vector, embedding and verification
   keypoints, and writes them, one part file per batch and shard, into the version's staging folder
   (indexer/store.py: staging) on the shared artifacts. It returns only ids and whether each image
   had features.
2. One task per shard reads its parts and writes the shard's index (of the kind its own size calls
   for: indexer/kinds.py) and keypoints, returning their checksums.
3. The driver adds the id map and models (indexer/build.py: stage_written); the heads are fitted on
   the validation queries searched through actors that each serve one staged shard (StagedShards),
   by the embedded engine's code (cli/stages.py); then the version is published atomically as every
   other.

So the driver holds per map image its id, path, location and checksum share, whatever the
collection's size; vectors and keypoints go from the workers to the files. Every node reads the
images and the model and writes the staging folder at the same paths: on a real cluster, shared
storage (README, "On a Ray cluster").
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from common.files import atomic_savez, mapped_npz
from common.pipeline import Pipeline
from common.threads import single_threaded_kernels
from dataset.layout import Dataset
from indexer import store
from indexer.build import WrittenShards, image_keypoints, image_vector
from indexer.kinds import build_index
from model.encoder import NumpyEncoder
from model.vectorize import Vectorizer
from model.verify import MapFeatures
from retrieval.searcher import Hit
from retrieval.shards import Answer, ShardCalls, StagedShardServer, merge_hits

log = logging.getLogger(__name__)

BATCH = 16  # images per actor call: enough to amortise one matrix product of the encoder
PARTS = ".parts"  # in the staging folder: the actors' part files, removed once the shards are written


def _part_name(shard: int, first_id: int) -> str:
    # Named by the batch's first id: a batch computed again (a retried task) replaces its own file.
    return f"s{shard}-{first_id:010d}"


class PartWriter:
    """A Ray Data actor: loads the vectorizer and encoder once and uses one library thread, since the
    actor pool (one actor per CPU) is the parallelism. Each batch's embeddings and keypoints go to
    part files of the shards that own them."""

    def __init__(self, conf: Pipeline, vectorizer_file: str, encoder_file: str, parts: str, shards: int) -> None:
        single_threaded_kernels()
        self.conf = conf
        self.vconf = conf.verify_features if conf.verify is not None else None
        self.vectorizer = Vectorizer.load(Path(vectorizer_file), conf.vector)
        self.encoder = NumpyEncoder.load(Path(encoder_file))
        self.parts = Path(parts)
        self.shards = shards

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"].astype(np.int64)
        vectors = np.zeros((len(ids), self.encoder.input_dim), np.float32)
        ok = np.zeros(len(ids), bool)
        feats, words = [], []
        for j, path in enumerate(batch["path"]):
            data = Path(str(path)).read_bytes()
            v = image_vector(data, self.conf, self.vectorizer)
            if v is not None:
                vectors[j], ok[j] = v, True
            if self.vconf is not None:
                f, w = image_keypoints(data, self.vconf, self.vectorizer)
                feats.append(f)
                words.append(w)
        embeddings = self.encoder.embed(vectors)
        for shard in range(self.shards):
            rows = np.flatnonzero(ids % self.shards == shard)
            if not len(rows):
                continue
            name = _part_name(shard, int(ids[rows[0]]))
            atomic_savez(self.parts / f"{name}.emb.npz", ids=ids[rows], embeddings=embeddings[rows])
            if self.vconf is not None:
                kp = MapFeatures.build(ids[rows].tolist(), [feats[r] for r in rows], [words[r] for r in rows])
                kp.save(self.parts / f"{name}.verify.npz")
        return {"id": ids, "ok": ok}


def write_shard(
    conf: Pipeline, parts: str, directory: str, shard: int, shards: int, n: int
) -> tuple[str, dict[str, str]]:
    """A Ray task: shard `shard`'s index and keypoints from its part files, into the staging folder;
    returns (index kind, checksums). Every image the shard owns must be in exactly one part."""
    files = sorted(Path(parts).glob(f"s{shard}-*.emb.npz"))
    arrays = [mapped_npz(f) for f in files]
    ids = np.concatenate([np.zeros(0, np.int64)] + [a["ids"] for a in arrays])
    order = np.argsort(ids, kind="stable")
    owned = np.arange(shard, n, shards, dtype=np.int64)
    if not np.array_equal(ids[order], owned):
        raise RuntimeError(f"shard {shard}: the parts hold {len(ids)} images, not the {len(owned)} it owns once each")
    dim = arrays[0]["embeddings"].shape[1] if arrays else 0
    x = np.concatenate([np.zeros((0, dim), np.float32)] + [a["embeddings"] for a in arrays])[order]
    keypoints = None
    if conf.verify is not None:
        kp = MapFeatures.concat([MapFeatures.load(f.with_name(f.name.replace(".emb.", ".verify."))) for f in files])
        keypoints = kp.take(order)
    index = build_index(conf.index, np.ascontiguousarray(x), owned)
    return store.write_shard(Path(directory), index, keypoints, shard, shards)


class StagedShards(ShardCalls):
    """The ShardCalls of a build's head to Ray actors that each serve one shard of the staged version."""

    def __init__(self, actors: list[Any]) -> None:
        self.actors = actors

    @property
    def count(self) -> int:
        return len(self.actors)

    def search(self, version: str, embedding: np.ndarray, k: int) -> list[Hit]:
        import ray

        refs = [a.search.remote(version, embedding, k) for a in self.actors]
        return merge_hits(ray.get(refs), k)

    def call(self, shard: int, method: str, *args: Any) -> Answer:
        import ray

        ref = getattr(self.actors[shard], method).remote(*args)
        return lambda: ray.get(ref)


@dataclass
class RayEngine:
    """Writes and serves a staged version's shards on the Ray cluster this process is connected to
    (ray.init first), with `actors` extraction actors of one CPU each (None: one per cluster CPU)."""

    actors: int | None = None

    def write(
        self, conf: Pipeline, dataset: Dataset, vectorizer_file: Path, encoder_file: Path, directory: Path, shards: int
    ) -> WrittenShards:
        """Every map image's shard files, in `directory` (a staging folder)."""
        import ray

        n = len(dataset.database)
        actors = self.actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
        parts = directory / PARTS
        parts.mkdir()
        items = [{"id": i, "path": str(dataset.image_path(p).resolve())} for i, p in enumerate(dataset.database.paths)]
        out = ray.data.from_items(items, override_num_blocks=max(1, min(n, actors * 8))).map_batches(
            PartWriter,
            fn_constructor_kwargs={
                "conf": conf,
                "vectorizer_file": str(vectorizer_file.resolve()),
                "encoder_file": str(encoder_file.resolve()),
                "parts": str(parts.resolve()),
                "shards": shards,
            },
            batch_size=BATCH,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=1,
        )
        ok = np.zeros(n, bool)
        seen = np.zeros(n, bool)
        # batch_format="numpy": each batch is column -> array (Ray's type is the union of every format)
        batches = cast(Iterable[dict[str, np.ndarray]], out.iter_batches(batch_size=1024, batch_format="numpy"))
        for batch in batches:
            ids = batch["id"].astype(np.int64)
            ok[ids], seen[ids] = batch["ok"], True
        if not seen.all():
            raise RuntimeError(f"the Ray pipeline returned {int(seen.sum())} of {n} map images")
        task = ray.remote(num_cpus=1)(write_shard)
        refs = [task.remote(conf, str(parts.resolve()), str(directory.resolve()), s, shards, n) for s in range(shards)]
        written = ray.get(refs)
        shutil.rmtree(parts)
        log.info("%d map images written in %d shards on the Ray cluster by %d actors", n, shards, actors)
        return WrittenShards(ok, [kind for kind, _ in written], {k: v for _, sums in written for k, v in sums.items()})

    @contextmanager
    def serve(self, directory: Path, shards: int) -> Iterator[ShardCalls]:
        """The staged version's shards, each served by an actor while the build searches it."""
        import ray

        # A small CPU share: the actors answer one build's queries, and must fit beside anything.
        server = cast(Any, ray.remote(num_cpus=0.1)(StagedShardServer))  # an actor class: Ray's stubs do not say
        actors = [server.remote(directory.resolve(), s, shards) for s in range(shards)]
        try:
            ray.get([a.status.remote() for a in actors])  # loaded, or the load's error here
            yield StagedShards(actors)
        finally:
            for a in actors:
                ray.kill(a)
