"""Local ORB features of every image, packed in one file keyed by image path.

Aggregated presets learn a vocabulary from them and the verification stage matches them; the service
extracts the same features from an upload through the same `features.extract` functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.files import atomic_savez, sha256_bytes
from common.parallel import map_files
from common.pipeline import FeaturesConf, features_digest
from dataset.layout import Dataset
from features.decode import ImageDecodeError
from features.extract import image_to_features
from features.orb import NoKeypointsError, OrbFeatures


def _local_of_file(path: str, conf: FeaturesConf) -> OrbFeatures | None:
    try:
        return image_to_features(Path(path).read_bytes(), conf)
    except (ImageDecodeError, NoKeypointsError):
        return None


@dataclass(frozen=True)
class LocalStore:
    """Keypoints and descriptors of many images: image i owns rows offsets[i]:offsets[i+1]."""

    names: list[str]
    offsets: np.ndarray  # (n + 1,) int64
    xy: np.ndarray  # (N, 2) float32
    descriptors: np.ndarray  # (N, 32) uint8
    heights: np.ndarray  # (n,) float32 image heights, for positions relative to the image
    angles: np.ndarray  # (N,) float32 keypoint orientations in degrees, NaN where not known
    widths: np.ndarray  # (n,) float32 image widths

    def row_of(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def get(self, i: int) -> OrbFeatures:
        a, b = self.offsets[i], self.offsets[i + 1]
        return OrbFeatures(
            self.xy[a:b], self.descriptors[a:b], float(self.heights[i]), self.angles[a:b], float(self.widths[i])
        )

    def subset(self, names: list[str]) -> LocalStore:
        row = self.row_of()
        parts = [self.get(row[n]) for n in names]
        counts = np.array([len(p.xy) for p in parts], dtype=np.int64)
        empty_xy, empty_desc = np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
        return LocalStore(
            names=list(names),
            offsets=np.concatenate([[0], np.cumsum(counts)]),
            xy=np.concatenate([p.xy for p in parts] or [empty_xy]),
            descriptors=np.concatenate([p.descriptors for p in parts] or [empty_desc]),
            heights=np.array([p.height for p in parts], np.float32),
            angles=np.concatenate([_angles(p) for p in parts] or [np.zeros(0, np.float32)]),
            widths=np.array([p.width for p in parts], np.float32),
        )

    def save(self, path: Path) -> Path:
        return atomic_savez(
            path,
            names=np.array(self.names),
            offsets=self.offsets,
            xy=self.xy,
            descriptors=self.descriptors,
            heights=self.heights,
            angles=self.angles,
            widths=self.widths,
        )

    @classmethod
    def load(cls, path: Path) -> LocalStore:
        with np.load(path, allow_pickle=False) as z:
            names = [str(n) for n in z["names"]]
            return cls(names, z["offsets"], z["xy"], z["descriptors"], z["heights"], z["angles"], z["widths"])


def _angles(f: OrbFeatures) -> np.ndarray:
    return np.full(len(f.xy), np.nan, np.float32) if f.angles is None else np.asarray(f.angles, np.float32)


def local_name(conf: FeaturesConf, names: list[str] | None = None) -> str:
    which = "" if names is None else "-" + sha256_bytes("\n".join(names).encode())[:8]
    return f"local-{features_digest(conf)}{which}.npz"


def main(
    conf: FeaturesConf, dataset: Dataset, out_dir: Path, jobs: int | None = None, names: list[str] | None = None
) -> Path:
    """ORB keypoints and descriptors of `names` (default: all map and query images) in `jobs`
    processes; returns the file (reused if present)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / local_name(conf, names)
    if out.exists():
        return out
    names = names if names is not None else dataset.database.paths + dataset.queries.paths
    files = [dataset.image_path(n) for n in names]
    xy, desc, angles, counts, heights, widths = [], [], [], [], [], []
    for feats in map_files(_local_of_file, files, conf, jobs, desc="ORB"):
        n = 0 if feats is None else len(feats.xy)
        if feats is not None and n:
            xy.append(feats.xy)
            desc.append(feats.descriptors)
            angles.append(_angles(feats))
        counts.append(n)
        heights.append(0.0 if feats is None else feats.height)
        widths.append(0.0 if feats is None else feats.width)
    store = LocalStore(
        names=names,
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        xy=np.concatenate(xy) if xy else np.zeros((0, 2), np.float32),
        descriptors=np.concatenate(desc) if desc else np.zeros((0, 32), np.uint8),
        heights=np.array(heights, np.float32),
        angles=np.concatenate(angles) if angles else np.zeros(0, np.float32),
        widths=np.array(widths, np.float32),
    )
    return store.save(out)
