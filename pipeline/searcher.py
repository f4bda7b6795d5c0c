"""The query pipeline: image bytes -> features -> vector -> embedding -> index -> verified, ranked hits.

It is rebuilt from the index version (preset conf, fitted vectorizer, encoder and verification
keypoints are stored with the index), so a query goes through exactly what the map images went through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from features.decode import ImageDecodeError, decode_image
from features.orb import NoKeypointsError, OrbFeatures, extract_orb
from indexer.changes import ChangeLog, Tail
from indexer.store import ImageRecord, LoadedIndex
from pipeline.presets import verify_features_conf
from pipeline.runtime import kernels_for_this_thread

log = logging.getLogger(__name__)


class _Clock:
    """Adds the seconds since the previous lap to timings[name] (a no-op without a dict)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[name] = self.timings.get(name, 0.0) + now - self.t
            self.t = now


def confined_file(root: Path, rel: str) -> Path | None:
    """The file at `rel` under `root`, or None when it is missing or would lie outside the folder
    (`..`, an absolute path, a symlink leading out): paths from an id map are still not trusted."""
    base = root.resolve()
    path = (base / rel).resolve()
    return path if path.is_relative_to(base) and path.is_file() else None


@dataclass(frozen=True)
class Hit:
    rank: int
    id: int
    path: str
    score: float  # predicted relevance in [0, 1]
    distance: float  # Euclidean distance of the embeddings
    loc: tuple[float, float, float]
    inliers: int | None = None  # RANSAC inliers with the query, when the hit was verified


@dataclass(frozen=True)
class Query:
    features: OrbFeatures
    embedding: np.ndarray  # (1, dim)
    verify_features: OrbFeatures | None = None
    verify_words: np.ndarray | None = None


@dataclass(frozen=True)
class Applied:
    """How far into its family's change log (indexer/changes.py) a searcher is."""

    offset: int = 0  # bytes of the log read
    seq: int = 0  # last change seen
    max_id: int = -1  # highest image id ever seen, in the version or the log: never given out again
    bad_lines: int = 0


