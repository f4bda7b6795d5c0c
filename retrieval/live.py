"""The served index as it changes: hot swap to a newly published version, online adds and deletes.

All state is in files (indexer/store.py: versions and CURRENT; indexer/changes.py: the change log),
so any number of server processes stay in step. Requests only look: `sync` checks with two stat calls
whether CURRENT names another version (then loaded by the loader thread and swapped in) and whether
the change log changed (then replayed by the follower thread, retrieval/replay.py, which the request
waits for, briefly, so a change made by any process is searchable at once). Neither thread ever runs
in a request, so a read request never runs the feature pipeline for an image another process added.
Requests keep the Searcher they started with; every change builds a new one and swaps the reference.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common.clock import utc_timestamp
from common.files import read_ahead
from dataset.layout import Location
from features.decode import probe_image
from indexer import store
from indexer.changes import ChangeLog
from indexer.store import WHOLE, ImageRecord, IndexLoadError, Part
from retrieval.query import warm_up
from retrieval.replay import apply_changes, change_arrays, log_view
from retrieval.searcher import Searcher, ShardClient

log = logging.getLogger(__name__)

_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}
# How long a request waits for the follower to replay a change it saw in the log. Replaying an add
# made by the same model takes milliseconds; one that must be embedded again (another version's
# change) takes a query's time. Past the wait, the request is served from the previous snapshot.
SYNC_WAIT_S = 2.0


class NotReadyError(RuntimeError):
    """No index is loaded (yet)."""


class UnknownImageError(LookupError):
    """No map image with this id in the served index."""

    def __init__(self, image_id: int) -> None:
        super().__init__(f"no map image with id {image_id}")
        self.image_id = image_id


def open_version(
    family: Path, version: Path, part: Part = WHOLE, shards: ShardClient | None = None
) -> tuple[Searcher, tuple[int, int] | None]:
    """Load a version (or a part of it: retrieval/shards.py) and replay the family's change log on top
    of it; also returns the log's key (ChangeLog.key) as of before it was read."""
    searcher = Searcher(store.load(version, part), shards=shards)
    changelog = ChangeLog(family)
    key = changelog.key()
    return apply_changes(searcher, changelog.read(0), changelog), key


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
        # One thread swaps snapshots at a time (the follower replaying, the loader swapping a version in).
        self._swap_lock = threading.Lock()
        self._applied_key: tuple[int, int] | None = None  # ChangeLog.key the snapshot has replayed
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
        """Load the current version (at start-up); raises IndexLoadError."""
        self._pointer = _pointer_key(self.family)
        try:
            searcher, key = open_version(self.family, store.current_version(self.family), self.part, self.shards)
        except (IndexLoadError, OSError, ValueError) as e:
            self.error = str(e)
            raise
        read_ahead_rows(searcher)
        with self._swap_lock:
            self._searcher, self._applied_key = searcher, key
        self.error = None
        return searcher

    def settled(self) -> Searcher | None:
        """The searcher if nothing was published or logged since it was swapped in (two stat calls, no
        lock, no wait: fit for an event loop); None when sync() has something to do, or none serves."""
        if _pointer_key(self.family) != self._pointer or self.changelog.key() != self._applied_key:
            return None
        return self._searcher

    def sync(self, wait: float = SYNC_WAIT_S) -> Searcher | None:
        """Called before each request: start loading a newly published version if CURRENT changed,
        and have changes any process logged replayed (waiting up to `wait` seconds for them).
        Cheap when nothing changed: two stat calls."""
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
            self._searcher = apply_changes(s, self.changelog.read(s.applied.offset), self.changelog)
            self._applied_key = key

    # New versions ------------------------------------------------------------------------------

    def _check_pointer(self) -> None:
        key = _pointer_key(self.family)
        if key == self._pointer:
            return
        with self._lock:
            if key == self._pointer:
                return
            self._pointer = key
            name = store.read_pointer(self.family)
            serving = self._searcher.version if self._searcher is not None else None
            if name is None or name == serving:
                self._target = None
                if name is not None:
                    self.error = None  # e.g. rolled back from a version that failed to load
                return
            self._target = name
            if not self._loading:
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

    def _load_targets(self) -> None:
        """Load the target version off the request path; swap it in if it is still the target."""
        while True:
            with self._lock:
                target = self._target
                if target is None:
                    self._loading = False
                    return
            t0 = time.perf_counter()
            serving = self._searcher.version if self._searcher is not None else "nothing"
            try:
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
                log.error("index version %s not loaded, still serving %s: %s", target, serving, e)
                with self._lock:
                    self.error = f"version {target} not loaded (still serving {serving}): {e}"
                    if self._target == target:
                        self._target = None
                continue
            with self._swap_lock, self._lock:
                if self._target != target:
                    continue
                # Changes logged while it loaded are replayed by the follower at the next sync.
                if not (self.part.whole or self.part.head):  # only a shard answers for the version before
                    self.previous = self._searcher
                self._searcher, self._applied_key = searcher, key
                self._target = None
                self.error = None
            log.info("now serving index %s (loaded in %.2fs)", target, time.perf_counter() - t0)
            if self.on_swap is not None:
                self.on_swap(searcher)

    # Online changes ----------------------------------------------------------------------------

    def _ready(self) -> Searcher:
        searcher = self.sync()
        if searcher is None:
            raise NotReadyError(f"index not loaded: {self.error or 'no index loaded'}")
        return searcher

    def add(self, data: bytes, loc: Location) -> ImageRecord:
        """Add an image to the served index durably; raises the decode errors of features/decode.py,
        NoKeypointsError, NotReadyError. Searchable in this process when it returns."""
        searcher = self._ready()
        # The slow part (decode, features, embedding) and the side files come before the lock.
        query = searcher.analyze(data)
        fmt, _, _ = probe_image(data)
        rel = self.changelog.store_upload(data, _EXT.get(fmt, "img"))
        arrays, digest = self.changelog.store_arrays(change_arrays(query))
        with self.changelog.locked():
            s = self._searcher or searcher
            view = log_view(s, self.changelog.read(s.applied.offset))
            new_id = view.max_id + 1
            self.changelog.append(
                {
                    "op": "add",
                    "seq": view.seq + 1,
                    "id": new_id,
                    "path": rel,
                    "loc": loc.as_list(),
                    "key": searcher.loaded.embedding_key,
                    "arrays": arrays,
                    "arrays_sha256": digest,
                    "time": utc_timestamp(),
                }
            )
        self._catch_up(SYNC_WAIT_S)
        return ImageRecord(new_id, rel, loc, uploaded=True)

    def delete(self, image_id: int) -> None:
        """Remove an image from the served index durably; raises UnknownImageError, NotReadyError."""
        searcher = self._ready()
        with self.changelog.locked():
            s = self._searcher or searcher
            view = log_view(s, self.changelog.read(s.applied.offset))
            path = view.paths.get(image_id)
            if path is None:
                raise UnknownImageError(image_id)
            self.changelog.append(
                {"op": "delete", "seq": view.seq + 1, "id": image_id, "path": path, "time": utc_timestamp()}
            )
        self._catch_up(SYNC_WAIT_S)

    def rollback(self) -> str:
        """Point CURRENT at the previous version; every process then swaps to it. Returns its name.
        Raises RollbackError when there is none that loads."""
        target = store.rollback(self.family)
        self._check_pointer()
        return target.name


def compact(family: Path) -> Path:
    """Publish a new version with the logged changes folded in, so a restart need not replay them.
    Changes logged while this runs stay in the log and are replayed on top of the new version."""
    searcher, _ = open_version(family, store.current_version(family))
    loaded = searcher.loaded
    extra = {"changes_seq": searcher.applied.seq, "compacted_from": loaded.version, "created": utc_timestamp()}
    out = republish(searcher, family, int(loaded.manifest.get("shards", 1)), extra)
    log.info("compacted %s + changes up to %d into %s", loaded.version, searcher.applied.seq, out.name)
    return out


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
        staged = searcher.verifier.features(ids).save(family / f".verify-republish-{os.getpid()}.npz")
        files["verify.npz"] = staged
    skip = ("version", "count", "dim", "checksums", "shards")
    manifest = {k: v for k, v in loaded.manifest.items() if k not in skip} | manifest_extra
    try:
        return store.publish(family, searcher.index, [searcher.images[i] for i in ids], files, manifest, shards)
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)
