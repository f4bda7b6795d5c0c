"""Files written whole or not at all, checksums, and paths that must stay inside a folder.

Every artifact (feature caches, models, index versions, the change log's side files) is written
through here: to a temporary name in the same folder, then renamed over the final name, so a crash
never leaves a half-written file under a name a reader trusts. A durable write also fsyncs the file,
its folder, and every folder it had to create, so the entry survives a power cut, not only a crash.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import mmap
import os
import tempfile
import threading
import weakref
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np


class StorageError(RuntimeError):
    """A write that had to be durable failed: the disk is read-only, failing or gone. Nothing the
    operation promised was acknowledged; retrying later is safe."""


class StorageFullError(StorageError):
    """A write that had to be durable failed for lack of space (or quota)."""


_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn an OSError raised inside into StorageFullError (no space) or StorageError (anything
    else: read-only, I/O error, permissions), saying what was being written."""
    try:
        yield
    except OSError as e:
        cls = StorageFullError if e.errno in _FULL else StorageError
        raise cls(f"{what}: {e.strerror or e}") from e


@functools.cache
def file_mode() -> int:
    """The mode a plain open() would give a new file (0o666 less the umask). Temporary files are made
    0o600; renamed into place as they are, a version published by one user (root, say) would be
    unreadable to the user that serves it. Read from /proc: os.umask can only be read by setting it,
    which is not safe while other threads create files."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644


def fsync_directory(path: Path) -> None:
    """Make renames and new entries in a folder durable (the files' own data needs its own fsync)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(folder: Path) -> None:
    """fsync every file directly in `folder`, then the folder itself (before it is renamed into place:
    the rename makes the folder's entry durable, not the entries inside it)."""
    for f in folder.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_directory(folder)


def make_dirs(path: Path, *, durable: bool = True) -> Path:
    """mkdir -p; `durable` also fsyncs the parent of every folder it created, so that a file made
    durable inside it is not lost with a folder entry that never reached the disk."""
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue  # made meanwhile by another writer, who makes it durable
        if durable:
            fsync_directory(d.parent)
    return path


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> Path:
    """Write `data` under `path` atomically; `durable` also fsyncs the file and its folder (and any
    folder it had to create), so the write survives a power cut once this returns (what an
    acknowledged change needs)."""
    make_dirs(path.parent, durable=durable)
    # A name of its own per writer: two threads or processes may write the same file at once.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_directory(path.parent)
    return path


TMP_SUFFIX = ".tmp"  # what every temporary name ends with (atomic_write's and a version's folder)


def sweep_temporaries(folder: Path, older_than: float) -> int:
    """Remove temporary files (dot-named, ending .tmp) directly in `folder` last changed before
    `older_than` (a time.time()): what writers killed mid-write left behind. A writer at work keeps
    its temporary younger than that. Returns how many were removed."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for e in entries:
        if not (e.name.startswith(".") and e.name.endswith(TMP_SUFFIX)) or not e.is_file(follow_symlinks=False):
            continue
        with contextlib.suppress(FileNotFoundError):
            if e.stat(follow_symlinks=False).st_mtime < older_than:
                os.unlink(e.path)
                removed += 1
    return removed


def atomic_write_text(path: Path, text: str, *, durable: bool = True) -> Path:
    return atomic_write(path, text.encode("utf-8"), durable=durable)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """The bytes of an uncompressed .npz holding `arrays` (no pickles: every reader passes
    allow_pickle=False)."""
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=True, **arrays)  # numpy's default, named so that no array takes its place
    return buf.getvalue()


def npz_arrays(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of .npz bytes (the inverse of npz_bytes); pickles refused."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def atomic_savez(path: Path, *, durable: bool = False, **arrays: np.ndarray) -> Path:
    """np.savez to `path` atomically. Caches default to not durable: a lost one is recomputed."""
    return atomic_write(path, npz_bytes(**arrays), durable=durable)


def mapped_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an uncompressed .npz (what atomic_savez writes), memory-mapped read-only: every
    process that maps the same file shares its pages, instead of holding a private copy. Members that
    are compressed or hold objects are read into memory as np.load would."""
    out: dict[str, np.ndarray] = {}
    handle: _ReadHandle | None = None  # one descriptor for every mapped member, for read_rows
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                with zf.open(info) as member:
                    out[name] = np.lib.format.read_array(member, allow_pickle=False)
                continue
            # The member's data follows its local header: 30 bytes, then its name and extra field.
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject:
                raise ValueError(f"{path}: {name} holds Python objects; refusing to load them")
            if int(np.prod(shape)) == 0:
                out[name] = np.zeros(shape, dtype)
                continue
            order: Literal["F", "C"] = "F" if fortran else "C"
            mapped = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape, order=order)
            out[name] = mapped
            handle = handle or _ReadHandle(path)
            with _HANDLES_LOCK:
                # a fresh np.memmap's base is the mmap.mmap it maps (numpy's stubs say only "an array or None")
                _HANDLES[cast(mmap.mmap, mapped.base)] = handle
    return out


class _ReadHandle:
    """A read-only descriptor of a file mapped by mapped_npz, open as long as an array maps it.

    read_rows reads through it rather than opening the file per call: an open, its advice and its close
    cost more than the 30 rows a query reads. It is opened with the mapping, so a version whose folder is removed
    while a worker still serves it reads on from the file it mapped."""

    __slots__ = ("__weakref__", "fd")

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        if _RANDOM is not None:  # a cold row costs its own pages, not the 128 KB after it too
            os.posix_fadvise(self.fd, 0, 0, _RANDOM)

    def __del__(self) -> None:
        fd = getattr(self, "fd", None)  # None where the open itself failed
        if fd is not None:
            os.close(fd)