class Searcher:
    """Immutable once built: online changes make a new Searcher (sharing what did not change), so a
    request keeps a consistent view while another thread swaps in the next one."""

    def __init__(self, loaded: LoadedIndex, applied: Applied | None = None) -> None:
        self.loaded = loaded
        self.conf: dict[str, Any] = loaded.manifest["conf"]
        self.vectorizer = loaded.vectorizer
        self.encoder = loaded.encoder
        self.verifier = loaded.verifier
        self.index = loaded.index
        self.images: dict[int, ImageRecord] = loaded.images
        self.applied = applied or Applied(max_id=max(loaded.images, default=-1))

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @property
    def family(self) -> Path:
        """The index family folder (versions, CURRENT, change log, uploads)."""
        return self.loaded.directory.parent

    @property
    def embedding_key(self) -> str:
        """Identifies what turns image bytes into this index's vectors: embeddings stored with a change
        are reused only by a version with the same key, other versions embed the image again."""
        sums = self.loaded.manifest.get("checksums", {})
        parts = [sums.get("encoder.npz"), sums.get("vectorizer.npz"), self.conf]
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def image_file(self, image_id: int, data_root: Path) -> Path | None:
        """The file of a map image, or None if the id is unknown or its file is missing. Map images
        resolve under the data folder, images added online under the index family (their stored
        upload); either way the path is confined to that folder."""
        rec = self.images.get(image_id)
        if rec is None:
            return None
        return confined_file(self.family if rec.uploaded else data_root, rec.path)

    def change_arrays(self, query: Query) -> dict[str, np.ndarray]:
        """What an added image contributes to this index: its embedding and verification keypoints."""
        out = {"embedding": np.asarray(query.embedding, np.float32)}
        if query.verify_features is not None and query.verify_words is not None:
            out |= {
                "xy": query.verify_features.xy,
                "descriptors": query.verify_features.descriptors,
                "words": np.asarray(query.verify_words),
            }
        return out

    def _added(
        self, rec: dict[str, Any], changelog: ChangeLog
    ) -> tuple[np.ndarray, tuple[OrbFeatures, np.ndarray] | None] | None:
        """Embedding and keypoints of an added image: from the stored arrays when they were made the
        way this index makes them, else from the stored image again; None if neither is possible."""
        need_kp = self.verifier is not None
        if rec.get("key") == self.embedding_key:
            arrays = changelog.load_arrays(str(rec.get("arrays", "")), str(rec.get("arrays_sha256", "")))
            if arrays is not None and (not need_kp or "xy" in arrays):
                emb = arrays["embedding"].reshape(1, -1).astype(np.float32)
                if emb.shape[1] == self.index.d:
                    kp = (OrbFeatures(arrays["xy"], arrays["descriptors"]), arrays["words"]) if need_kp else None
                    return emb, kp
        path = changelog.resolve(rec["path"])
        if path is None:
            log.error("change %s: image %s is missing; image %s cannot be served", rec["seq"], rec["path"], rec["id"])
            return None
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() not in rec["path"]:
            log.error("change %s: image %s does not match its checksum; skipped", rec["seq"], rec["path"])
            return None
        try:
            q = self.analyze(data)
        except (ImageDecodeError, NoKeypointsError) as e:
            log.error("change %s: image %s cannot be embedded by this index (%s); skipped", rec["seq"], rec["id"], e)
            return None
        kp = (q.verify_features, q.verify_words) if need_kp and q.verify_features is not None else None
        if need_kp and kp is None:
            return None
        return q.embedding.astype(np.float32), kp

    def with_changes(self, tail: Tail, changelog: ChangeLog) -> Searcher:
        """A new searcher with the logged changes applied; this one is left as it was.

        Changes up to the version's `changes_seq` are already in it (compacted). A delete names the
        image's path too, and applies only if that id still shows that image."""
        folded = int(self.loaded.manifest.get("changes_seq", 0))
        images = dict(self.images)
        added: dict[int, tuple[np.ndarray, tuple[OrbFeatures, np.ndarray] | None]] = {}
        removed: set[int] = set()  # ids to take out of this searcher's FAISS index
        extra = dict(self.verifier.extra) if self.verifier is not None else {}
        seq, max_id = self.applied.seq, self.applied.max_id
        for rec in tail.records:
            i = int(rec["id"])
            seq, max_id = max(seq, int(rec["seq"])), max(max_id, i)
            if rec["seq"] <= folded:
                continue
            if rec["op"] == "add":
                got = self._added(rec, changelog)
                if got is None:
                    continue
                if i in images and i not in added:
                    removed.add(i)
                loc = tuple(float(v) for v in rec["loc"])
                images[i] = ImageRecord(i, rec["path"], loc, uploaded=True)
                added[i] = got
            elif i in images and images[i].path == rec["path"]:
                del images[i]
                extra.pop(i, None)
                if added.pop(i, None) is None:
                    removed.add(i)
        applied = Applied(tail.offset, seq, max_id, self.applied.bad_lines + tail.bad_lines)
        if not added and not removed:
            return Searcher(self.loaded, applied)
        # FAISS indexes are not safe to change while another thread searches them: change a copy.
        index = faiss.clone_index(self.index)
        if removed:
            index.remove_ids(np.array(sorted(removed), np.int64))
        if added:
            index.add_with_ids(np.vstack([e for e, _ in added.values()]), np.array(list(added), np.int64))
        verifier = self.verifier
        if verifier is not None:
            extra |= {i: kp for i, (_, kp) in added.items() if kp is not None}
            verifier = verifier.with_extra(extra)
        loaded = dataclasses.replace(self.loaded, index=index, images=images, verifier=verifier)
        return Searcher(loaded, applied)

    def analyze(self, data: bytes, timings: dict[str, float] | None = None) -> Query:
        """Features and embedding of image bytes; raises ImageDecodeError / NoKeypointsError.
        `timings`, if given, receives each stage's seconds."""
        kernels_for_this_thread()  # the service calls this from its request thread pool
        clock = _Clock(timings)
        gray = decode_image(data, self.conf["image"]["max_side"])
        clock.lap("decode")
        features = extract_orb(gray, self.conf["features"])
        vf = None if self.verifier is None else extract_orb(gray, verify_features_conf(self.conf)["features"])
        clock.lap("features")
        embedding = self.encoder.embed(self.vectorizer(features)[None, :])
        words = None if vf is None else self.vectorizer.words(vf.descriptors)
        clock.lap("encode")
        return Query(features, embedding, vf, words)

    def warm_up(self) -> None:
        """One search on a generated image, so the first user request does not pay for lazy set-up
        (BLAS and OpenCV thread pools, first-touch of the index pages)."""
        import cv2

        noise = np.random.default_rng(0).integers(0, 256, (256, 341), dtype=np.uint8)
        ok, png = cv2.imencode(".png", cv2.GaussianBlur(noise, (3, 3), 0))
        if ok:
            with contextlib.suppress(ImageDecodeError, NoKeypointsError):
                self.search(png.tobytes(), 10)

    def search_embedding(self, emb: np.ndarray, k: int) -> list[Hit]:
        k = min(k, self.size)
        if k <= 0:
            return []
        d2, ids = self.index.search(emb, k)
        dist = np.sqrt(np.maximum(d2[0], 0.0))
        scores = self.encoder.score(dist)
        hits = []
        for rank, (i, d, s) in enumerate(zip(ids[0], dist, scores, strict=True), start=1):
            if i < 0:
                break
            rec = self.images[int(i)]
            hits.append(Hit(rank, rec.id, rec.path, float(s), float(d), rec.loc))
        return hits

    def rank(self, query: Query, k: int, timings: dict[str, float] | None = None) -> list[Hit]:
        """The top k map images; with verification, the first `verify.n` of the shortlist are
        re-ranked by a score that folds their RANSAC inliers into the embedding distance."""
        clock = _Clock(timings)
        if self.verifier is None or query.verify_features is None:
            hits = self.search_embedding(query.embedding, k)
            clock.lap("search")
            return hits
        n = int(self.verifier.conf["n"])
        hits = self.search_embedding(query.embedding, max(k, n))
        clock.lap("search")
        head, tail = hits[:n], hits[n:]
        inliers = self.verifier.inliers(query.verify_features, query.verify_words, [h.id for h in head])
        scores = self.verifier.score(np.array([h.distance for h in head]), inliers)
        order = np.argsort(-scores, kind="stable")
        clock.lap("verify")
        verified = [
            Hit(0, head[i].id, head[i].path, float(scores[i]), head[i].distance, head[i].loc, int(inliers[i]))
            for i in order
        ]
        return [
            Hit(r, h.id, h.path, h.score, h.distance, h.loc, h.inliers)
            for r, h in enumerate((verified + tail)[:k], start=1)
        ]

    def search(self, data: bytes, k: int) -> list[Hit]:
        return self.rank(self.analyze(data), k)

    def score_all(self, query: Query) -> np.ndarray:
        """Embedding-based relevance of the query to every map image, indexed by id."""
        hits = self.search_embedding(query.embedding, self.size)
        out = np.zeros(max(self.images) + 1, dtype=np.float32)
        out[[h.id for h in hits]] = [h.score for h in hits]
        return out
