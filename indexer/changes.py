"""Online changes to an index family: a write-ahead, append-only log shared by every server process.

Layout, beside the versions of one index family:
    index-<preset>/changes.log                     one JSON line per change, each with its own checksum
    index-<preset>/changes.lock                    writers hold an exclusive flock on it while appending,
                                                   readers a shared one while reading
    index-<preset>/uploads/<sha256>.<ext>          the bytes of each added image (content-addressed)
    index-<preset>/changes/<sha256>-<key>.npz      its embedding and verification keypoints as the
                                                   model with embedding key <key> makes them (a cache)

The log belongs to the family, not to a version, so changes survive a new build, a hot swap and a
rollback: whatever version is served, every change numbered after the version's `changes_seq` (0
unless the version was compacted with the changes folded in) is replayed on top of it. Numbers
continue from the highest the family has seen, in the log or in any version's manifest, so a change
is never numbered below what a version already holds, even if the log is lost.

A change is acknowledged only after its line (and the files it names, and the folders holding them)
are fsync'd. Readers never see a line that was not: they read under a shared lock, and a writer whose
write or fsync fails cuts its line off again before it lets go of the exclusive one. A crash
mid-append leaves at most a torn last line, which readers ignore and the next writer cuts off.

Compaction (`rewrite`) replaces the log by a shorter one: a `base` line (the number and the highest
id up to which it was condensed), then what any kept version or a new build still needs of the
changes up to there, then the later lines as they were. A reader notices the new file by its inode.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.files import (
    atomic_write,
    confined_file,
    file_mode,
    fsync_directory,
    json_digest,
    make_dirs,
    npz_arrays,
    npz_bytes,
    sha256_bytes,
)

log = logging.getLogger(__name__)

LOG_NAME = "changes.log"
UPLOADS = "uploads"
CACHE = "changes"
OPS = ("add", "delete", "base")


def _digest(body: dict[str, Any]) -> str:
    return json_digest(body, 16, compact=True)


def encode_line(body: dict[str, Any]) -> bytes:
    return json.dumps(body | {"sum": _digest(body)}, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def decode_line(line: bytes) -> dict[str, Any] | None:
    """The record of one complete line, or None when it is not valid JSON or fails its checksum."""
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("sum"), str):
        return None
    body = {k: v for k, v in rec.items() if k != "sum"}
    if _digest(body) != rec["sum"]:
        return None
    if body.get("op") not in OPS or not _is_int(body.get("seq")):
        return None
    if body["op"] == "base":
        return body if _is_int(body.get("max_id")) else None
    if not _is_int(body.get("id")) or not isinstance(body.get("path"), str):
        return None
    loc = body.get("loc")
    if body["op"] == "add" and not (
        isinstance(loc, list) and len(loc) == 3 and all(isinstance(v, int | float) for v in loc)
    ):
        return None
    return body


def is_upload(path: str) -> bool:
    """Whether an image path names bytes stored with the change log (an image added online)."""
    return path.startswith(f"{UPLOADS}/")


def content_id(path: str) -> str:
    """uploads/<sha256>.<ext> -> <sha256>: what names an upload's side files."""
    return Path(path).stem


@dataclass
class Tail:
    """Records read from the log past some offset."""

    records: list[dict[str, Any]] = field(default_factory=list)  # changes (add, delete), in log order
    offset: int = 0  # bytes of complete lines consumed so far
    bad_lines: int = 0
    log_id: int | None = None  # inode of the log file read (None: there is none)
    rewritten: bool = False  # the log was replaced since the offset was taken: read from its start
    base_seq: int = 0  # a rewritten log's base: its changes up to here were condensed
    base_max_id: int = -1


