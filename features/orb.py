"""Stage 2: grayscale pixels -> ORB keypoints and binary descriptors.

The keypoints are always ORB's (FAST corners of its pyramid, or a dense grid at ORB's scales); the
256-bit descriptor on them is ORB's own or TEBLID (Suarez et al., 2021: learned by boosting on
patch pairs, shipped with OpenCV contrib), which matches far better across seasons and lighting at
the same size and the same Hamming distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from common.pipeline import FeaturesConf

MIN_CONTRAST_STD = 1.0  # grey levels; a photo has tens, a blank (even JPEG-compressed) image under 1


class NoKeypointsError(ValueError):
    """ORB found no keypoints: a blank or featureless image cannot be searched."""


@dataclass(frozen=True)
class OrbFeatures:
    xy: np.ndarray  # (n, 2) float32 pixel positions, in detection order
    descriptors: np.ndarray  # (n, 32) uint8, 256 bits each
    height: float = 0.0  # of the image the positions refer to (0: unknown)
    # (n,) float32 keypoint orientations in degrees [0, 360) (None: not known). ORB's FAST corners
    # carry their intensity-centroid angle; dense grid points are upright (0).
    angles: np.ndarray | None = None
    width: float = 0.0  # of the image the positions refer to (0: unknown)


def dense_keypoints(shape: tuple[int, ...], conf: FeaturesConf) -> list[cv2.KeyPoint]:
    h, w = shape[:2]
    sf = conf.scale_factor
    out = []
    for octave in conf.dense_octaves:
        scale = sf**octave
        step = float(conf.dense_step) * scale
        margin = float(conf.edge_threshold) * scale + 1
        for y in np.arange(margin, h - margin, step):
            for x in np.arange(margin, w - margin, step):
                out.append(cv2.KeyPoint(float(x), float(y), float(conf.patch_size) * scale, 0, 1.0, int(octave)))
    return out


DESCRIPTORS = ("orb", "teblid")


def _teblid() -> cv2.Feature2D:
    # Scale factor 1.0 is TEBLID's setting for ORB keypoints (their size is ORB's patch size).
    return cv2.xfeatures2d.TEBLID.create(1.0)


def extract_orb(gray: np.ndarray, conf: FeaturesConf) -> OrbFeatures:
    """Detect ORB keypoints and compute descriptors; raises NoKeypointsError when there are none.

    `upsample` > 1 enlarges the image first: the map images are small (341x256) and ORB's 31-pixel
    patches and border margin leave few keypoints at their native size.
    """
    if gray.size == 0 or float(gray.std()) < MIN_CONTRAST_STD:
        # Dense descriptors of a flat image are all zeros and would match anything: refuse it.
        raise NoKeypointsError("no ORB keypoints: the image is a single colour (blank or featureless)")
    scale = conf.upsample
    # ORB describes nothing within edge_threshold of a border, and its pyramid asserts inside OpenCV
    # on images a few pixels thick (a corrupt header can decode to 1x341): refuse them here.
    min_side = 2 * conf.edge_threshold + 1
    if min(gray.shape[:2]) * scale < min_side:
        raise NoKeypointsError(f"no ORB keypoints: the image is too small (under {min_side} pixels on a side)")
    if scale != 1.0:
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    orb = cv2.ORB.create(
        nfeatures=conf.nfeatures,
        scaleFactor=conf.scale_factor,
        nlevels=conf.nlevels,
        edgeThreshold=conf.edge_threshold,
        patchSize=conf.patch_size,
        fastThreshold=conf.fast_threshold,
    )
    dense = conf.detector == "dense"
    # Dense: descriptors on a regular grid at a few scales, upright: every image region is described,
    # not only the corners FAST finds, which is what an aggregate over the image needs.
    keypoints = dense_keypoints(gray.shape, conf) if dense else orb.detect(gray, None)
    describer = orb if conf.descriptor == "orb" else _teblid()
    keypoints, descriptors = describer.compute(gray, keypoints)
    if descriptors is None or len(keypoints) == 0:
        raise NoKeypointsError("no ORB keypoints found in the image (blank or featureless?)")
    # Positions in the (decoded, not up-sampled) image's pixels.
    xy = np.array([kp.pt for kp in keypoints], dtype=np.float32).reshape(-1, 2) / scale
    angles = np.array([kp.angle for kp in keypoints], dtype=np.float32) % 360.0
    h, w = (float(s) / scale for s in gray.shape[:2])
    return OrbFeatures(xy=xy, descriptors=descriptors, height=h, angles=angles, width=w)
