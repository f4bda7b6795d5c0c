"""TEBLID descriptors on ORB keypoints: same keypoints, other (learned) bits, matched the same way."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from common.pipeline import DEFAULT_PRESET, FeaturesConf, get_pipeline
from features.orb import extract_orb
from model.verify import MapFeatures, match_by_word, ransac_inliers
from tests.unit.test_verify import scene


def test_teblid_describes_the_same_dense_grid_with_other_bits() -> None:
    conf = get_pipeline("dense-rvlad-verify").features
    assert conf.descriptor == "orb"
    img = scene(3)
    orb = extract_orb(img, conf)
    teblid = extract_orb(img, conf.model_copy(update={"descriptor": "teblid"}))
    assert teblid.descriptors.dtype == np.uint8 and teblid.descriptors.shape[1] == 32
    # The grid is the keypoints of both; TEBLID keeps every one of them on an image this size.
    assert np.array_equal(orb.xy, teblid.xy)
    differing = np.unpackbits(orb.descriptors ^ teblid.descriptors, axis=1).sum(axis=1)
    assert np.median(differing) > 64  # unrelated bit strings, not ORB's bits again


def test_unknown_descriptor_is_refused() -> None:
    # Refused when the conf is made, so no extraction can meet it.
    with pytest.raises(ValidationError, match="descriptor"):
        FeaturesConf(descriptor="sift")
    with pytest.raises(ValidationError, match="descriptor"):
        FeaturesConf.model_validate(get_pipeline("dense-rvlad-verify").features.model_dump() | {"descriptor": "sift"})


def test_default_preset_verifies_with_teblid_on_fast_corners() -> None:
    conf = get_pipeline(DEFAULT_PRESET).verify_features
    assert conf.descriptor == "teblid" and conf.detector == "fast"
    base = scene(1)
    shifted = np.roll(base, (6, 9), axis=(0, 1))
    feats = [extract_orb(base, conf), extract_orb(scene(2), conf)]
    q = extract_orb(shifted, conf)
    store = MapFeatures.build([10, 20], feats, [np.zeros(len(f.descriptors), np.int64) for f in feats])
    cpos, qi, mi = match_by_word(
        q.descriptors, np.zeros(len(q.descriptors), np.int64), store, np.array([0, 1]), 1, 64, 0.9
    )
    inl = [ransac_inliers(q.xy[qi[cpos == c]], store.xy[mi[cpos == c]], 8.0, 200) for c in (0, 1)]
    assert inl[0] > 30 and inl[0] > 5 * max(inl[1], 1)
