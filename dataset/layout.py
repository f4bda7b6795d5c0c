"""Loader for the course layout: database/database.json, query/query.json, london_gt.h5.

Every check names the file and the problem, so a wrong folder fails with a message, not a traceback.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DatasetError(ValueError):
    """The data folder does not follow the course layout."""


@dataclass(frozen=True)
class Location:
    """Where a camera stood and looked: UTM metres and a compass heading in degrees (0 = north)."""

    easting: float
    northing: float
    heading: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Location:
        """From [easting, northing, heading] (a row of `ImageSet.loc`, a JSON list)."""
        e, n, h = (float(v) for v in values)
        return cls(e, n, h)

    def as_list(self) -> list[float]:
        return [self.easting, self.northing, self.heading]


@dataclass(frozen=True)
class ImageSet:
    """One side of the data set (map images or queries): paths relative to the root, and locations."""

    paths: list[str]
    loc: np.ndarray  # (n, 3) float64: UTM easting, northing, heading in degrees

    def __len__(self) -> int:
        return len(self.paths)

    def location(self, i: int) -> Location:
        return Location.of(self.loc[i])


@dataclass(frozen=True)
class Dataset:
    root: Path
    database: ImageSet
    queries: ImageSet
    sim: np.ndarray | None  # (nq, ndb) bool, or None when the folder has no ground truth
    fov: np.ndarray | None  # (nq, ndb) float32 in [0, 1]

    def image_path(self, rel: str) -> Path:
        return self.root / rel

    @property
    def name(self) -> str:
        return self.root.name


def _load_image_set(root: Path, rel_json: str, check_files: bool) -> ImageSet:
    path = root / rel_json
    if not path.is_file():
        raise DatasetError(f"{path}: missing (expected the course layout, see README)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict) or "im_paths" not in raw or "loc" not in raw:
        raise DatasetError(f"{path}: expected an object with keys 'im_paths' and 'loc'")
    paths, loc = raw["im_paths"], raw["loc"]
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise DatasetError(f"{path}: 'im_paths' must be a list of non-empty strings")
    if not paths:
        raise DatasetError(f"{path}: 'im_paths' is empty")
    if len(set(paths)) != len(paths):
        raise DatasetError(f"{path}: 'im_paths' has duplicate entries")
    try:
        loc_arr = np.asarray(loc, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}: 'loc' must be a list of [easting, northing, heading] numbers") from e
    if loc_arr.shape != (len(paths), 3):
        raise DatasetError(f"{path}: 'loc' has shape {loc_arr.shape}, expected ({len(paths)}, 3) to match 'im_paths'")
    if not np.isfinite(loc_arr).all():
        raise DatasetError(f"{path}: 'loc' holds non-finite numbers")
    for p in paths:
        # Paths come from a file we do not control: none may point outside the data folder (checked on
        # the text, so a data folder may still hold symlinked image folders).
        norm = posixpath.normpath(p)
        if posixpath.isabs(p) or norm == ".." or norm.startswith("../") or "\\" in p:
            raise DatasetError(f"{path}: image path {p!r} leaves the data folder")
        if check_files and not (root / p).is_file():
            raise DatasetError(f"{path}: image {p!r} is listed but missing")
    return ImageSet(paths=list(paths), loc=loc_arr)


def _load_gt(path: Path, nq: int, ndb: int) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(f"{path}: not a readable HDF5 file ({e})") from e
    with f:
        out = []
        for key in ("sim", "fov"):
            if key not in f:
                raise DatasetError(f"{path}: dataset {key!r} missing")
            ds = f[key]
            if ds.shape != (nq, ndb):
                raise DatasetError(
                    f"{path}: {key!r} has shape {ds.shape}, expected ({nq}, {ndb}) = (queries, map images)"
                )
            if not (np.issubdtype(ds.dtype, np.number) or ds.dtype == bool):
                raise DatasetError(f"{path}: {key!r} has dtype {ds.dtype}, expected a numeric type")
            out.append(ds[()])
    sim = out[0].astype(bool)
    fov = out[1].astype(np.float32)
    if not np.isfinite(fov).all() or fov.min() < 0 or fov.max() > 1:
        raise DatasetError(f"{path}: 'fov' must lie in [0, 1]")
    return sim, fov


def load_dataset(root: str | Path, *, check_files: bool = True, require_gt: bool = True) -> Dataset:
    """Read and check a folder in the course layout.

    Raises DatasetError naming the file and the problem when the layout is wrong.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found")
    database = _load_image_set(root, "database/database.json", check_files)
    queries = _load_image_set(root, "query/query.json", check_files)
    gt_path = root / "london_gt.h5"
    sim = fov = None
    if gt_path.exists():
        sim, fov = _load_gt(gt_path, len(queries), len(database))
    elif require_gt:
        raise DatasetError(f"{gt_path}: ground truth missing")
    return Dataset(root=root, database=database, queries=queries, sim=sim, fov=fov)


def data_tag(root: Path) -> str:
    """Name of a data folder plus a hash of its index files: artifacts of other data never mix."""
    h = hashlib.sha256()
    for rel in ("database/database.json", "query/query.json"):
        h.update((root / rel).read_bytes())
    return f"{root.resolve().name}-{h.hexdigest()[:8]}"
