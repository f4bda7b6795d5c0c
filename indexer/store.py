"""Index persistence: versioned folders with a manifest and checksums, published by atomic rename.

Layout of one index family (one data folder, one preset), under <artifacts>/<data tag>/:
    index-<preset>/CURRENT            name of the served version (replaced atomically)
    index-<preset>/v<seq>-<time>/index.faiss   the vectors (flat-l2) or their codes (pq-fastscan, indexer/kinds.py)
                                /vectors.npz   the float vectors a pq-fastscan index re-ranks with
                                /images.json   FAISS id -> map image (path, location): the saved id map
                                /vectorizer.npz the fitted vectorizer (vocabulary, idf) for queries
                                /encoder.npz   the encoder the embeddings came from (queries use the same)
                                /verify.npz    verification keypoints of the map images (presets that verify)
                                (a version split into N > 1 shards has index.s<i>.faiss and verify.s<i>.npz
                                instead: shard i holds the images whose id % N == i; manifest "shards": N)
                                /split.json    the model's train/val/test queries (metrics use the test ones)
                                /manifest.json preset, conf, model hash, count, dim, index kinds, checksums,
                                               metrics, seq, previous (MANIFEST_KEYS)
                                /.checked.json which files this machine has hashed, by their stat (verify_checksums)
    index-<preset>/changes.log, uploads/, changes/   online changes (indexer/changes.py)

Only what this build writes loads: a version of an earlier layout (another name, a manifest without
the keys it writes, index files of another layout) is refused with IndexLoadError, to be rebuilt.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from common.files import (
    TMP_SUFFIX,
    atomic_write_text,
    confined_file,
    file_mode,
    fsync_directory,
    json_digest,
    make_dirs,
    sha256_file,
    storage_errors,
    sweep_temporaries,
)
from common.pipeline import IndexConf, Pipeline
from dataset.layout import Location, data_tag
from indexer.kinds import (
    EXACT,
    PQ,
    REBUILD,
    VECTORS_FILE,
    AnyIndex,
    PartsIndex,
    PQIndex,
    build_index,
    index_contents,
    index_ids,
    new_flat_index,
)
from model.encoder import NumpyEncoder
from model.vectorize import Vectorizer
from model.verify import MapFeatures, Verifier

log = logging.getLogger(__name__)


class IndexLoadError(RuntimeError):
    """The index on disk is missing, corrupt, or does not match its manifest."""


class RollbackError(IndexLoadError):
    """There is no kept version to roll back to, or it does not load."""


def data_dir(artifacts: Path, data_root: Path) -> Path:
    """Where the artifacts of one data folder live (named by the folder and a hash of its index files)."""
    return artifacts / data_tag(data_root)


def family_dir(data_artifacts: Path, preset: str) -> Path:
    """The index family of a preset in a data folder's artifacts: its versions, CURRENT, change log."""
    return data_artifacts / f"index-{preset}"


def index_family(artifacts: Path, data_root: Path, preset: str) -> Path:
    """The index family served for a data folder and preset (what IMGSEARCH_* settings name)."""
    return family_dir(data_dir(artifacts, data_root), preset)


@dataclass(frozen=True, slots=True)  # slots: a million of them (bench/million.py) cost less memory and lookups
class ImageRecord:
    id: int
    path: str
    loc: Location
    # Added online (POST /images): path is then relative to the index family folder
    # (uploads/<sha256>.<ext>), not to the data folder.
    uploaded: bool = False
    idem: str | None = None  # the Idempotency-Key it was added with, if any

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "path": self.path, "loc": self.loc.as_list()}
        if self.uploaded:
            out["uploaded"] = True
        if self.idem is not None:
            out["idem"] = self.idem
        return out

    @classmethod
    def from_json(cls, r: dict[str, Any]) -> ImageRecord:
        idem = r.get("idem")
        return cls(
            int(r["id"]),
            str(r["path"]),
            Location.of(r["loc"]),
            bool(r.get("uploaded", False)),
            idem if isinstance(idem, str) else None,
        )


def image_file(rec: ImageRecord, family: Path, data_root: Path) -> Path | None:
    """The file of a map image, or None if it is missing. Map images resolve under the data folder,
    images added online under the index family (their stored upload); either way the path is
    confined to that folder: paths from an id map are still not trusted."""
    return confined_file(family if rec.uploaded else data_root, rec.path)


