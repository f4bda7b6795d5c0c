"""Online changes applied to an index snapshot: the change log (indexer/changes.py) replayed on top of
a Searcher, giving a new one.

An added image contributes its embedding and verification keypoints. They are stored with the change
and reused by every index version that embeds images the same way (same `embedding_key`); another
version (a new build, a rollback) embeds the stored image again, through the feature pipeline. So
replay can be slow: the living index (retrieval/live.py) runs it in a thread of its own, never in a
request.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.files import sha256_bytes
from dataset.layout import Location
from features.decode import ImageDecodeError
from features.orb import NoKeypointsError, OrbFeatures
from indexer.changes import ChangeLog, Tail
from indexer.kinds import copy_for_change
from indexer.store import ImageRecord
from model.verify import keypoint_arrays, keypoints_of_arrays
from retrieval.searcher import Applied, Query, Searcher

log = logging.getLogger(__name__)

Keypoints = tuple[OrbFeatures, np.ndarray]  # verification keypoints of an image and their visual words
Added = tuple[np.ndarray, Keypoints | None]  # what an added image brings: its embedding and keypoints


def change_arrays(query: Query) -> dict[str, np.ndarray]:
    """What an added image contributes to an index: its embedding and verification keypoints."""
    out = {"embedding": np.asarray(query.embedding, np.float32)}
    if query.verify_features is not None and query.verify_words is not None:
        out |= keypoint_arrays(query.verify_features, query.verify_words)
    return out


def _stored(rec: dict[str, Any], searcher: Searcher, changelog: ChangeLog) -> Added | None:
    """The arrays stored with an add, if they were made the way this index makes them."""
    if rec.get("key") != searcher.loaded.embedding_key:
        return None
    need_kp = searcher.verifier is not None
    arrays = changelog.load_arrays(str(rec.get("arrays", "")), str(rec.get("arrays_sha256", "")))
    if arrays is None or (need_kp and "xy" not in arrays):
        return None
    emb = arrays["embedding"].reshape(1, -1).astype(np.float32)
    if emb.shape[1] != searcher.index.d:
        return None
    return emb, keypoints_of_arrays(arrays) if need_kp else None


def _embedded(rec: dict[str, Any], searcher: Searcher, changelog: ChangeLog) -> Added | None:
    """Embedding and keypoints of an added image from its stored bytes, through this index's own
    pipeline; None (logged) when the image is missing, altered or cannot be embedded."""
    path = changelog.resolve(rec["path"])
    if path is None:
        log.error("change %s: image %s is missing; image %s cannot be served", rec["seq"], rec["path"], rec["id"])
        return None
    data = path.read_bytes()
    if sha256_bytes(data) not in rec["path"]:
        log.error("change %s: image %s does not match its checksum; skipped", rec["seq"], rec["path"])
        return None
    try:
        q = searcher.analyze(data)
    except (ImageDecodeError, NoKeypointsError) as e:
        log.error("change %s: image %s cannot be embedded by this index (%s); skipped", rec["seq"], rec["id"], e)
        return None
    if searcher.verifier is None:
        return q.embedding.astype(np.float32), None
    if q.verify_features is None or q.verify_words is None:
        return None
    return q.embedding.astype(np.float32), (q.verify_features, q.verify_words)


def _counters(searcher: Searcher, tail: Tail) -> tuple[int, int]:
    """The last change's number and the highest image id ever seen, after `tail`."""
    seq = max([searcher.applied.seq, *(int(r["seq"]) for r in tail.records)])
    return seq, max([searcher.applied.max_id, *(int(r["id"]) for r in tail.records)])


def _unfolded(searcher: Searcher, tail: Tail) -> list[dict[str, Any]]:
    """The records of `tail` that the served version does not hold yet: a compacted version holds
    those up to its `changes_seq`."""
    folded = int(searcher.loaded.manifest.get("changes_seq", 0))
    return [r for r in tail.records if r["seq"] > folded]


def apply_changes(searcher: Searcher, tail: Tail, changelog: ChangeLog) -> Searcher:
    """A new searcher with the logged changes applied; `searcher` is left as it was.

    A delete names the image's path too, and applies only if that id still shows that image."""
    images = dict(searcher.images)
    added: dict[int, Added] = {}
    removed: set[int] = set()  # ids to take out of this searcher's FAISS index
    extra = dict(searcher.verifier.extra) if searcher.verifier is not None else {}
    part = searcher.loaded.part
    for rec in _unfolded(searcher, tail):
        i = int(rec["id"])
        if rec["op"] == "add":
            # A shard applies the adds it owns; the head keeps every image's record but no vectors.
            if not (part.head or part.owns(i)):
                continue
            if part.head:
                images[i] = ImageRecord(i, rec["path"], Location.of(rec["loc"]), uploaded=True)
                continue
            got = _stored(rec, searcher, changelog) or _embedded(rec, searcher, changelog)
            if got is None:
                continue
            if i in images and i not in added:
                removed.add(i)
            images[i] = ImageRecord(i, rec["path"], Location.of(rec["loc"]), uploaded=True)
            added[i] = got
        elif i in images and images[i].path == rec["path"]:
            del images[i]
            extra.pop(i, None)
            if added.pop(i, None) is None and not part.head:
                removed.add(i)
    applied = Applied(tail.offset, *_counters(searcher, tail))
    if part.head:
        return Searcher(dataclasses.replace(searcher.loaded, images=images), applied, searcher.shards)
    if not added and not removed:
        return Searcher(searcher.loaded, applied, searcher.shards)
    # Indexes are not safe to change while another thread searches them: change a copy.
    index = copy_for_change(searcher.index)
    if removed:
        index.remove_ids(np.array(sorted(removed), np.int64))
    if added:
        index.add_with_ids(np.vstack([e for e, _ in added.values()]), np.array(list(added), np.int64))
    verifier = searcher.verifier
    if verifier is not None:
        extra |= {i: kp for i, (_, kp) in added.items() if kp is not None}
        verifier = verifier.with_extra(extra)
    loaded = dataclasses.replace(searcher.loaded, index=index, images=images, verifier=verifier)
    return Searcher(loaded, applied, searcher.shards)


@dataclass(frozen=True)
class LogView:
    """What the whole log says, read without applying it: enough for a writer to number the next
    change and to know which images exist (without running the feature pipeline for anybody)."""

    seq: int
    max_id: int
    paths: dict[int, str]  # id -> path of every image the log leaves in the index


def log_view(searcher: Searcher, tail: Tail) -> LogView:
    """The state after `tail` (the log past what `searcher` applied)."""
    paths = {i: r.path for i, r in searcher.images.items()}
    for rec in _unfolded(searcher, tail):
        i = int(rec["id"])
        if rec["op"] == "add":
            paths[i] = rec["path"]
        elif paths.get(i) == rec["path"]:
            del paths[i]
    return LogView(*_counters(searcher, tail), paths)
