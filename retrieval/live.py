"""The served index as it changes: hot swap to a newly published version, online adds and deletes.

All state is in files (indexer/store.py: versions and CURRENT; indexer/changes.py: the change log),
so any number of server processes stay in step. Requests only look: `sync` checks with two stat calls
whether CURRENT names another version (then loaded by the loader thread and swapped in) and whether
the change log changed (then replayed by the follower thread, retrieval/replay.py, which the request
waits for, briefly, so a change made by any process is searchable at once). Neither thread ever runs
in a request, so a read request never runs the feature pipeline for an image another process added.
Requests keep the Searcher they started with; every change builds a new one and swaps the reference.

It heals: a process with nothing loaded tries again (backing off) at the next request, and where
CURRENT names a version that does not load, it serves the newest version that does, and says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.clock import utc_timestamp
from common.files import read_ahead, sha256_bytes, storage_errors
from dataset.layout import Location
from features.decode import probe_image
from indexer import store
from indexer.changes import CACHE, UPLOADS, ChangeLog, Holder, base_line, condense, encode_line, is_upload
from indexer.store import WHOLE, ImageRecord, IndexLoadError, Part
from retrieval.query import warm_up
from retrieval.replay import LogRewrittenError, LogView, apply_changes, change_arrays, log_view
from retrieval.searcher import Searcher, ShardClient

log = logging.getLogger(__name__)

_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}
# How long a request waits for the follower to replay a change it saw in the log. Replaying an add
# made by the same model takes milliseconds; one that must be embedded again (another version's
# change) takes a query's time. Past the wait, the request is served from the previous snapshot.
SYNC_WAIT_S = 2.0
# How long a writer waits for its process to load the index again after the log was condensed.
RELOAD_WAIT_S = 30.0
# A process with no index loaded tries again after this long, doubling up to the maximum.
RETRY_MIN_S, RETRY_MAX_S = 2.0, 60.0


class NotReadyError(RuntimeError):
    """No index is loaded (yet)."""


class UnknownImageError(LookupError):
    """No map image with this id in the served index."""

    def __init__(self, image_id: int) -> None:
        super().__init__(f"no map image with id {image_id}")
        self.image_id = image_id


class IdempotencyConflictError(ValueError):
    """An Idempotency-Key already added other bytes."""

    def __init__(self, key: str, image_id: int) -> None:
        super().__init__(f"Idempotency-Key {key!r} was used to add another image (id {image_id})")


LogKey = tuple[int, int, int] | None  # ChangeLog.key


def open_version(
    family: Path, version: Path, part: Part = WHOLE, shards: ShardClient | None = None
) -> tuple[Searcher, LogKey]:
    """Load a version (or a part of it: retrieval/shards.py) and replay the family's change log on top
    of it; also returns the log's key (ChangeLog.key) as of before it was read. New changes and ids
    are numbered after the highest any version of the family records, even if the log was lost."""
    base = Searcher(store.load(version, part), shards=shards)
    seq_floor, id_floor = store.family_floor(family)
    applied = dataclasses.replace(
        base.applied, max_id=max(base.applied.max_id, id_floor), seq_floor=max(base.applied.seq_floor, seq_floor)
    )
    searcher = Searcher(base.loaded, applied, shards)
    changelog = ChangeLog(family)
    key = changelog.key()
    return apply_changes(searcher, changelog.read(0), changelog), key


def open_current(
    family: Path, part: Part = WHOLE, shards: ShardClient | None = None
) -> tuple[Searcher, LogKey, str | None]:
    """The version CURRENT names, opened; where it does not load (missing, dangling, corrupt), the
    newest version that does, with a warning saying so as the third value (None otherwise). Raises
    the first error when no version loads."""
    name = store.read_pointer(family)
    try:
        return (*open_version(family, store.current_version(family), part, shards), None)
    except (IndexLoadError, OSError, ValueError) as e:
        first = e
    for version in store.fallbacks(family, name):
        try:
            searcher, key = open_version(family, version, part, shards)
        except (IndexLoadError, OSError, ValueError) as e:
            log.warning("fallback version %s does not load either: %s", version.name, e)
            continue
        warning = f"CURRENT names {name!r}, which does not load ({first}); serving {version.name}, the newest that does"
        log.error("%s", warning)
        return searcher, key, warning
    raise first


def read_ahead_rows(searcher: Searcher) -> None:
    """The files a query reads rows of (re-rank vectors, verification keypoints) into the page cache
    before the version serves (common/files.py: read_ahead), so the first queries do not wait on the
    disk for them."""
    files = searcher.on_demand_files()
    if not files:
        return
    t0 = time.perf_counter()
    done = read_ahead(files)
    names = ", ".join(f.name for f in files)
    if done:
        log.info("read %d MB of %s ahead into the page cache in %.2fs", done >> 20, names, time.perf_counter() - t0)
    else:  # over half the available memory, where they would only push each other out (or unreadable)
        log.warning("%s not read ahead: larger than half the available memory; first queries read from disk", names)


def _pointer_key(family: Path) -> tuple[int, int, int] | None:
    try:
        st = (family / "CURRENT").stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class LiveIndex:
    def __init__(self, family: Path, part: Part = WHOLE, shards: ShardClient | None = None) -> None:
        self.family = family
        self.part = part  # what this process holds of each version (store.Part)
        self.shards = shards  # how the head of a sharded index reaches its shards
        self.changelog = ChangeLog(family)
        self._searcher: Searcher | None = None
        # A shard's version before its last swap: it answers a head that has not swapped yet.
        self.previous: Searcher | None = None
        self.error: str | None = None  # why the latest version is not served (None: it is)
        self._lock = threading.Lock()  # guards the loader's fields below
        self._pointer: tuple[int, int, int] | None = None
        self._target: str | None = None  # version waiting to be loaded in the background
        self._loading = False
        # With nothing loaded: when to try again, and how long to wait after that.
        self._retry_at = 0.0
        self._retry_wait = RETRY_MIN_S
        # One thread swaps snapshots at a time (the follower replaying, the loader swapping a version in).
        self._swap_lock = threading.Lock()
        self._applied_key: LogKey = None  # ChangeLog.key the snapshot has replayed
        # Requests ask the follower to catch up (wanted += 1) and wait until it has (done >= theirs).
        self._follow = threading.Condition()
        self._wanted = 0
        self._done = 0
        self._follower: threading.Thread | None = None
        # Called (from the loader thread) after another version was swapped in, e.g. to update metrics.
        self.on_swap: Callable[[Searcher], None] | None = None

    @property
    def searcher(self) -> Searcher | None:
        return self._searcher

    def load_now(self) -> Searcher:
        """Load the current version, or the newest that loads (at start-up); raises IndexLoadError
        (and the process tries again, backing off, at later requests)."""
        self._pointer = _pointer_key(self.family)
        try:
            searcher, key, warning = open_current(self.family, self.part, self.shards)
        except (IndexLoadError, OSError, ValueError) as e:
            self.error = str(e)
            self._retry_later()
            raise
        read_ahead_rows(searcher)
        with self._swap_lock:
            self._searcher, self._applied_key = searcher, key
        self.error = warning
        return searcher

    def settled(self) -> Searcher | None:
        """The searcher if nothing was published or logged since it was swapped in (two stat calls, no
        lock, no wait: fit for an event loop); None when sync() has something to do, or none serves."""
        if _pointer_key(self.family) != self._pointer or self.changelog.key() != self._applied_key:
            return None
        return self._searcher

    def sync(self, wait: float = SYNC_WAIT_S) -> Searcher | None:
        """Called before each request: start loading a newly published version if CURRENT changed
        (or, with nothing loaded, when the next try is due), and have changes any process logged
        replayed (waiting up to `wait` seconds for them). Cheap when nothing changed: two stat calls."""
        self._check_pointer()
        if self._searcher is not None and self.changelog.key() != self._applied_key:
            self._catch_up(wait)
        return self._searcher

    # The change log ----------------------------------------------------------------------------

    def _catch_up(self, wait: float) -> None:
        with self._follow:
            self._wanted += 1
            mine = self._wanted
            if self._follower is None or not self._follower.is_alive():
                self._follower = threading.Thread(target=self._follow_loop, name="index-follower", daemon=True)
                self._follower.start()
            self._follow.notify_all()
            self._follow.wait_for(lambda: self._done >= mine, timeout=wait)

    def _follow_loop(self) -> None:
        while True:
            with self._follow:
                self._follow.wait_for(lambda: self._wanted > self._done)
                target = self._wanted
            try:
                self._replay()
            except Exception:
                # Whatever broke (a side file unreadable, say), the follower must live on: the next
                # change or request retries from the same offset.
                log.exception("replaying the change log failed")
            with self._follow:
                self._done = max(self._done, target)
                self._follow.notify_all()

    def _replay(self) -> None:
        with self._swap_lock:
            s = self._searcher
            key = self.changelog.key()  # before reading: a change after it makes the next sync read again
            if s is None or key == self._applied_key:
                return
            try:
                tail = self.changelog.read(s.applied.offset, s.applied.log_id)
                self._searcher = apply_changes(s, tail, self.changelog)
            except LogRewrittenError as e:
                # Changes this snapshot has not seen may be condensed away: load the version again.
                log.info("%s; loading index %s again", e, s.version)
                self._searcher, key = self._reopen(s)
            self._applied_key = key

    def _reopen(self, s: Searcher) -> tuple[Searcher, LogKey]:
        """The version `s` serves, loaded again with the whole log; CURRENT's if it was pruned."""
        try:
            return open_version(self.family, s.loaded.directory, self.part, self.shards)
        except (IndexLoadError, OSError, ValueError):
            return open_version(self.family, store.current_version(self.family), self.part, self.shards)

    # New versions ------------------------------------------------------------------------------

    def _retry_later(self) -> None:
        self._retry_at = time.monotonic() + self._retry_wait
        self._retry_wait = min(self._retry_wait * 2, RETRY_MAX_S)

    def _check_pointer(self) -> None:
        key = _pointer_key(self.family)
        healing = self._searcher is None and time.monotonic() >= self._retry_at
        if key == self._pointer and not healing:
            return
        with self._lock:
            if key == self._pointer and not healing:
                return
            if self._loading:
                if key != self._pointer:  # the running loader goes for the newest
                    self._pointer = key
                    name = store.read_pointer(self.family)
                    serving = self._searcher.version if self._searcher is not None else None
                    self._target = None if serving is not None and name in (None, serving) else name or ""
                return
            self._pointer = key
            name = store.read_pointer(self.family)
            serving = self._searcher.version if self._searcher is not None else None
            if self._searcher is not None and (name is None or name == serving):
                self._target = None
                if name is not None:
                    self.error = None  # e.g. rolled back from a version that failed to load
                return
            self._target = name or ""
            self._loading = True
            threading.Thread(target=self._load_loop, name="index-loader", daemon=True).start()

    def _load_loop(self) -> None:
        try:
            self._load_targets()
        except Exception as e:
            # Whatever broke (a version pruned while being read, say), this thread must not die holding
            # _loading, or no later version would ever be loaded: report it and let the next change retry.
            log.exception("index loader failed")
            with self._lock:
                self.error = f"loading version {self._target} failed: {e!r}"
                self._target = None
                self._loading = False
                if self._searcher is None:
                    self._retry_later()

    def _load_targets(self) -> None:
        """Load the target version off the request path; swap it in if it is still the target. With
        nothing served yet, whatever loads will do (open_current's fallback)."""
        while True:
            with self._lock:
                target = self._target
                if target is None:
                    self._loading = False
                    return
            t0 = time.perf_counter()
            serving = self._searcher.version if self._searcher is not None else "nothing"
            warning = None
            try:
                if self._searcher is None:
                    searcher, key, warning = open_current(self.family, self.part, self.shards)
                else:
                    version = store.current_version(self.family)
                    with self._lock:
                        if version.name != target:  # CURRENT moved on meanwhile: go for the newest
                            self._target = None if version.name == serving else version.name
                            continue
                    searcher, key = open_version(self.family, version, self.part, self.shards)
                read_ahead_rows(searcher)
                if self.part.whole or self.part.head:  # a shard alone runs no query to warm up
                    warm_up(searcher)
            except (IndexLoadError, OSError, ValueError) as e:
                log.error("index version %s not loaded, still serving %s: %s", target or "(none)", serving, e)
                with self._lock:
                    self.error = f"version {target} not loaded (still serving {serving}): {e}"
                    if self._target == target:
                        self._target = None
                    if self._searcher is None:
                        self._retry_later()
                continue
            with self._swap_lock, self._lock:
                if self._target != target and self._searcher is not None:
                    continue
                # Changes logged while it loaded are replayed by the follower at the next sync.
                if not (self.part.whole or self.part.head):  # only a shard answers for the version before
                    self.previous = self._searcher
                self._searcher, self._applied_key = searcher, key
                self._target = None if self._target == target else self._target
                self.error = warning
                self._retry_wait = RETRY_MIN_S
            log.info("now serving index %s (loaded in %.2fs)", searcher.version, time.perf_counter() - t0)
            if self.on_swap is not None:
                self.on_swap(searcher)

    # Online changes ----------------------------------------------------------------------------

    def _ready(self) -> Searcher:
        searcher = self.sync()
        if searcher is None:
            raise NotReadyError(f"index not loaded: {self.error or 'no index loaded'}")
        return searcher

    def _view(self, searcher: Searcher) -> LogView | None:
        """The log as of now, past this process's snapshot (call with the log's lock held); None when
        the log was condensed past it: the caller lets go of the lock and waits for a reload."""
        s = self._searcher or searcher
        try:
            return log_view(s, self.changelog.read(s.applied.offset, s.applied.log_id, shared=False))
        except LogRewrittenError:
            return None

    def _reload_wait(self) -> None:
        self._catch_up(RELOAD_WAIT_S)

    def add(self, data: bytes, loc: Location, idempotency_key: str | None = None) -> tuple[ImageRecord, bool]:
        """Add an image to the served index durably; returns its record and whether it was added now
        (False: these bytes, or this Idempotency-Key with these bytes, were added before, and the
        record is theirs). Raises the decode errors of features/decode.py, NoKeypointsError,
        NotReadyError, IdempotencyConflictError, StorageError. Searchable in this process when it
        returns."""
        searcher = self._ready()
        fmt, _, _ = probe_image(data)
        ext = _EXT.get(fmt, "img")
        rel = f"{UPLOADS}/{sha256_bytes(data)}.{ext}"
        # A retry of an add that landed costs no features: answered from the log first.
        view: LogView | None  # the log as of now, past the snapshot: read here, and again under the lock below
        with contextlib.suppress(LogRewrittenError):
            view = log_view(searcher, self.changelog.read(searcher.applied.offset, searcher.applied.log_id))
            done = _idempotent(view, rel, idempotency_key)
            if done is not None:
                return done, False
        # The slow part (decode, features, embedding) and the side files come before the lock.
        query = searcher.analyze(data)
        arrays = change_arrays(query)
        key = searcher.loaded.embedding_key
        with storage_errors("adding an image"):
            self.changelog.store_upload(data, ext)
            self.changelog.store_arrays(rel, key, arrays)
            for _ in range(2):
                with self.changelog.locked():
                    view = self._view(searcher)
                    if view is not None:
                        done = _idempotent(view, rel, idempotency_key)
                        if done is not None:
                            return done, False
                        # A delete of the same bytes may have removed them meanwhile: written again if so.
                        self.changelog.store_upload(data, ext)
                        arrays_rel, digest = self.changelog.store_arrays(rel, key, arrays)
                        rec = ImageRecord(view.max_id + 1, rel, loc, uploaded=True, idem=idempotency_key)
                        line = {
                            "op": "add",
                            "seq": view.seq + 1,
                            "id": rec.id,
                            "path": rel,
                            "loc": loc.as_list(),
                            "key": key,
                            "arrays": arrays_rel,
                            "arrays_sha256": digest,
                            "time": utc_timestamp(),
                        }
                        if idempotency_key is not None:
                            line["idem"] = idempotency_key
                        self.changelog.append(line)
                        break
                self._reload_wait()
            else:
                raise NotReadyError("the change log was condensed and this process is still loading it; retry")
        self._catch_up(SYNC_WAIT_S)
        return rec, True

    def delete(self, image_id: int) -> None:
        """Remove an image from the served index durably, and the bytes and arrays kept for it when it
        was added online; raises UnknownImageError, NotReadyError, StorageError."""
        searcher = self._ready()
        with storage_errors("deleting an image"):
            for _ in range(2):
                with self.changelog.locked():
                    view = self._view(searcher)
                    if view is not None:
                        rec = view.record(image_id)
                        if rec is None:
                            raise UnknownImageError(image_id)
                        line = {"op": "delete", "seq": view.seq + 1, "id": image_id, "path": rec.path}
                        self.changelog.append(line | {"time": utc_timestamp()})
                        if is_upload(rec.path) and not _shared_upload(view, rec):
                            self._remove_bytes(rec)
                        break
                self._reload_wait()
            else:
                raise NotReadyError("the change log was condensed and this process is still loading it; retry")
        self._catch_up(SYNC_WAIT_S)

    def _remove_bytes(self, rec: ImageRecord) -> None:
        """The stored bytes and arrays of a deleted image, removed. The delete is done (its line is on
        disk) whether or not this works: a disk that refuses is logged, and the next compaction
        removes what no change names any more."""
        try:
            self.changelog.remove(self.changelog.side_files(rec.path))
        except OSError as e:
            log.error("image %s is deleted, but its bytes remain until the next compaction: %s", rec.id, e)

    def rollback(self) -> tuple[str | None, str]:
        """Point CURRENT at the version served before; every process then swaps to it. Works with no
        index loaded (a rollback is what mends that). Returns (the version CURRENT named, the one it
        names now). Raises RollbackError when there is none that loads, StorageError."""
        previous, target = store.rollback(self.family)
        self._retry_at = 0.0  # with nothing loaded: try the rolled-back version now
        self._check_pointer()
        return previous, target.name


