"""Online changes to an index family: a write-ahead, append-only log shared by every server process.

Layout, beside the versions of one index family:
    index-<preset>/changes.log            one JSON line per change, each with its own checksum
    index-<preset>/changes.lock           writers hold an exclusive flock on it while appending
    index-<preset>/uploads/<sha256>.<ext>  the bytes of each added image (content-addressed)
    index-<preset>/changes/<sha256>.npz    its embedding and verification keypoints (a cache)

The log belongs to the family, not to a version, so changes survive a new build, a hot swap and a
rollback: whatever version is served, every change after the version's `changes_seq` (0 unless the
version was compacted with the changes folded in) is replayed on top of it. A change is acknowledged
only after its line (and the files it names) are fsync'd; a crash mid-append leaves at most a torn
last line, which readers ignore and the next writer cuts off (it was never acknowledged).
Readers never lock: they read complete lines past the offset they have applied.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.files import atomic_write, confined_file, fsync_directory, json_digest, npz_arrays, npz_bytes, sha256_bytes

log = logging.getLogger(__name__)

LOG_NAME = "changes.log"
UPLOADS = "uploads"
CACHE = "changes"


class ChangeLogError(RuntimeError):
    """A change could not be recorded durably."""


def _digest(body: dict[str, Any]) -> str:
    return json_digest(body, 16, compact=True)


def encode_line(body: dict[str, Any]) -> bytes:
    return json.dumps(body | {"sum": _digest(body)}, sort_keys=True, separators=(",", ":")).encode() + b"\n"


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
    if body.get("op") not in ("add", "delete") or not isinstance(body.get("seq"), int):
        return None
    if not isinstance(body.get("id"), int) or not isinstance(body.get("path"), str):
        return None
    loc = body.get("loc")
    if body["op"] == "add" and not (
        isinstance(loc, list) and len(loc) == 3 and all(isinstance(v, int | float) for v in loc)
    ):
        return None
    return body


@dataclass
class Tail:
    """Records read from the log past some offset."""

    records: list[dict[str, Any]] = field(default_factory=list)
    offset: int = 0  # bytes of complete lines consumed so far
    bad_lines: int = 0


class ChangeLog:
    def __init__(self, family: Path) -> None:
        self.family = family
        self.path = family / LOG_NAME

    def key(self) -> tuple[int, int] | None:
        """(size, mtime) of the log, None while there is none: it changes with every append (and with
        the cut of a torn line), so a reader can tell with one stat call whether to read again."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_size, st.st_mtime_ns)

    def read(self, offset: int = 0) -> Tail:
        """Complete lines from `offset` on; a torn last line (no newline yet) is left for later."""
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return Tail(offset=offset)
        end = data.rfind(b"\n") + 1
        tail = Tail(offset=offset + end)
        for line in data[:end].splitlines():
            rec = decode_line(line)
            if rec is None:
                tail.bad_lines += 1
                log.warning("%s: skipping a corrupt line: %r", self.path, line[:80])
            else:
                tail.records.append(rec)
        return tail

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive among writers of all processes (released by the kernel if the holder dies)."""
        self.family.mkdir(parents=True, exist_ok=True)
        with open(self.family / "changes.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def append(self, body: dict[str, Any]) -> None:
        """Append one record and fsync it; call with the lock held."""
        line = encode_line(body)
        created = not self.path.exists()
        with open(self.path, "ab+") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    # A writer died mid-line: that change was never acknowledged, so cut it off rather
                    # than glue this line to it.
                    f.seek(0)
                    keep = f.read().rfind(b"\n") + 1
                    log.warning("%s: cutting off a torn last line (%d bytes)", self.path, size - keep)
                    f.truncate(keep)
            f.seek(0, os.SEEK_END)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_directory(self.family)

    # Side files, written and fsync'd before the log line that names them.

    def store_upload(self, data: bytes, ext: str) -> str:
        """Keep the bytes of an added image; returns its path relative to the family folder."""
        rel = f"{UPLOADS}/{sha256_bytes(data)}.{ext}"
        path = self.family / rel
        if not path.is_file() or path.stat().st_size != len(data):
            atomic_write(path, data)
        return rel

    def store_arrays(self, arrays: dict[str, np.ndarray]) -> tuple[str, str]:
        """Keep an added image's embedding and keypoints; returns (relative path, sha256)."""
        data = npz_bytes(**arrays)
        digest = sha256_bytes(data)
        rel = f"{CACHE}/{digest}.npz"
        atomic_write(self.family / rel, data)
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

    def resolve(self, rel: str) -> Path | None:
        """A side file named in the log, confined to the family folder."""
        return confined_file(self.family, rel)
