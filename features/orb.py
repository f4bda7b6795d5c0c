"""Stage 2: grayscale pixels -> ORB keypoints and binary descriptors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

MIN_CONTRAST_STD = 1.0  # grey levels; a photo has tens, a blank (even JPEG-compressed) image under 1


class NoKeypointsError(ValueError):
    """ORB found no keypoints: a blank or featureless image cannot be searched."""


@dataclass(frozen=True)
class OrbFeatures:
    xy: np.ndarray  # (n, 2) float32 pixel positions, in detection order
    descriptors: np.ndarray  # (n, 32) uint8, 256 bits each
    height: float = 0.0  # of the image the positions refer to (0: unknown)


def dense_keypoints(shape: tuple[int, ...], conf: dict[str, Any]) -> list[cv2.KeyPoint]:
    h, w = shape[:2]
    sf = float(conf["scale_factor"])
    out = []
    for octave in conf["dense_octaves"]:
        scale = sf**octave
        step = float(conf["dense_step"]) * scale
        margin = float(conf["edge_threshold"]) * scale + 1
        for y in np.arange(margin, h - margin, step):
            for x in np.arange(margin, w - margin, step):
                out.append(cv2.KeyPoint(float(x), float(y), float(conf["patch_size"]) * scale, 0, 1.0, int(octave)))
    return out


def extract_orb(gray: np.ndarray, conf: dict[str, Any]) -> OrbFeatures:
    """Detect ORB keypoints and compute descriptors; raises NoKeypointsError when there are none.

    `upsample` > 1 enlarges the image first: the map images are small (341x256) and ORB's 31-pixel
    patches and border margin leave few keypoints at their native size.
    """
    if gray.size == 0 or float(gray.std()) < MIN_CONTRAST_STD:
        # Dense descriptors of a flat image are all zeros and would match anything: refuse it.
        raise NoKeypointsError("no ORB keypoints: the image is a single colour (blank or featureless)")
    scale = float(conf["upsample"])
    # ORB describes nothing within edge_threshold of a border, and its pyramid asserts inside OpenCV
    # on images a few pixels thick (a corrupt header can decode to 1x341): refuse them here.
    min_side = 2 * int(conf["edge_threshold"]) + 1
    if min(gray.shape[:2]) * scale < min_side:
        raise NoKeypointsError(f"no ORB keypoints: the image is too small (under {min_side} pixels on a side)")
    if scale != 1.0:
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    orb = cv2.ORB_create(
        nfeatures=int(conf["nfeatures"]),
        scaleFactor=float(conf["scale_factor"]),
        nlevels=int(conf["nlevels"]),
        edgeThreshold=int(conf["edge_threshold"]),
        patchSize=int(conf["patch_size"]),
        fastThreshold=int(conf["fast_threshold"]),
    )
    if conf.get("detector", "fast") == "dense":
        # Descriptors on a regular grid at a few scales, upright: every image region is described,
        # not only the corners FAST finds, which is what an aggregate over the image needs.
        keypoints, descriptors = orb.compute(gray, dense_keypoints(gray.shape, conf))
    else:
        keypoints, descriptors = orb.detectAndCompute(gray, None)
    if descriptors is None or len(keypoints) == 0:
        raise NoKeypointsError("no ORB keypoints found in the image (blank or featureless?)")
    # Positions in the (decoded, not up-sampled) image's pixels.
    xy = np.array([kp.pt for kp in keypoints], dtype=np.float32).reshape(-1, 2) / scale
    return OrbFeatures(xy=xy, descriptors=descriptors, height=float(gray.shape[0]) / scale)