def _idempotent(view: LogView, upload: str, key: str | None) -> ImageRecord | None:
    """The image an add of these bytes (stored as `upload`) with this Idempotency-Key has made already,
    if any; raises IdempotencyConflictError where the key made another image."""
    if key is not None:
        rec = view.by_key(key)
        if rec is not None:
            if rec.path != upload:
                raise IdempotencyConflictError(key, rec.id)
            return rec
    return view.by_upload(upload)


def _shared_upload(view: LogView, rec: ImageRecord) -> bool:
    """Whether another image still stands on the same stored bytes (only in logs written before adds
    were idempotent by content)."""
    others = (r for r in (*view.added.values(), *view.searcher.images.values()) if r.uploaded and r.id != rec.id)
    return any(r.path == rec.path and view.record(r.id) is not None for r in others)


def compact(family: Path) -> Path:
    """Publish a new version with the logged changes folded in, so a restart need not replay them,
    then condense the log to what the kept versions and a new build still need. Changes logged while
    this runs stay in the log and are replayed on top of the new version."""
    searcher, _ = open_version(family, store.current_version(family))
    loaded, applied = searcher.loaded, searcher.applied
    extra = {
        "changes_seq": applied.seq,
        "max_id": applied.max_id,
        "compacted_from": loaded.version,
        "created": utc_timestamp(),
    }
    out = republish(searcher, family, int(loaded.manifest.get("shards", 1)), extra)
    log.info("compacted %s + changes up to %d into %s", loaded.version, applied.seq, out.name)
    condense_log(family, applied.seq, applied.max_id)
    return out