@dataclass(frozen=True)
class Part:
    """The part of a version one process holds: all of it (the embedded service, whatever the version's
    shard count), one shard (the images whose id % shards == shard), or the head (shard None: the id
    map and the models, no vectors and no keypoints: the ingress of a sharded service, which asks the
    shards)."""

    shard: int | None = 0
    shards: int = 1

    @property
    def whole(self) -> bool:
        return self.shards == 1 and self.shard == 0

    @property
    def head(self) -> bool:
        return self.shard is None

    def owns(self, image_id: int) -> bool:
        """Whether this part holds the vector and keypoints of the image (the head holds none)."""
        return self.shard is not None and image_id % self.shards == self.shard


WHOLE = Part()


def shard_of(image_id: int, shards: int) -> int:
    return image_id % shards


def shard_file(name: str, shard: int, shards: int) -> str:
    """index.faiss -> index.s1.faiss (a version of one shard keeps the plain names)."""
    if shards == 1:
        return name
    stem, dot, ext = name.partition(".")
    return f"{stem}.s{shard}{dot}{ext}"


def split_index(index: AnyIndex, shards: int, conf: IndexConf) -> list[AnyIndex]:
    """An index split by owner (id % shards), vectors bit for bit; each shard of the kind its own
    size calls for (indexer/kinds.py)."""
    ids, xb = index_contents(index)
    return [build_index(conf, xb[ids % shards == i], ids[ids % shards == i]) for i in range(shards)]


def merge_indexes(parts: list[AnyIndex], dim: int, conf: IndexConf) -> AnyIndex:
    """One index of the parts' vectors, of the kind their total size calls for."""
    contents = [index_contents(p) for p in parts]
    ids = np.concatenate([np.zeros(0, np.int64)] + [i for i, _ in contents])
    xb = np.concatenate([np.zeros((0, dim), np.float32)] + [x for _, x in contents])
    return build_index(conf, xb, ids)


def write_index(index: AnyIndex, directory: Path, shard: int, shards: int) -> None:
    """index.faiss (the codes, for a pq-fastscan index, with its float vectors in vectors.npz). A
    write FAISS could not make (its RuntimeError "write error in <file>: 65491 != 512000 (No space left
    on device)") is raised as the OSError it was: a full disk, not a bug."""
    if isinstance(index, PartsIndex):
        raise TypeError("the parts of a sharded version are written one shard each (split_index)")
    path = directory / shard_file("index.faiss", shard, shards)
    try:
        if isinstance(index, PQIndex):
            index.save(path, directory / shard_file(VECTORS_FILE, shard, shards))
        else:
            faiss.write_index(index, str(path))
    except RuntimeError as e:
        refused = _faiss_os_error(str(e))
        if refused is None:
            raise
        raise refused from e


def _faiss_os_error(message: str) -> OSError | None:
    """The OSError behind a FAISS write or open failure, from its message; None for anything else."""
    for pattern in (r"write error in .*\(([^()]+)\)\s*$", r"could not open .* for writing: (.+)$"):
        m = re.search(pattern, message)
        if m is not None and m.group(1).strip() in _ERRNO_OF:
            return OSError(_ERRNO_OF[m.group(1).strip()], m.group(1).strip())
    return None


_ERRNO_OF = {os.strerror(n): n for n in errno.errorcode}


def read_index(directory: Path, shard: int, shards: int, kind: str) -> AnyIndex:
    path = directory / shard_file("index.faiss", shard, shards)
    if kind == PQ:
        return PQIndex.load(path, directory / shard_file(VECTORS_FILE, shard, shards))
    # Memory-mapped read-only, shared by the workers like the encoder. FAISS aborts the process on an
    # in-place change of a mapped index: every change works on a copy (kinds.copy_for_change).
    return faiss.read_index(str(path), getattr(faiss, "IO_FLAG_MMAP_IFC", 0))