class ChangeLog:
    def __init__(self, family: Path) -> None:
        self.family = family
        self.path = family / LOG_NAME

    def key(self) -> tuple[int, int, int] | None:
        """(inode, size, mtime) of the log, None while there is none: it changes with every append, cut
        of a torn line and rewrite, so a reader can tell with one stat call whether to read again."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def read(self, offset: int = 0, log_id: int | None = None, *, shared: bool = True) -> Tail:
        """Complete lines from `offset` of the log file `log_id` on (from the start when the log is
        another file now: rewritten or recreated); a torn last line is left for later. `shared`
        takes the readers' lock, so no line a writer may still take back is read; a writer, which
        holds the exclusive lock, reads with shared=False."""
        with self._shared() if shared else contextlib.nullcontext():
            try:
                with open(self.path, "rb") as f:
                    ino = os.fstat(f.fileno()).st_ino
                    rewritten = log_id is not None and ino != log_id
                    start = 0 if rewritten else offset
                    f.seek(start)
                    data = f.read()
            except FileNotFoundError:
                return Tail(offset=0, log_id=None, rewritten=log_id is not None)
        end = data.rfind(b"\n") + 1
        tail = Tail(offset=start + end, log_id=ino, rewritten=rewritten)
        for line in data[:end].splitlines():
            rec = decode_line(line)
            if rec is None:
                tail.bad_lines += 1
                log.warning("%s: skipping a corrupt line: %r", self.path, line[:80])
            elif rec["op"] == "base":
                tail.base_seq, tail.base_max_id = int(rec["seq"]), int(rec["max_id"])
            else:
                tail.records.append(rec)
        return tail

    @contextlib.contextmanager
    def _shared(self) -> Iterator[None]:
        try:
            lock = open(self.family / "changes.lock", "a")  # noqa: SIM115 - closed below
        except OSError:
            yield  # a read-only family has no writers to wait for
            return
        with lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            yield

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive among writers and readers of all processes (released by the kernel if the holder
        dies)."""
        make_dirs(self.family)
        with open(self.family / "changes.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def append(self, body: dict[str, Any]) -> None:
        """Append one record and fsync it; call with the lock held. On any error the line is taken
        back before the lock is released (no reader saw it) and the OSError raised."""
        line = encode_line(body)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, file_mode())
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # A writer died mid-line: that change was never acknowledged, so cut it off rather
                # than glue this line to it.
                keep = os.pread(fd, size, 0).rfind(b"\n") + 1
                log.warning("%s: cutting off a torn last line (%d bytes)", self.path, size - keep)
                os.ftruncate(fd, keep)
                size = keep
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                if created:
                    fsync_directory(self.family)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                raise
        finally:
            os.close(fd)

    def rewrite(self, lines: Iterable[bytes]) -> None:
        """Replace the log atomically by `lines` (complete, encoded); call with the lock held."""
        atomic_write(self.path, b"".join(lines))

    # Side files, written and fsync'd before the log line that names them.

    def store_upload(self, data: bytes, ext: str) -> str:
        """Keep the bytes of an added image; returns its path relative to the family folder."""
        rel = f"{UPLOADS}/{sha256_bytes(data)}.{ext}"
        path = self.family / rel
        if not path.is_file() or path.stat().st_size != len(data):
            atomic_write(path, data)
        return rel

    def store_arrays(self, upload: str, embedding_key: str, arrays: dict[str, np.ndarray]) -> tuple[str, str]:
        """Keep an added image's embedding and keypoints as the model `embedding_key` makes them;
        returns (relative path, sha256)."""
        data = npz_bytes(**arrays)
        digest = sha256_bytes(data)
        rel = f"{CACHE}/{content_id(upload)}-{embedding_key}.npz"
        path = self.family / rel
        if not path.is_file() or sha256_bytes(path.read_bytes()) != digest:
            atomic_write(path, data)
        return rel, digest

    def load_arrays(self, rel: str, digest: str) -> dict[str, np.ndarray] | None:
        """The arrays stored by store_arrays, or None if the file is missing or altered."""
        path = self.resolve(rel)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if sha256_bytes(data) != digest:
            return None
        return npz_arrays(data)

    def side_files(self, upload: str) -> list[Path]:
        """The files kept for an upload: its bytes and every model's arrays of it."""
        files = list((self.family / CACHE).glob(f"{content_id(upload)}-*.npz"))
        path = self.family / upload
        return [path, *files] if path.is_file() else files

    def remove(self, files: Iterable[Path]) -> None:
        """Unlink side files durably (their folders fsync'd): a deleted image leaves no bytes."""
        folders = set()
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
                folders.add(f.parent)
        for d in folders:
            fsync_directory(d)

    def resolve(self, rel: str) -> Path | None:
        """A side file named in the log, confined to the family folder."""
        return confined_file(self.family, rel)


# A kept version's changes_seq and the (id, path) of each image added online that it holds.
Holder = tuple[int, set[tuple[int, str]]]


def condense(records: list[dict[str, Any]], upto: int, holders: list[Holder]) -> list[dict[str, Any]]:
    """What must stay of the changes numbered up to `upto` (the rest is dropped from the log):
    - an add whose image is not deleted by then (a new build replays it);
    - a delete of a map image of the data folder (a new build holds that image again);
    - a delete of an image added online, while a kept version numbered before the delete holds that
      image (`holders`):
      replayed on that version after a rollback, it keeps the image deleted.
    An add and the delete of the same image, both up to `upto`, held by no such version, go both."""
    deleted = {(r["id"], r["path"]) for r in records if r["op"] == "delete" and r["seq"] <= upto}
    out = []
    for r in records:
        if r["seq"] > upto:
            continue
        image = (r["id"], r["path"])
        if r["op"] == "add":
            if image not in deleted:
                out.append(r)
        elif not is_upload(r["path"]) or any(c < r["seq"] and image in held for c, held in holders):
            out.append(r)
    return out


def base_line(seq: int, max_id: int) -> bytes:
    return encode_line({"op": "base", "seq": seq, "max_id": max_id})
