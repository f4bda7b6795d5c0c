"""The served index as it changes: hot swap to a newly published version, online adds and deletes.

All state is in files (indexer/store.py: versions and CURRENT; indexer/changes.py: the change log),
so any number of server processes stay in step: each checks, before a request, whether CURRENT names
another version (loaded in a background thread, then swapped in) and whether the change log grew
(the new lines applied at once). Requests keep the Searcher they started with; every change builds a
new one and swaps the reference.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from features.decode import probe_image
from indexer import store
from indexer.changes import ChangeLog
from indexer.store import ImageRecord, IndexLoadError
from pipeline.searcher import Searcher

log = logging.getLogger(__name__)

_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}


class UnknownImageError(KeyError):
    """No map image with this id in the served index."""


class NotReadyError(RuntimeError):
    """No index is loaded yet."""


@dataclass(frozen=True)
class Location:
    easting: float
    northing: float
    heading: float


def open_version(family: Path, version: Path) -> Searcher:
    """Load a version and replay the family's change log on top of it."""
    searcher = Searcher(store.load(version))
    changelog = ChangeLog(family)
    return searcher.with_changes(changelog.read(0), changelog)


def _pointer_key(family: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(family / "CURRENT")
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class LiveIndex:
    def __init__(self, family: Path) -> None:
        self.family = family
        self.changelog = ChangeLog(family)
        self._searcher: Searcher | None = None
        self.error: str | None = None  # why the latest version is not served (None: it is)
        self._pointer: tuple[int, int, int] | None = None
        self._target: str | None = None  # version waiting to be loaded in the background
        self._loading = False
        self._lock = threading.Lock()  # guards the fields above
        self._tail_lock = threading.Lock()  # one thread applies changes / swaps at a time
        # Called (from the loader thread) after another version was swapped in, e.g. to update metrics.
        self.on_swap: Callable[[Searcher], None] | None = None

    @property
    def searcher(self) -> Searcher | None:
        return self._searcher

    def load_now(self) -> Searcher:
        """Load the current version (at start-up); raises IndexLoadError."""
        self._pointer = _pointer_key(self.family)
        try:
            searcher = open_version(self.family, store.current_version(self.family))
        except (IndexLoadError, OSError, ValueError) as e:
            self.error = str(e)
            raise
        with self._tail_lock:
            self._searcher = self._caught_up(searcher)
        self.error = None
        return self._searcher

    # Keeping up with the files -------------------------------------------------------------

    def refresh(self) -> Searcher | None:
        """Called before each request: start loading a newly published version if CURRENT changed,
        and apply changes other processes logged. Cheap when nothing changed (two stat calls)."""
        self._check_pointer()
        s = self._searcher
        if s is not None and self.changelog.size() > s.applied.offset:
            with self._tail_lock:
                self._searcher = self._caught_up(self._searcher)
        return self._searcher

    def _caught_up(self, searcher: Searcher | None) -> Searcher | None:
        """Call with _tail_lock held."""
        if searcher is None or self.changelog.size() <= searcher.applied.offset:
            return searcher
        return searcher.with_changes(self.changelog.read(searcher.applied.offset), self.changelog)

    def _check_pointer(self) -> None:
        key = _pointer_key(self.family)
        if key == self._pointer:
            return
        with self._lock:
            if key == self._pointer:
                return
            self._pointer = key
            name = store.read_pointer(self.family)
            serving = self._searcher.loaded.version if self._searcher is not None else None
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
            serving = self._searcher.loaded.version if self._searcher is not None else "nothing"
            try:
                version = store.current_version(self.family)
                with self._lock:
                    if version.name != target:  # CURRENT moved on meanwhile: go for the newest
                        self._target = None if version.name == serving else version.name
                        continue
                searcher = open_version(self.family, version)
                searcher.warm_up()
            except (IndexLoadError, OSError, ValueError) as e:
                log.error("index version %s not loaded, still serving %s: %s", target, serving, e)
                with self._lock:
                    self.error = f"version {target} not loaded (still serving {serving}): {e}"
                    if self._target == target:
                        self._target = None
                continue
            with self._tail_lock, self._lock:
                if self._target != target:
                    continue
                self._searcher = self._caught_up(searcher)
                self._target = None
                self.error = None
            log.info("now serving index %s (loaded in %.2fs)", target, time.perf_counter() - t0)
            if self.on_swap is not None and self._searcher is not None:
                self.on_swap(self._searcher)

    # Online changes --------------------------------------------------------------------------

    def add(self, data: bytes, loc: Location) -> ImageRecord:
        """Add an image to the served index durably; raises the decode errors of features/decode.py,
        NoKeypointsError, NotReadyError."""
        searcher = self.refresh()
        if searcher is None:
            raise NotReadyError(self.error or "no index loaded")
        # The slow part (decode, features, embedding) and the side files come before the lock.
        query = searcher.analyze(data)
        fmt, _, _ = probe_image(data)
        rel = self.changelog.store_upload(data, _EXT.get(fmt, "img"))
        arrays, digest = self.changelog.store_arrays(searcher.change_arrays(query))
        with self._tail_lock, self.changelog.locked():
            current = self._caught_up(self._searcher)
            assert current is not None  # only ever replaced by another searcher
            new_id = current.applied.max_id + 1
            body = {
                "op": "add",
                "seq": current.applied.seq + 1,
                "id": new_id,
                "path": rel,
                "loc": [loc.easting, loc.northing, loc.heading],
                "key": searcher.embedding_key,
                "arrays": arrays,
                "arrays_sha256": digest,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            self.changelog.append(body)
            self._searcher = self._caught_up(current)
        return ImageRecord(new_id, rel, (loc.easting, loc.northing, loc.heading), uploaded=True)

    def delete(self, image_id: int) -> None:
        """Remove an image from the served index durably; raises UnknownImageError, NotReadyError."""
        if self.refresh() is None:
            raise NotReadyError(self.error or "no index loaded")
        with self._tail_lock, self.changelog.locked():
            current = self._caught_up(self._searcher)
            assert current is not None
            rec = current.images.get(image_id)
            if rec is None:
                raise UnknownImageError(image_id)
            body = {
                "op": "delete",
                "seq": current.applied.seq + 1,
                "id": image_id,
                "path": rec.path,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            self.changelog.append(body)
            self._searcher = self._caught_up(current)

    def rollback(self) -> str:
        """Point CURRENT at the previous version; every process then swaps to it. Returns its name."""
        target = store.rollback(self.family)
        self._check_pointer()
        return target.name


def compact(family: Path) -> Path:
    """Publish a new version with the logged changes folded in, so a restart need not replay them.
    Changes logged while this runs stay in the log and are replayed on top of the new version."""
    searcher = open_version(family, store.current_version(family))
    loaded = searcher.loaded
    ids = sorted(searcher.images)
    files = {n: loaded.directory / n for n in ("vectorizer.npz", "encoder.npz", "split.json")}
    files = {n: p for n, p in files.items() if p.is_file()}
    staged = None
    if searcher.verifier is not None:
        staged = searcher.verifier.features(ids).save(family / f".verify-compact-{os.getpid()}.npz")
        files["verify.npz"] = staged
    manifest = {k: v for k, v in loaded.manifest.items() if k not in ("version", "count", "dim", "checksums")}
    manifest |= {
        "changes_seq": searcher.applied.seq,
        "compacted_from": loaded.version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        out = store.publish(family, searcher.index, [searcher.images[i] for i in ids], files, manifest)
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)
    log.info("compacted %s + changes up to %d into %s", loaded.version, searcher.applied.seq, out.name)
    return out