def condense_log(family: Path, upto: int, max_id: int) -> None:
    """Replace the change log by what is still needed of its changes up to `upto` (indexer/changes.py:
    condense), the later ones as they are, under the writers' lock; then remove the side files no
    change and no kept version needs any more."""
    changelog = ChangeLog(family)
    with storage_errors(f"condensing the change log of {family}"), changelog.locked():
        with store.publish_lock(family):  # the kept versions stay the same meanwhile
            holders = [(_folded(family / v), _uploaded(family / v)) for v in store.kept(family)]
        tail = changelog.read(0, shared=False)
        if tail.bad_lines:
            log.warning("%s: %d corrupt line(s) dropped", changelog.path, tail.bad_lines)
        base = base_line(max(upto, tail.base_seq), max(max_id, tail.base_max_id))
        kept = condense(tail.records, upto, holders) + [r for r in tail.records if r["seq"] > upto]
        changelog.rewrite([base, *(encode_line(r) for r in kept)])
        _remove_unreferenced(changelog, kept, holders)
    log.info("condensed %s: %d of %d changes kept", changelog.path, len(kept), len(tail.records))


def _folded(version: Path) -> int:
    return int(store.read_manifest(version).get("changes_seq", 0))


def _uploaded(version: Path) -> set[tuple[int, str]]:
    """(id, path) of the images added online that a version holds."""
    try:
        raw = (version / "images.json").read_text(encoding="utf-8")
    except OSError:
        return set()
    return {(int(r["id"]), str(r["path"])) for r in json.loads(raw) if r.get("uploaded")}