@dataclass
class LoadedIndex:
    version: str
    directory: Path
    manifest: dict[str, Any]
    index: AnyIndex
    images: dict[int, ImageRecord]
    vectorizer: Vectorizer
    encoder: NumpyEncoder
    verifier: Verifier | None = None
    part: Part = WHOLE
    # The images added online, by stored path and by Idempotency-Key: what makes an add idempotent.
    uploads: dict[str, int] = field(default_factory=dict)
    keys: dict[str, int] = field(default_factory=dict)

    @functools.cached_property
    def pipeline(self) -> Pipeline:
        """The typed pipeline that built this version (load() refuses a manifest without a valid one)."""
        return Pipeline.from_json(self.manifest["conf"])

    @property
    def family(self) -> Path:
        """The index family folder (versions, CURRENT, change log, uploads)."""
        return self.directory.parent

    @property
    def embedding_key(self) -> str:
        """Identifies what turns image bytes into this index's vectors: embeddings stored with an online
        change are reused only by a version with the same key; other versions embed the image again."""
        sums = self.manifest.get("checksums", {})
        parts = [sums.get("encoder.npz"), sums.get("vectorizer.npz"), self.manifest["conf"]]
        return json_digest(parts, 16, default=str)


def publish(
    family: Path,
    index: AnyIndex,
    images: list[ImageRecord],
    files: dict[str, Path],
    manifest: dict[str, Any],
    shards: int = 1,
) -> Path:
    """Write a new version into a temporary folder, then rename it in and point CURRENT at it; with
    `shards` > 1, the vectors and verification keypoints are split into that many shards by id.

    The files are written and fsync'd without the family's lock, so a rollback need not wait for a
    build; the lock is held only to name the version, rename it in, move CURRENT and prune. Raises
    StorageError (StorageFullError) when the disk refuses; nothing is published then."""
    with staging(family) as tmp:
        whole = shards == 1 and not isinstance(index, PartsIndex)
        parts = [index] if whole else split_index(index, shards, Pipeline.from_json(manifest["conf"]).index)
        head = dict(files)
        # One part's keypoints are copied as they are (write_head): a million map images' take gigabytes.
        kp = MapFeatures.load(head.pop("verify.npz")) if "verify.npz" in files and len(parts) > 1 else None
        kinds: list[str] = []
        checksums: dict[str, str] = {}
        for i, part in enumerate(parts):
            own = None if kp is None else kp.subset(kp.ids % shards == i)
            kind, sums = write_shard(tmp, part, own, i, shards)
            kinds.append(kind)
            checksums |= sums
        checksums |= write_head(tmp, images, head)
        manifest = dict(manifest, index_kinds=kinds, dim=int(index.d))
        return publish_staged(family, tmp, images, manifest, shards, checksums)


@contextlib.contextmanager
def staging(family: Path) -> Iterator[Path]:
    """A new version's temporary folder in `family`, for its shards' files (written by this process
    or by others: cluster/indexing.py) until publish_staged renames it in; removed if that does not
    happen. Dot-named, so never listed as a version; the owner's lock tells a live publisher's folder
    from one a killed publisher left (sweep_publishers)."""
    with storage_errors(f"publishing a version of {family}"):
        make_dirs(family)
        tmp = family / f".v-{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}"
        tmp.mkdir()
        owner = open(tmp / OWNER, "w")  # noqa: SIM115 - held until the folder is renamed in or removed
        try:
            fcntl.flock(owner, fcntl.LOCK_EX)
            yield tmp
        finally:
            owner.close()
            shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed in


def seal_files(directory: Path, names: list[str]) -> dict[str, str]:
    """The files' checksums, after giving them the artifacts' mode (FAISS and numpy write with their
    own) and fsyncing them: what a shard's writer returns to the publisher."""
    mode = file_mode()
    checksums = {}
    for name in sorted(names):
        f = directory / name
        f.chmod(mode)
        checksums[name] = sha256_file(f)
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return checksums


def write_shard(
    directory: Path, index: AnyIndex, keypoints: MapFeatures | None, shard: int, shards: int
) -> tuple[str, dict[str, str]]:
    """One shard's files (its index, and its verification keypoints if any) in a staging folder;
    returns the index kind and the files' checksums, for publish_staged."""
    write_index(index, directory, shard, shards)
    names = [shard_file("index.faiss", shard, shards)]
    if isinstance(index, PQIndex):
        names.append(shard_file(VECTORS_FILE, shard, shards))
    if keypoints is not None:
        names.append(keypoints.save(directory / shard_file("verify.npz", shard, shards)).name)
    return (index.kind if isinstance(index, PQIndex) else EXACT), seal_files(directory, names)


