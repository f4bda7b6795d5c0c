"""Index persistence: versioned folders with a manifest and checksums, published by atomic rename.

Layout of one index family (one data folder, one preset), under <artifacts>/<data tag>/:
    index-<preset>/CURRENT            name of the served version (replaced atomically)
    index-<preset>/v<time>/index.faiss
                          /images.json   FAISS id -> map image (path, location): the saved id map
                          /vectorizer.npz the fitted vectorizer (vocabulary, idf) for queries
                          /encoder.npz   the encoder the embeddings came from (queries use the same)
                          /verify.npz    verification keypoints of the map images (presets that verify)
                          /split.json    the model's train/val/test queries (metrics use the test ones)
                          /manifest.json preset, conf, model hash, count, dim, checksums, metrics
    index-<preset>/changes.log, uploads/, changes/   online changes (indexer/changes.py)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from common.clock import version_stamp
from common.files import atomic_write_text, confined_file, fsync_directory, fsync_files, json_digest, sha256_file
from dataset.layout import Location, data_tag
from model.encoder import NumpyEncoder
from model.vectorize import Vectorizer
from model.verify import MapFeatures, Verifier

KEEP_VERSIONS = 2  # the served one and the previous one, for rollback


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


@dataclass(frozen=True)
class ImageRecord:
    id: int
    path: str
    loc: Location
    # Added online (POST /images): path is then relative to the index family folder
    # (uploads/<sha256>.<ext>), not to the data folder.
    uploaded: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "path": self.path, "loc": self.loc.as_list()}
        if self.uploaded:
            out["uploaded"] = True
        return out

    @classmethod
    def from_json(cls, r: dict[str, Any]) -> ImageRecord:
        return cls(int(r["id"]), str(r["path"]), Location.of(r["loc"]), bool(r.get("uploaded", False)))


def image_file(rec: ImageRecord, family: Path, data_root: Path) -> Path | None:
    """The file of a map image, or None if it is missing. Map images resolve under the data folder,
    images added online under the index family (their stored upload); either way the path is
    confined to that folder: paths from an id map are still not trusted."""
    return confined_file(family if rec.uploaded else data_root, rec.path)


@dataclass
class LoadedIndex:
    version: str
    directory: Path
    manifest: dict[str, Any]
    index: faiss.Index
    images: dict[int, ImageRecord]
    vectorizer: Vectorizer
    encoder: NumpyEncoder
    verifier: Verifier | None = None

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


def new_flat_index(dim: int) -> faiss.Index:
    # IndexIDMap2 keeps our ids in the index; the id map file gives each id its image.
    return faiss.IndexIDMap2(faiss.IndexFlatL2(dim))


def publish(
    family: Path,
    index: faiss.Index,
    images: list[ImageRecord],
    files: dict[str, Path],
    manifest: dict[str, Any],
) -> Path:
    """Write a new version into a temporary folder, then rename it in and point CURRENT at it."""
    family.mkdir(parents=True, exist_ok=True)
    # One publisher at a time; a temporary folder nobody holds the lock for was left by a killed indexer.
    with open(family / ".publish.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in family.glob(".v*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        return _publish_locked(family, index, images, files, manifest)


def _publish_locked(
    family: Path, index: faiss.Index, images: list[ImageRecord], files: dict[str, Path], manifest: dict[str, Any]
) -> Path:
    # Names sort by creation time, so pruning and rollback can go by name.
    version = version_stamp()
    while (family / version).exists():
        version += "x"
    tmp = family / f".{version}.tmp"
    tmp.mkdir()
    faiss.write_index(index, str(tmp / "index.faiss"))
    (tmp / "images.json").write_text(json.dumps([r.to_json() for r in images]), encoding="utf-8")
    for name, src in files.items():
        shutil.copyfile(src, tmp / name)
    manifest = dict(manifest, version=version, count=int(index.ntotal), dim=int(index.d))
    manifest["checksums"] = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    fsync_files(tmp)
    final = family / version
    os.replace(tmp, final)
    fsync_directory(family)
    atomic_write_text(family / "CURRENT", version)
    _prune(family, keep=KEEP_VERSIONS)
    return final


def _prune(family: Path, keep: int) -> None:
    for old in versions(family)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def read_pointer(family: Path) -> str | None:
    """The version CURRENT names, or None when there is none yet."""
    try:
        return (family / "CURRENT").read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None


def versions(family: Path) -> list[Path]:
    """Complete versions, oldest first (half-written ones are dot-named temporaries, never listed)."""
    if not family.is_dir():
        return []
    return sorted(p for p in family.iterdir() if p.is_dir() and p.name.startswith("v"))


def rollback(family: Path) -> Path:
    """Point CURRENT at the newest kept version older than the current one, after checking it loads.

    Online changes live in the family's change log, not in a version, so they survive a rollback."""
    current = current_version(family)
    older = [v for v in versions(family) if v.name < current.name]
    if not older:
        raise RollbackError(f"no version older than {current.name} is kept in {family}; nothing to roll back to")
    target = older[-1]
    try:
        load(target)  # refuse to point at a version that would not serve
    except IndexLoadError as e:
        raise RollbackError(f"the previous version {target.name} does not load: {e}") from e
    atomic_write_text(family / "CURRENT", target.name)
    return target


