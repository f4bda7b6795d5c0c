"""A sharded index: shards that each hold the vectors and verification keypoints of the images they own
(id % shards), and a head that holds the id map and the models and fans each query out to them.

The head is an ordinary Searcher over a `Part(None, n)` of the version, given a ShardClient (ShardCalls)
whose ShardedBackend it runs its queries on; the query path around the backend is the embedded one
(retrieval/searcher.py), so a sharded service ranks exactly as a whole index: the shards' top k merged
by distance, then the first `verify.n` verified by the shards that own them. This module is the
engine-free half: ShardServer is what one shard process runs, LocalShards calls shards in this process
(tests, tools); cluster/serving.py puts ShardServers behind Ray Serve.

Every shard follows the family's versions and change log on its own (retrieval/live.py), so online
changes reach the owning shard through the durable log, and a request names the head's version: a shard
answers from that version, or the one before it while it has already swapped, and waits briefly for
one it is still loading.
"""

from __future__ import annotations

import contextlib
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from features.orb import OrbFeatures
from indexer.store import LoadedIndex, Part, load, shard_of
from model.verify import Evidence
from retrieval.live import LiveIndex, NotReadyError
from retrieval.searcher import Hit, Searcher, ShardClient

# How long a shard waits to hold the version a head asks for (a newly published one it is loading).
VERSION_WAIT_S = 30.0


class ShardServer:
    """One shard of an index family: follows its versions and change log, answers a head's calls."""

    def __init__(self, family: Path, shard: int, shards: int) -> None:
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard} of {shards} does not exist")
        self.shard, self.shards = shard, shards
        self.live = LiveIndex(family, Part(shard, shards))
        self.live.load_now()

    def at(self, version: str, wait: float = VERSION_WAIT_S) -> Searcher:
        """This shard's searcher of `version`: the current one, the one before it (a head that has not
        swapped yet), or, for a newer version that this shard is loading, the current one once it has."""
        deadline = time.monotonic() + wait
        while True:
            current = self.live.sync()
            if current is not None and current.version == version:
                return current
            previous = self.live.previous
            if previous is not None and previous.version == version:
                return previous
            # Version names sort by creation time: an older one than both is gone for good.
            older = current is not None and version < current.version
            if older or time.monotonic() >= deadline:
                serving = current.version if current is not None else "nothing"
                raise NotReadyError(f"shard {self.shard} does not hold index version {version} (serves {serving})")
            time.sleep(0.05)

    def search(self, version: str, embedding: np.ndarray, k: int) -> list[Hit]:
        return self.at(version).search_embedding(embedding, k)

    def inliers(self, version: str, q: OrbFeatures, words: np.ndarray, ids: list[int]) -> np.ndarray:
        return self._verifying(version, ids).backend.inliers(q, words, ids)

    def evidence(self, version: str, q: OrbFeatures, words: np.ndarray, ids: list[int]) -> list[Evidence]:
        return self._verifying(version, ids).backend.evidence(q, words, ids)

    def distances(self, version: str, embedding: np.ndarray, ids: list[int]) -> np.ndarray:
        return self._owning(version, ids).backend.distances(embedding, np.asarray(ids, np.int64))

    def _owning(self, version: str, ids: list[int]) -> Searcher:
        foreign = [i for i in ids if shard_of(i, self.shards) != self.shard]
        if foreign:
            raise ValueError(f"shard {self.shard} of {self.shards} does not own images {foreign[:5]}")
        return self.at(version)

    def _verifying(self, version: str, ids: list[int]) -> Searcher:
        searcher = self._owning(version, ids)
        if searcher.verifier is None:
            raise ValueError(f"index version {version} does not verify")
        return searcher

    def status(self) -> dict[str, object]:
        s = self.live.sync()
        return {
            "shard": self.shard,
            "pid": os.getpid(),
            "version": None if s is None else s.version,
            "size": 0 if s is None else s.size,
        }


class StagedShardServer(ShardServer):
    """One shard of a version still in its staging folder (indexer/store.py: staging), for the build
    that fits the version's heads through its shards before publishing it: one fixed searcher, which
    answers whatever version name the head gives (the staged one has none yet)."""

    def __init__(self, directory: Path, shard: int, shards: int) -> None:
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard} of {shards} does not exist")
        self.shard, self.shards = shard, shards
        self.searcher = Searcher(load(directory, Part(shard, shards)))

    def at(self, version: str, wait: float = VERSION_WAIT_S) -> Searcher:
        return self.searcher

    def status(self) -> dict[str, object]:
        return {"shard": self.shard, "pid": os.getpid(), "version": "staged", "size": self.searcher.size}


def merge_hits(parts: Sequence[list[Hit]], k: int) -> list[Hit]:
    """The k nearest of the shards' hits, ranked by distance (ties by id, as FAISS ranks one index)."""
    hits = sorted((h for part in parts for h in part), key=lambda h: (h.distance, h.id))
    return [replace(h, rank=r) for r, h in enumerate(hits[:k], start=1)]


def by_owner(ids: list[int], shards: int) -> dict[int, list[int]]:
    """Positions in `ids` grouped by the shard that owns each image."""
    out: dict[int, list[int]] = {}
    for pos, i in enumerate(ids):
        out.setdefault(shard_of(i, shards), []).append(pos)
    return out


