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


class LogRewrittenError(RuntimeError):
    """The log was condensed past what a searcher applied: changes it has not seen may be gone from
    the log, so it must be loaded again from a version (retrieval/live.py does)."""


def _fresh(searcher: Searcher, tail: Tail) -> list[dict[str, Any]]:
    """The records of `tail` the searcher does not hold yet: numbered after what it applied (or what
    its version holds folded in). Raises LogRewrittenError where the log lost some of those."""
    if tail.rewritten and searcher.applied.seq < tail.base_seq:
        raise LogRewrittenError(
            f"the change log was condensed up to change {tail.base_seq}; this index applied {searcher.applied.seq}"
        )
    return [r for r in tail.records if r["seq"] > searcher.applied.seq]


def _applied(searcher: Searcher, tail: Tail, fresh: list[dict[str, Any]]) -> Applied:
    a = searcher.applied
    return Applied(
        offset=tail.offset,
        seq=max([a.seq, *(int(r["seq"]) for r in fresh)]),
        max_id=max([a.max_id, tail.base_max_id, *(int(r["id"]) for r in fresh)]),
        log_id=tail.log_id,
        seq_floor=max(a.seq_floor, tail.base_seq),
        bad_lines=a.bad_lines + tail.bad_lines,
    )


def _record(rec: dict[str, Any]) -> ImageRecord:
    idem = rec.get("idem")
    loc = Location.of(rec["loc"])
    return ImageRecord(int(rec["id"]), rec["path"], loc, uploaded=True, idem=idem if isinstance(idem, str) else None)


def apply_changes(searcher: Searcher, tail: Tail, changelog: ChangeLog) -> Searcher:
    """A new searcher with the logged changes applied; `searcher` is left as it was. Raises
    LogRewrittenError (see there).

    A delete names the image's path too, and applies only if that id still shows that image."""
    fresh = _fresh(searcher, tail)
    images = dict(searcher.images)
    uploads, keys = dict(searcher.loaded.uploads), dict(searcher.loaded.keys)
    added: dict[int, Added] = {}
    removed: set[int] = set()  # ids to take out of this searcher's FAISS index
    extra = dict(searcher.verifier.extra) if searcher.verifier is not None else {}
    part = searcher.loaded.part
    for rec in fresh:
        i = int(rec["id"])
        if rec["op"] == "add":
            # A shard applies the adds it owns; the head keeps every image's record but no vectors.
            if not (part.head or part.owns(i)):
                continue
            if not part.head:
                got = _stored(rec, searcher, changelog) or _embedded(rec, searcher, changelog)
                if got is None:
                    continue
                if i in images and i not in added:
                    removed.add(i)
                added[i] = got
            record = images[i] = _record(rec)
            uploads[rec["path"]] = i
            if record.idem is not None:
                keys[record.idem] = i
        elif i in images and images[i].path == rec["path"]:
            gone = images.pop(i)
            if uploads.get(gone.path) == i:
                del uploads[gone.path]
            if gone.idem is not None and keys.get(gone.idem) == i:
                del keys[gone.idem]
            extra.pop(i, None)
            if added.pop(i, None) is None and not part.head:
                removed.add(i)
    applied = _applied(searcher, tail, fresh)
    # The spatial index, if a prior search built it, with these images' places changed at once.
    built = searcher.places_if_built()
    places = None if built is None else built.changed(images, {int(r["id"]) for r in fresh})
    if part.head:
        loaded = dataclasses.replace(searcher.loaded, images=images, uploads=uploads, keys=keys)
        return Searcher(loaded, applied, searcher.shards, places)
    if not added and not removed:
        return Searcher(searcher.loaded, applied, searcher.shards, places)
    # Indexes are not safe to change while another thread searches them: change a copy.
    index = copy_for_change(searcher.index)
    if removed:
        # FAISS's wrapper takes an array of ids (it makes the IDSelectorBatch); its stub names only the selector
        index.remove_ids(np.array(sorted(removed), np.int64))  # type: ignore[arg-type]
    if added:
        index.add_with_ids(np.vstack([e for e, _ in added.values()]), np.array(list(added), np.int64))
    verifier = searcher.verifier
    if verifier is not None:
        extra |= {i: kp for i, (_, kp) in added.items() if kp is not None}
        verifier = verifier.with_extra(extra)
    loaded = dataclasses.replace(
        searcher.loaded, index=index, images=images, verifier=verifier, uploads=uploads, keys=keys
    )
    return Searcher(loaded, applied, searcher.shards, places)


@dataclass(frozen=True)
class LogView:
    """What the whole log says, read without applying it: enough for a writer to number the next
    change and to know which images exist (without running the feature pipeline for anybody)."""

    searcher: Searcher
    seq: int  # the highest change number ever given out: the next change is seq + 1
    max_id: int  # the highest image id ever given out: the next image is max_id + 1
    added: dict[int, ImageRecord]  # added by the log past the searcher, still there
    deleted: set[int]  # deleted by the log past the searcher

    def record(self, image_id: int) -> ImageRecord | None:
        if image_id in self.deleted:
            return None
        return self.added.get(image_id) or self.searcher.images.get(image_id)

    def by_upload(self, path: str) -> ImageRecord | None:
        """The image added with these stored bytes, if it is still there."""
        found = [r for r in self.added.values() if r.path == path]
        i = found[0].id if found else self.searcher.loaded.uploads.get(path)
        return None if i is None else self.record(i)

    def by_key(self, key: str) -> ImageRecord | None:
        """The image added with this Idempotency-Key, if it is still there."""
        found = [r for r in self.added.values() if r.idem == key]
        i = found[0].id if found else self.searcher.loaded.keys.get(key)
        return None if i is None else self.record(i)


def log_view(searcher: Searcher, tail: Tail) -> LogView:
    """The state after `tail` (the log past what `searcher` applied). Raises LogRewrittenError."""
    fresh = _fresh(searcher, tail)
    added: dict[int, ImageRecord] = {}
    deleted: set[int] = set()
    for rec in fresh:
        i = int(rec["id"])
        if rec["op"] == "add":
            added[i] = _record(rec)
            deleted.discard(i)
        else:
            current = added.get(i) or (None if i in deleted else searcher.images.get(i))
            if current is not None and current.path == rec["path"]:
                added.pop(i, None)
                deleted.add(i)
    a = _applied(searcher, tail, fresh)
    return LogView(searcher, max(a.seq, a.seq_floor), a.max_id, added, deleted)
