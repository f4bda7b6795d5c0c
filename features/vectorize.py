"""Stage 3: ORB descriptors -> one fixed-length vector per image, as the preset says."""

from __future__ import annotations

from typing import Any

import numpy as np

from features.orb import OrbFeatures


def vector_dim(conf: dict[str, Any]) -> int:
    name = conf["name"]
    if name == "concat":
        return int(conf["n_descriptors"]) * 256
    raise ValueError(f"unknown vector representation {name!r}")


def concat_bits(features: OrbFeatures, n_descriptors: int) -> np.ndarray:
    """The published representation: the first n descriptors in detection order, as 0/1 bits.

    Images with fewer keypoints are zero-padded, as a fixed-length input needs.
    """
    bits = np.unpackbits(features.descriptors[:n_descriptors], axis=1).astype(np.float32)
    out = np.zeros((n_descriptors, 256), dtype=np.float32)
    out[: len(bits)] = bits
    return out.reshape(-1)


def vectorize(features: OrbFeatures, conf: dict[str, Any]) -> np.ndarray:
    name = conf["name"]
    if name == "concat":
        return concat_bits(features, int(conf["n_descriptors"]))
    raise ValueError(f"unknown vector representation {name!r}")
