"""Image bytes -> local ORB features: the one way the indexer and the service both take.

`image_to_features` serves the indexer (one feature set per image, in worker processes) and
`query_features` serves a query (its features and, for presets that verify, its verification
keypoints, from one decode).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.clock import StageClock
from common.pipeline import FeaturesConf
from features.decode import decode_image
from features.orb import OrbFeatures, extract_orb


@dataclass(frozen=True)
class QueryFeatures:
    features: OrbFeatures  # what the preset aggregates into the query vector
    verify: OrbFeatures | None = None  # keypoints for geometric verification, when the preset verifies


def image_to_features(data: bytes, conf: FeaturesConf) -> OrbFeatures:
    """Image bytes -> ORB features of `conf`. Raises ImageDecodeError or NoKeypointsError."""
    return extract_orb(decode_image(data, conf.max_side), conf)


def query_features(
    data: bytes, conf: FeaturesConf, verify_conf: FeaturesConf | None = None, clock: StageClock | None = None
) -> QueryFeatures:
    """Both feature sets of one image, decoded once; `clock` gets laps "decode" and "features"."""
    clock = clock or StageClock(None)
    gray = decode_image(data, conf.max_side)
    clock.lap("decode")
    features = extract_orb(gray, conf)
    verify = None if verify_conf is None else extract_orb(gray, verify_conf)
    clock.lap("features")
    return QueryFeatures(features, verify)