Answer = Callable[[], Any]  # waits for a shard's answer


def gather(ids: list[int], shards: int, ask: Callable[[int, list[int]], Answer]) -> list[Any]:
    """One answer per id of `ids`, from the shards that own them: `ask(shard, its ids)` starts a call
    and returns a way to wait for its answer (a sequence, one item per id asked), so that all shards
    work at once."""
    groups = by_owner(ids, shards)
    pending = {s: ask(s, [ids[p] for p in pos]) for s, pos in groups.items()}
    out: list[Any] = [None] * len(ids)
    for s, pos in groups.items():
        for p, v in zip(pos, pending[s](), strict=True):
            out[p] = v
    return out


class MergedHits:
    """The shards' merged hits as a head's candidates (retrieval/searcher.py: Candidates)."""

    def __init__(self, hits: list[Hit]) -> None:
        self._hits = hits
        self.ids = np.array([h.id for h in hits], np.int64)
        self.distances = np.array([h.distance for h in hits], np.float64)

    def hits(self, start: int, stop: int) -> list[Hit]:
        return self._hits[start:stop]  # ranked by merge_hits


class ShardCalls(ABC):
    """The calls a head makes of its shards, each naming the head's version (a shard answers from that
    version); how they reach the shards is the subclass's: LocalShards in this process, RayShards
    (cluster/serving.py) on a Ray cluster. It is the ShardClient a head's searcher is given."""

    @abstractmethod
    def search(self, version: str, embedding: np.ndarray, k: int) -> list[Hit]:
        """The k nearest map images over all shards, ranked by distance (merge_hits)."""

    @abstractmethod
    def call(self, shard: int, method: str, *args: Any) -> Answer:
        """Start ShardServer.`method`(*args) on the shard; returns a way to wait for its answer."""

    def inliers(self, version: str, q: OrbFeatures, q_words: np.ndarray, ids: list[int]) -> np.ndarray:
        """Verification inliers of the query with each of `ids`, asked of the shards that own them."""
        found = gather(ids, self.count, lambda s, part: self.call(s, "inliers", version, q, q_words, part))
        return np.array(found, np.int64)

    def evidence(self, version: str, q: OrbFeatures, q_words: np.ndarray, ids: list[int]) -> list[Evidence]:
        """The inlier matches behind inliers(), asked of the shards that own the images."""
        return gather(ids, self.count, lambda s, part: self.call(s, "evidence", version, q, q_words, part))

    def distances(self, version: str, embedding: np.ndarray, ids: list[int]) -> np.ndarray:
        """Embedding distances to each of `ids`, asked of the shards that own them."""
        found = gather(ids, self.count, lambda s, part: self.call(s, "distances", version, embedding, part))
        return np.array(found, np.float64)

    @property
    @abstractmethod
    def count(self) -> int:
        """How many shards."""

    def backend(self, head: LoadedIndex) -> ShardedBackend:
        return ShardedBackend(self, head)

    def deadline(self) -> AbstractContextManager[None]:
        """One search's time for its shard calls (none in this process: they cannot hang)."""
        return contextlib.nullcontext()


class ShardedBackend:
    """The backend of a head's searcher (retrieval/searcher.py: Backend): its queries asked of the
    shards, for the head's version."""

    def __init__(self, shards: ShardCalls, head: LoadedIndex) -> None:
        self.shards = shards
        self.version = head.version
        self.images = head.images

    @property
    def size(self) -> int:
        # The head holds no vectors, but the id map of every image (online changes included).
        return len(self.images)

    def nearest(self, embedding: np.ndarray, k: int) -> MergedHits:
        return MergedHits(self.shards.search(self.version, embedding, k))

    def inliers(self, q: OrbFeatures, q_words: np.ndarray, ids: list[int]) -> np.ndarray:
        return self.shards.inliers(self.version, q, q_words, ids)

    def distances(self, embedding: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return self.shards.distances(self.version, embedding, [int(i) for i in ids])

    def evidence(self, q: OrbFeatures, q_words: np.ndarray, ids: list[int]) -> list[Evidence]:
        return self.shards.evidence(self.version, q, q_words, ids)

    def on_demand_files(self) -> list[Path]:
        return []  # the shards read rows of their files; the head reads none


class LocalShards(ShardCalls):
    """ShardCalls to ShardServers in this process (tests and tools; Ray's is cluster/serving.py)."""

    def __init__(self, servers: list[ShardServer]) -> None:
        self.servers = servers

    @property
    def count(self) -> int:
        return len(self.servers)

    def search(self, version: str, embedding: np.ndarray, k: int) -> list[Hit]:
        return merge_hits([s.search(version, embedding, k) for s in self.servers], k)

    def call(self, shard: int, method: str, *args: Any) -> Answer:
        answer = getattr(self.servers[shard], method)(*args)
        return lambda: answer


def head_index(family: Path, shards: int, client: ShardClient) -> LiveIndex:
    """The living index of a sharded family's head: id map and models here, vectors on the shards."""
    return LiveIndex(family, Part(None, shards), client)