def _remove_unreferenced(changelog: ChangeLog, kept: list[dict[str, Any]], holders: list[Holder]) -> None:
    """Remove uploads and arrays that neither a change left in the log nor a kept version names."""
    paths = {r["path"] for r in kept if r["op"] == "add"} | {p for _, held in holders for _, p in held}
    arrays = {r.get("arrays") for r in kept if r["op"] == "add"}
    stale = []
    for folder, wanted in ((changelog.family / UPLOADS, paths), (changelog.family / CACHE, arrays)):
        if folder.is_dir():
            names = (f for f in folder.iterdir() if not f.name.startswith("."))  # dot-named: temporaries
            stale += [f for f in names if f"{folder.name}/{f.name}" not in wanted]
    try:
        changelog.remove(stale)
    except OSError as e:  # the log is condensed already; the next compaction tries again
        log.error("%d file(s) no change names could not be removed: %s", len(stale), e)


def republish(searcher: Searcher, family: Path, shards: int, manifest_extra: dict[str, object]) -> Path:
    """Publish what a (whole) searcher holds, its online changes included, as a new version of
    `family` in `shards` shards, with its manifest plus `manifest_extra`."""
    loaded = searcher.loaded
    ids = sorted(searcher.images)
    files = {n: loaded.directory / n for n in ("vectorizer.npz", "encoder.npz", "split.json")}
    files = {n: p for n, p in files.items() if p.is_file()}
    family.mkdir(parents=True, exist_ok=True)
    staged = None
    if searcher.verifier is not None:
        staged = searcher.verifier.features(ids).save(family / f".verify-republish-{os.getpid()}.npz.tmp")
        files["verify.npz"] = staged
    skip = ("version", "count", "dim", "checksums", "shards", "seq", "previous")
    manifest = {k: v for k, v in loaded.manifest.items() if k not in skip} | manifest_extra
    manifest["max_id"] = max(int(manifest.get("max_id", -1)), searcher.applied.max_id)
    try:
        return store.publish(family, searcher.index, [searcher.images[i] for i in ids], files, manifest, shards)
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)