def staged_manifest(manifest: dict[str, Any], images: list[ImageRecord], shards: int) -> dict[str, Any]:
    """`manifest` with what every version's holds (MANIFEST_KEYS) but its name, for a staged version;
    `manifest` brings conf, dim, index_kinds and the shard files' checksums."""
    ids = [r.id for r in images]
    return (
        {"version": "staged", "seq": 0, "previous": None}
        | manifest
        | dict(
            count=len(images),
            shards=shards,
            changes_seq=int(manifest.get("changes_seq", 0)),
            # Ids are never given out twice, even after the images holding them were deleted.
            max_id=max([int(manifest.get("max_id", -1)), *ids], default=-1),
        )
    )


def write_head(directory: Path, images: list[ImageRecord], files: dict[str, Path]) -> dict[str, str]:
    """The files every process of a version reads (id map, models) in its staging folder; returns
    their checksums."""
    (directory / "images.json").write_text(json.dumps([r.to_json() for r in images]), encoding="utf-8")
    for name, src in files.items():
        shutil.copyfile(src, directory / name)
    return seal_files(directory, ["images.json", *files])


def publish_staged(
    family: Path,
    tmp: Path,
    images: list[ImageRecord],
    manifest: dict[str, Any],
    shards: int,
    checksums: dict[str, str],
) -> Path:
    """Publish the staging folder `tmp` (staging()) whose files are all written (write_shard for each
    shard, write_head), with their `checksums` and `manifest["index_kinds"]`: with the publish lock
    held, the version is named, its manifest written, the folder renamed in, CURRENT moved and old
    versions pruned."""
    with storage_errors(f"publishing a version of {family}"):
        unlisted = {OWNER, CHECKED, "manifest.json"}
        missing = sorted(f.name for f in tmp.iterdir() if f.name not in checksums and f.name not in unlisted)
        if missing:
            raise ValueError(f"{tmp}: files without a checksum: {missing}")
        fsync_directory(tmp)
        manifest = staged_manifest(dict(manifest, checksums=checksums), images, shards)
        with publish_lock(family):
            return _rename_in(family, tmp, manifest)


OWNER = ".owner"  # in a version's temporary folder: its publisher holds an exclusive flock on it
SEQ_WIDTH = 6
# v000012-20261206-230410: a sequence number of SEQ_WIDTH digits or more, then (for people) when it
# was published. Versions are ordered by the number, never by the clock, which may be stepped back.
_NAME = re.compile(r"v(\d{6,})-\d{8}-\d{6}")


def is_version_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def version_seq(name: str) -> int:
    """The sequence number in a version's name; ValueError for a name that is not a version's."""
    m = _NAME.fullmatch(name)
    if m is None:
        raise ValueError(f"{name!r} is not the name of an index version")
    return int(m.group(1))


@contextlib.contextmanager
def publish_lock(family: Path) -> Iterator[None]:
    """The family's one writer of CURRENT and of its versions at a time (publish, rollback, prune),
    across processes; the kernel releases it if the holder dies."""
    with open(family / ".publish.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _rename_in(family: Path, tmp: Path, manifest: dict[str, Any]) -> Path:
    """With the publish lock held: name the version, write its manifest, rename it in, point CURRENT
    at it, and prune."""
    try:
        sweep_publishers(family)
    except OSError as e:  # leftovers of others: they wait for the next publish
        log.warning("%s: leftovers not swept: %s", family, e)
    seq = 1 + max((version_seq(v.name) for v in versions(family)), default=0)
    version = f"v{seq:0{SEQ_WIDTH}d}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    previous = read_pointer(family)
    manifest = dict(
        manifest,
        version=version,
        seq=seq,
        # The version served before this one: what a rollback returns to and pruning keeps.
        previous=previous if previous is not None and _is_version(family, previous) else None,
    )
    atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1))
    _record_checked(tmp, _hashed(tmp, manifest["checksums"]))
    os.unlink(tmp / OWNER)  # the lock stays on the open file; no sweeper runs while this holds the publish lock
    fsync_directory(tmp)
    final = family / version
    os.replace(tmp, final)
    fsync_directory(family)
    point(family, version, previous)
    try:
        prune(family)
    except OSError as e:  # published all the same; the next publish prunes again
        log.warning("%s: old versions not pruned: %s", family, e)
    return final


def point(family: Path, version: str, previous: str | None) -> None:
    """Point CURRENT at `version` durably. Where that fails after the new pointer became visible (its
    folder's fsync), the previous one is put back before the error is raised: no process then swaps
    to a version whose publish or rollback was reported as failed."""
    try:
        atomic_write_text(family / "CURRENT", version)
    except OSError:
        if read_pointer(family) == version:
            with contextlib.suppress(OSError):
                if previous is None:
                    (family / "CURRENT").unlink()
                else:
                    atomic_write_text(family / "CURRENT", previous)
        raise