def current_version(family: Path) -> Path:
    pointer = family / "CURRENT"
    if not pointer.is_file():
        raise IndexLoadError(f"no index built yet in {family} (run `imgsearch build`)")
    version = pointer.read_text(encoding="utf-8").strip()
    path = family / version
    if not version.startswith("v") or "/" in version or not path.is_dir():
        raise IndexLoadError(f"{pointer} names {version!r}, which is not an index version here")
    return path


def load(directory: Path) -> LoadedIndex:
    """Load one version, checking checksums, count and dimension against its manifest."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise IndexLoadError(f"{directory}: unreadable manifest ({e})") from e
    checksums = manifest.get("checksums") or {}
    for name in ("index.faiss", "images.json", "vectorizer.npz", "encoder.npz"):
        if name not in checksums:
            raise IndexLoadError(f"{directory}: manifest has no checksum for {name}")
    for name, digest in checksums.items():
        f = directory / name
        if not f.is_file() or sha256_file(f) != digest:
            raise IndexLoadError(f"{f}: missing or checksum mismatch; refusing to serve it")
    index = faiss.read_index(str(directory / "index.faiss"))
    raw = json.loads((directory / "images.json").read_text(encoding="utf-8"))
    images = {int(r["id"]): ImageRecord.from_json(r) for r in raw}
    encoder = NumpyEncoder.load(directory / "encoder.npz")
    try:
        vectorizer = Vectorizer.load(directory / "vectorizer.npz", manifest["conf"]["vector"])
    except (KeyError, ValueError) as e:
        raise IndexLoadError(f"{directory}: vectorizer does not fit the manifest ({e})") from e
    if vectorizer.dim != encoder.input_dim:
        raise IndexLoadError(f"{directory}: vectors of {vectorizer.dim} values, encoder wants {encoder.input_dim}")
    if index.ntotal != manifest.get("count") or len(images) != index.ntotal:
        raise IndexLoadError(
            f"{directory}: index holds {index.ntotal} vectors, id map {len(images)}, manifest {manifest.get('count')}"
        )
    if index.d != manifest.get("dim") or encoder.dim != index.d:
        raise IndexLoadError(f"{directory}: dimension mismatch (index {index.d}, encoder {encoder.dim})")
    ids = faiss.vector_to_array(faiss.downcast_index(index).id_map) if index.ntotal else np.array([])
    if set(int(i) for i in ids) != set(images):
        raise IndexLoadError(f"{directory}: ids in the index and the id map differ")
    verifier = None
    vconf = manifest["conf"].get("verify")
    if vconf is not None:
        if "verify.npz" not in checksums or "verify_head" not in manifest:
            raise IndexLoadError(f"{directory}: the preset verifies, but verify.npz or its head is missing")
        features = MapFeatures.load(directory / "verify.npz")
        if set(int(i) for i in features.ids) != set(images):
            raise IndexLoadError(f"{directory}: verification keypoints cover other images than the index")
        verifier = Verifier(
            vconf, features, vectorizer.n_words, manifest["verify_head"], None, manifest.get("verify_expand_prior", 0.0)
        )
    return LoadedIndex(directory.name, directory, manifest, index, images, vectorizer, encoder, verifier)