# Each mapping of mapped_npz -> the descriptor its rows are read through (gone with the mapping).
_HANDLES: weakref.WeakKeyDictionary[mmap.mmap, _ReadHandle] = weakref.WeakKeyDictionary()
_HANDLES_LOCK = threading.Lock()


def read_rows(a: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Rows [start, end) of `a` for each pair, concatenated. From an array memory-mapped by
    mapped_npz they are read from its file (pread) rather than through the mapping: the pages go to
    the page cache, shared and reclaimable, but not into this process's resident memory, and the
    kernel's read-ahead does not map the neighbouring rows in with them (with random rows of a
    multi-GB file that made one worker hold most of the file).

    Two passes: every range is first read only if the page cache holds it (RWF_NOWAIT, no disk
    wait); the kernel is then asked for all the missing ranges at once (POSIX_FADV_WILLNEED) before
    they are read, so that a query's cold rows wait on the disk together rather than one after
    another. Cold rows are the rule on hosts that reclaim idle page cache (DAMON, for one, pages out
    what went unread for a minute)."""
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    lens = ends - starts
    out = np.empty((int(lens.sum()), *a.shape[1:]), a.dtype)
    if len(out) == 0:
        return out
    if not (isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap) and a.flags.c_contiguous):
        base = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
        return a[base + np.arange(len(out))]
    row = out.itemsize * (out.size // len(out))  # bytes a row
    buf = memoryview(out.reshape(-1).view(np.uint8))  # a memoryview's slices cost less than numpy's
    pos = 0
    missing: list[tuple[memoryview, int]] = []  # (what is still to read, file offset)
    handle = _HANDLES.get(a.base)
    if handle is None:  # mapped elsewhere than by mapped_npz: a descriptor for this call
        handle = _ReadHandle(Path(a.filename))
    fd = handle.fd  # no buffered file object: a query reads ~50 rows of 4 KB
    try:
        for s, n in zip(starts.tolist(), lens.tolist(), strict=True):
            if n <= 0:
                continue
            view, at = buf[pos : pos + n * row], a.offset + s * row
            pos += n * row
            got = _read_cached(fd, view, at)
            if got < len(view):
                missing.append((view[got:], at + got))
        if _WILLNEED is not None:
            for view, at in missing:
                os.posix_fadvise(fd, at, len(view), _WILLNEED)
        for view, at in missing:
            while len(view):
                got = os.preadv(fd, [view], at)
                if got <= 0:
                    raise OSError(f"{a.filename}: short read")
                view, at = view[got:], at + got
    finally:
        del handle  # closes a descriptor made for this call; a mapping's stays open
    return out


# Linux's flag for a read that returns what the page cache holds and never waits on the disk, and
# the advice read_rows gives (posix_fadvise is POSIX, but not on every system Python runs on).
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_ADVISE = hasattr(os, "posix_fadvise")
_RANDOM = getattr(os, "POSIX_FADV_RANDOM", None) if _ADVISE else None
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None) if _ADVISE else None


def _read_cached(fd: int, view: memoryview, at: int) -> int:
    """Bytes of `view` read from the page cache alone (0 where the first page is not cached, or
    where the system offers no such read: then the caller reads it all)."""
    if not _NOWAIT:
        return 0
    try:
        return os.preadv(fd, [view], at, _NOWAIT)
    except OSError:  # EAGAIN (BlockingIOError): not cached; EOPNOTSUPP: not on this file system
        return 0


def backing_files(arrays: Iterable[Any]) -> list[Path]:
    """The files that these arrays are memory-mapped from (mapped_npz), each once; others are skipped."""
    out: dict[Path, None] = {}
    for a in arrays:
        if isinstance(a, np.memmap) and a.filename:
            out[Path(a.filename)] = None
    return list(out)


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None where the system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_ahead(paths: Iterable[Path], budget: int | None = None, chunk: int = 8 << 20) -> int:
    """Read these files once, front to back, through one small buffer, so that the page cache holds
    them before queries read their rows (read_rows): a row from the cache costs microseconds, from
    the disk ~0.1 ms (at a million map images a cold cache tripled the search and verify stages,
    BENCHMARKS.md). Nothing stays in this process; the pages are the kernel's, shared by all workers
    and reclaimable (on hosts that reclaim idle page cache, gone after about a minute unread: then
    read_rows reads a query's cold rows together). (POSIX_FADV_WILLNEED of a whole file read nothing
    on these machines.) Skipped, returning 0, when together they exceed `budget` bytes (default: half
    the memory available now), where they would only push each other out; a file that cannot be read
    is skipped. Returns the bytes read."""
    paths = list(paths)
    sizes = []
    for p in paths:
        try:
            sizes.append(p.stat().st_size)
        except OSError:
            sizes.append(0)
    if budget is None:
        available = available_memory()
        budget = available // 2 if available is not None else 0
    if sum(sizes) > budget:
        return 0
    buf = memoryview(bytearray(chunk))
    done = 0
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            while n := os.readv(fd, [buf]):
                done += n
        except OSError:
            pass
        finally:
            os.close(fd)
    return done


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def json_digest(obj: Any, length: int, *, compact: bool = False, default: Any = None) -> str:
    """The first `length` hex digits of the sha256 of `obj` as sorted-key JSON: a short, stable name
    for settings (artifact names) or a record's checksum. `compact` drops the separators' spaces."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":") if compact else None, default=default)
    return sha256_bytes(text.encode())[:length]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def confined_file(root: Path, rel: str) -> Path | None:
    """The file at `rel` under `root`, or None when it is missing or would lie outside the folder
    (`..`, an absolute path, a symlink leading out): paths read from our own files are still not trusted."""
    base = root.resolve()
    path = (base / rel).resolve()
    return path if path.is_relative_to(base) and path.is_file() else None