def sweep_publishers(family: Path) -> None:
    """Remove the temporary version folders of publishers that died (their owner lock is free) and
    temporary files older than TMP_GRACE_S; call with the publish lock held."""
    for d in family.glob(f".v*{TMP_SUFFIX}"):
        if not d.is_dir():
            continue
        try:
            with open(d / OWNER, "r+") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its publisher is writing it
        except OSError:
            pass  # no owner file: its publisher was killed before it made one
        shutil.rmtree(d, ignore_errors=True)
    older_than = time.time() - TMP_GRACE_S
    for folder in (family, family / "uploads", family / "changes"):
        sweep_temporaries(folder, older_than)


# A temporary file untouched this long was left by a writer that died (an add writes and renames
# its temporaries within a request).
TMP_GRACE_S = 600


def kept(family: Path) -> set[str]:
    """The versions pruning keeps: CURRENT and the version served before it (its manifest's
    `previous`), so a rollback goes to the version that was served, never to one a rollback left."""
    name = read_pointer(family)
    if name is None or not (family / name).is_dir():
        return {v.name for v in versions(family)}  # no valid CURRENT: keep all for a fallback
    keep = {name}
    previous = read_manifest(family / name).get("previous")
    if isinstance(previous, str):
        keep.add(previous)
    return keep


def prune(family: Path) -> None:
    """Remove every version but those `kept` (call with the publish lock held). A worker still
    serving a removed version reads on from the files it holds open and moves to CURRENT."""
    keep = kept(family)
    gone = [v for v in versions(family) if v.name not in keep]
    for v in gone:
        shutil.rmtree(v, ignore_errors=True)
    if gone:
        fsync_directory(family)


def read_manifest(version: Path) -> dict[str, Any]:
    """A version's manifest, {} when it is unreadable (the version then does not load either)."""
    try:
        m = json.loads((version / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def read_pointer(family: Path) -> str | None:
    """The version CURRENT names, or None when there is none yet (or it is unreadable)."""
    try:
        return (family / "CURRENT").read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return ""  # there, but unreadable: names no version


def versions(family: Path) -> list[Path]:
    """Complete versions, oldest first by sequence number (half-written ones are dot-named
    temporaries, never listed)."""
    if not family.is_dir():
        return []
    found = [p for p in family.iterdir() if p.is_dir() and is_version_name(p.name)]
    return sorted(found, key=lambda p: (version_seq(p.name), p.name))


def rollback(family: Path) -> tuple[str | None, Path]:
    """Point CURRENT at the version served before the current one, after checking it loads; returns
    (the version CURRENT named, the one it names now). Where CURRENT names no loadable version, the
    newest version that loads is the target. Holds the publish lock, so a publish cannot prune the
    target meanwhile. Raises RollbackError, StorageError.

    Online changes live in the family's change log, not in a version, so they survive a rollback."""
    with storage_errors(f"rolling back {family}"), publish_lock(family):
        name = read_pointer(family)
        manifest = read_manifest(family / name) if name and _is_version(family, name) else {}
        if "previous" in manifest:
            previous = manifest["previous"]
            if not (isinstance(previous, str) and _is_version(family, previous)):
                why = "is no longer kept" if previous else "does not exist (it was the first)"
                raise RollbackError(f"the version served before {name} {why}; nothing to roll back to")
            targets = [family / previous]
        else:  # CURRENT names no version, or one whose manifest is unreadable or of an earlier layout
            targets = [v for v in reversed(versions(family)) if v.name != name]
        errors = []
        for target in targets:
            try:
                load(target)  # refuse to point at a version that would not serve
            except IndexLoadError as e:
                errors.append(f"{target.name}: {e}")
                continue
            point(family, target.name, name)
            return name, target
    if errors:
        raise RollbackError(f"no version to roll back to loads: {'; '.join(errors)}")
    raise RollbackError(f"no version before {name} is kept in {family}; nothing to roll back to")


def _is_version(family: Path, name: str) -> bool:
    return is_version_name(name) and (family / name).is_dir()


def current_version(family: Path) -> Path:
    pointer = family / "CURRENT"
    if not pointer.is_file():
        raise IndexLoadError(f"no index built yet in {family} (run `imgsearch build`)")
    version = read_pointer(family) or ""
    if not _is_version(family, version):
        if version.startswith("v") and "/" not in version and (family / version).is_dir():
            raise IndexLoadError(f"{pointer} names {version!r}, a version of an earlier build: {REBUILD}")
        raise IndexLoadError(f"{pointer} names {version!r}, which is not an index version here")
    return family / version


def fallbacks(family: Path, failed: str | None) -> list[Path]:
    """Versions to serve when CURRENT's does not load (`failed`: its name), newest first."""
    return [v for v in reversed(versions(family)) if v.name != failed]


def family_floor(family: Path) -> tuple[int, int]:
    """(highest change seq, highest image id) any version of the family records: where numbering
    continues even if the change log was lost."""
    seq, max_id = 0, -1
    for v in versions(family):
        m = read_manifest(v)
        with contextlib.suppress(TypeError, ValueError):
            seq = max(seq, int(m.get("changes_seq", 0)))
            max_id = max(max_id, int(m.get("max_id", -1)))
    return seq, max_id


CHECKED = ".checked.json"  # the files of a version whose checksums were verified, by their stat
# File times tick coarsely (a few ms): a file written again within the tick it was hashed in would
# look unchanged. A hash vouches for a file only if the file was older than this when it was hashed.
RACY_NS = 2_000_000_000


def _stat(f: Path) -> dict[str, int]:
    st = f.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _record_checked(directory: Path, entries: dict[str, dict[str, Any]]) -> None:
    # Best effort: a read-only artifacts folder only means the next process hashes again.
    with contextlib.suppress(OSError):
        atomic_write_text(directory / CHECKED, json.dumps(entries), durable=False)


def _hashed(directory: Path, digests: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Entries of .checked.json for files whose digests were just computed."""
    now = time.time_ns()
    return {n: {"sha256": d, **_stat(directory / n), "checked_ns": now} for n, d in digests.items()}


def verify_checksums(directory: Path, checksums: dict[str, str]) -> None:
    """Every file against its manifest digest; raises IndexLoadError for a missing or altered one.

    A file hashed before on this machine (by the publisher or an earlier load) and not changed since
    (same size, modification time and inode, in the version's .checked.json) is not read again: a
    version of a million map images holds ~8 GB, which every worker would otherwise hash at start.
    A write to a file changes its modification time, so it is hashed again."""
    try:
        checked = json.loads((directory / CHECKED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        checked = {}
    checked = checked if isinstance(checked, dict) else {}
    fresh = {}
    for name, digest in checksums.items():
        f = directory / name
        if not f.is_file():
            raise IndexLoadError(f"{f}: missing; refusing to serve the version")
        known = checked.get(name)
        if (
            isinstance(known, dict)
            and known.get("sha256") == digest
            and {k: known.get(k) for k in ("size", "mtime_ns", "inode")} == _stat(f)
            and known["mtime_ns"] < known.get("checked_ns", 0) - RACY_NS
        ):
            continue
        if sha256_file(f) != digest:
            raise IndexLoadError(f"{f}: checksum mismatch; refusing to serve it")
        fresh[name] = digest
    if fresh:
        _record_checked(directory, checked | _hashed(directory, fresh))


# What `publish` writes into every manifest (besides what the builder gives it); a manifest without
# one of them was written by an earlier layout.
MANIFEST_KEYS = (
    "version",
    "seq",
    "previous",
    "conf",
    "count",
    "dim",
    "shards",
    "index_kinds",
    "checksums",
    "changes_seq",
    "max_id",
)


def load(directory: Path, part: Part = WHOLE) -> LoadedIndex:
    """Load one version (or one part of it, see Part), checking checksums, count and dimension against
    its manifest. Only the files the part reads are read and checked; a version of an earlier layout
    is refused (module docstring)."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise IndexLoadError(f"{directory}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise IndexLoadError(f"{directory}: unreadable manifest (not a JSON object)")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise IndexLoadError(f"{directory}: the manifest has no {', '.join(missing)}: {REBUILD}")
    try:
        pipeline = Pipeline.from_json(manifest["conf"])
    except ValueError as e:
        raise IndexLoadError(f"{directory}: {e}: {REBUILD}") from e
    shards = int(manifest["shards"])
    if not part.whole and part.shards != shards:
        raise IndexLoadError(f"{directory}: the version has {shards} shard(s), this process serves 1 of {part.shards}")
    wanted = [] if part.head else list(range(shards)) if part.whole else [int(part.shard or 0)]
    verifies = pipeline.verify is not None
    kinds = manifest["index_kinds"]
    if not isinstance(kinds, list) or len(kinds) != shards or any(k not in (EXACT, PQ) for k in kinds):
        raise IndexLoadError(f"{directory}: manifest index kinds {kinds} do not fit {shards} shard(s)")
    needed = ["images.json", "vectorizer.npz", "encoder.npz"] + [shard_file("index.faiss", i, shards) for i in wanted]
    needed += [shard_file(VECTORS_FILE, i, shards) for i in wanted if kinds[i] == PQ]
    needed += [shard_file("verify.npz", i, shards) for i in wanted] if verifies else []
    checksums = manifest["checksums"] if isinstance(manifest["checksums"], dict) else {}
    for name in needed:
        if name not in checksums:
            raise IndexLoadError(f"{directory}: manifest has no checksum for {name}")
    sharded = {shard_file(n, i, shards) for n in ("index.faiss", "verify.npz", VECTORS_FILE) for i in range(shards)}
    # Another shard's files are checked by its own process.
    verify_checksums(directory, {n: d for n, d in checksums.items() if n not in sharded or n in needed})
    dim = int(manifest["dim"])
    try:
        parts = [read_index(directory, i, shards, kinds[i]) for i in wanted]
    except (RuntimeError, ValueError, KeyError) as e:  # FAISS raises RuntimeError on a file it cannot read
        raise IndexLoadError(f"{directory}: an index file does not load ({e})") from e
    if any(p.d != dim for p in parts):
        raise IndexLoadError(f"{directory}: an index file's dimension differs from the manifest's {dim}")
    if len(parts) == 1:
        index = parts[0]
    elif any(isinstance(p, PQIndex) for p in parts):
        index = PartsIndex(parts)  # each shard's own codes, as the sharded engines search them
    else:
        index = merge_indexes(parts, max(dim, 1), pipeline.index)  # exact: one index answers alike
    raw = json.loads((directory / "images.json").read_text(encoding="utf-8"))
    images = {int(r["id"]): ImageRecord.from_json(r) for r in raw}
    encoder = NumpyEncoder.load(directory / "encoder.npz")
    try:
        vectorizer = Vectorizer.load(directory / "vectorizer.npz", pipeline.vector)
    except (KeyError, ValueError) as e:
        raise IndexLoadError(f"{directory}: vectorizer does not fit the manifest ({e})") from e
    if vectorizer.dim != encoder.input_dim:
        raise IndexLoadError(f"{directory}: vectors of {vectorizer.dim} values, encoder wants {encoder.input_dim}")
    if len(images) != manifest["count"]:
        raise IndexLoadError(f"{directory}: id map holds {len(images)} images, manifest {manifest['count']}")
    if encoder.dim != dim:
        raise IndexLoadError(f"{directory}: dimension mismatch (manifest {dim}, encoder {encoder.dim})")
    if part.head:
        index = new_flat_index(dim)  # the shards hold the vectors
    else:
        if not part.whole:
            images = {i: r for i, r in images.items() if part.owns(i)}
        ids = index_ids(index)
        if len(ids) != len(images) or set(ids.tolist()) != set(images):
            raise IndexLoadError(f"{directory}: ids in the index ({len(ids)}) and the id map ({len(images)}) differ")
    verifier = None
    if pipeline.verify is not None:
        if "verify_head" not in manifest:
            raise IndexLoadError(f"{directory}: the preset verifies, but the verification head is missing")
        features = MapFeatures.concat(
            [MapFeatures.load(directory / shard_file("verify.npz", i, shards)) for i in wanted]
        )
        if set(int(i) for i in features.ids) != (set() if part.head else set(images)):
            raise IndexLoadError(f"{directory}: verification keypoints cover other images than the index")
        verifier = Verifier(
            pipeline.verify,
            pipeline.expand,
            features,
            vectorizer.n_words,
            manifest["verify_head"],
            None,
            manifest.get("verify_expand_prior", 0.0),
        )
    uploads = {r.path: i for i, r in images.items() if r.uploaded}
    keys = {r.idem: i for i, r in images.items() if r.idem is not None}
    return LoadedIndex(
        directory.name, directory, manifest, index, images, vectorizer, encoder, verifier, part, uploads, keys
    )
