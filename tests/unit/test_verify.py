"""Geometric verification: matching within visual words, RANSAC inliers, the stored keypoints
(tests/service/test_verification.py re-ranks through the API)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from common.pipeline import get_pipeline
from features.orb import OrbFeatures, extract_orb
from model.verify import Evidence, MapFeatures, distinct_inliers, match_by_word, ransac_inliers


def scene(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((256, 341), 120, np.uint8)
    for _ in range(120):
        x, y = int(rng.integers(0, 320)), int(rng.integers(0, 240))
        cv2.rectangle(
            img, (x, y), (x + int(rng.integers(4, 20)), y + int(rng.integers(4, 16))), int(rng.integers(0, 255)), -1
        )
    return img


def test_ransac_counts_inliers_of_a_similarity() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 300, (60, 2)).astype(np.float32)
    a = np.deg2rad(10)
    rot = 1.1 * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], np.float32)
    q = p @ rot.T + np.array([15, -4], np.float32)
    q[40:] = rng.uniform(0, 300, (20, 2))  # a third are wrong matches
    assert 38 <= ransac_inliers(p, q, px=3.0, iters=500) <= 42
    assert ransac_inliers(p[:5], q[:5], px=3.0, iters=500) == 0  # too few matches to say anything


def test_matching_finds_the_same_scene_and_not_another() -> None:
    conf = get_pipeline("vlad-verify").verify_features
    base = scene(1)
    shifted = np.roll(base, (6, 9), axis=(0, 1))  # the same scene, moved
    feats = [extract_orb(base, conf), extract_orb(scene(2), conf)]
    q = extract_orb(shifted, conf)
    # One word for every descriptor: matching compares all of them (the word only narrows the search).
    words = [np.zeros(len(f.descriptors), np.int64) for f in feats]
    store = MapFeatures.build([10, 20], feats, words)
    cpos, qi, mi = match_by_word(
        q.descriptors, np.zeros(len(q.descriptors), np.int64), store, np.array([0, 1]), 1, 64, 0.9
    )
    inl = [ransac_inliers(q.xy[qi[cpos == c]], store.xy[mi[cpos == c]], 8.0, 200) for c in (0, 1)]
    assert inl[0] > 30 and inl[0] > 5 * max(inl[1], 1)


def brute_force_matches(q_desc, q_words, store, rows, max_hamming, ratio):
    """The matching rule, pair by pair: for each map keypoint the nearest query keypoint of its word
    (lowest index on ties), kept by the distance and ratio tests; then each query keypoint's nearest
    map keypoint per candidate (lowest Hamming, then lowest map index)."""
    best: dict[tuple[int, int], tuple[int, int]] = {}
    q_sets = q_words[:, None] if q_words.ndim == 1 else q_words  # each query keypoint's words
    for c, r in enumerate(rows):
        for m in range(store.offsets[r], store.offsets[r + 1]):
            same = [i for i in range(len(q_sets)) if store.words[m] in q_sets[i]]
            if not same:
                continue
            d = [int(np.unpackbits(q_desc[i] ^ store.descriptors[m]).sum()) for i in same]
            j = int(np.argmin(d))
            second = sorted(d)[1] if len(d) > 1 else np.inf
            if d[j] <= max_hamming and d[j] < ratio * second:
                key, val = (c, same[j]), (d[j], m)
                best[key] = min(best.get(key, val), val)
    return sorted((c, q, m) for (c, q), (_, m) in best.items())


def test_matching_equals_the_rule_pair_by_pair() -> None:
    rng = np.random.default_rng(3)
    # Few distinct bits, so that distances tie often: ties must go where the rule says.
    base = rng.integers(0, 256, (6, 32), dtype=np.uint8)

    def noisy(n: int) -> np.ndarray:
        d = base[rng.integers(0, 6, n)].copy()
        d[:, :2] ^= rng.integers(0, 4, (n, 2), dtype=np.uint8)
        return d

    feats = [OrbFeatures(rng.random((n, 2)).astype(np.float32), noisy(n)) for n in (40, 0, 25, 60)]
    store = MapFeatures.build([5, 6, 7, 8], feats, [rng.integers(0, 4, len(f.xy)) for f in feats])
    q_desc, q_words = noisy(30), rng.integers(0, 5, 30)  # word 4 has no map keypoint
    q_words[0] = 3  # and a word with a single query keypoint: no second nearest
    rows = np.array([3, 0, 1, 2])
    for max_hamming, ratio in ((64, 0.9), (6, 1.0), (3, 0.5)):
        got = match_by_word(q_desc, q_words, store, rows, 5, max_hamming, ratio)
        assert sorted(zip(*(a.tolist() for a in got), strict=True)) == brute_force_matches(
            q_desc, q_words, store, rows, max_hamming, ratio
        )
    assert len(match_by_word(q_desc, q_words, store, rows, 5, 64, 0.9)[0]) > 20
    # Two words per query keypoint (distinct, any order): the same rule over every word of a keypoint.
    q_two = np.stack([q_words, (q_words + 1 + rng.integers(0, 4, 30)) % 5], 1)
    for max_hamming, ratio in ((64, 0.9), (6, 1.0)):
        got = match_by_word(q_desc, q_two, store, rows, 5, max_hamming, ratio)
        assert sorted(zip(*(a.tolist() for a in got), strict=True)) == brute_force_matches(
            q_desc, q_two, store, rows, max_hamming, ratio
        )
    # The popcount kernel reads raw rows: descriptors of another width than the store's are refused.
    with pytest.raises(ValueError, match="16 bytes against map descriptors of 32"):
        match_by_word(q_desc[:, :16], q_words, store, rows, 5, 64, 0.9)


def test_several_words_per_query_keypoint_find_what_one_word_misses() -> None:
    rng = np.random.default_rng(5)
    feats = [
        OrbFeatures(rng.random((n, 2)).astype(np.float32), rng.integers(0, 256, (n, 32), np.uint8)) for n in (30, 20)
    ]
    map_words = [rng.integers(0, 4, len(f.xy)) for f in feats]
    store = MapFeatures.build([1, 2], feats, map_words)
    rows = np.array([0, 1])
    # The query holds copies of map keypoints of image 1 (a few bits flipped), each told the word of its
    # copy as second word and a word without that keypoint as first: one word finds none of them.
    src = np.arange(0, 30, 3)
    q_desc = feats[0].descriptors[src].copy()
    q_desc[:, 0] ^= 0b101
    true = map_words[0][src]
    wrong = (true + 1) % 4
    one = match_by_word(q_desc, wrong, store, rows, 4, 64, 0.9)
    assert not any(matched_originals(one, src, map_words[0]))
    two = match_by_word(q_desc, np.stack([wrong, true], 1), store, rows, 4, 64, 0.9)
    found = matched_originals(two, src, map_words[0])
    assert sum(found) >= 8  # each copy finds its original (ratio test permitting), query indices of the (n, k) input
    assert (two[1] < len(q_desc)).all()
    # k = 1 as a column equals the word vector, and two words never match a query keypoint twice per image.
    assert all(
        np.array_equal(a, b)
        for a, b in zip(one, match_by_word(q_desc, wrong[:, None], store, rows, 4, 64, 0.9), strict=True)
    )
    pairs = list(zip(two[0].tolist(), two[1].tolist(), strict=True))
    assert len(pairs) == len(set(pairs))
    # Against the rule pair by pair with every word of a keypoint: the nearest match per image kept.
    both = match_by_word(q_desc, np.stack([true, wrong], 1), store, rows, 4, 64, 0.9)
    assert sorted(zip(*(a.tolist() for a in both), strict=True)) == sorted(zip(*(a.tolist() for a in two), strict=True))


def matched_originals(
    matches: tuple[np.ndarray, np.ndarray, np.ndarray], src: np.ndarray, words: np.ndarray
) -> list[bool]:
    """Which query keypoint i (a copy of keypoint src[i] of the first map image) matched its original;
    the store keeps an image's keypoints sorted by word (stable)."""
    cpos, qi, mi = matches
    stored = np.argsort(np.argsort(words, kind="stable"), kind="stable")  # detection index -> stored row
    return [bool(((cpos == 0) & (qi == i) & (mi == stored[s])).any()) for i, s in enumerate(src.tolist())]


def test_map_features_roundtrip_and_sorted_by_word(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    f = OrbFeatures(rng.random((5, 2)).astype(np.float32), rng.integers(0, 255, (5, 32), dtype=np.uint8))
    store = MapFeatures.build([7], [f], [np.array([3, 1, 2, 1, 0])])
    assert store.words.tolist() == [0, 1, 1, 2, 3]
    loaded = MapFeatures.load(store.save(tmp_path / "v.npz"))
    assert np.array_equal(loaded.descriptors, store.descriptors) and loaded.ids.tolist() == [7]


def test_orientations_are_extracted_stored_and_compared(tmp_path: Path) -> None:
    from model.verify import same_turn

    conf = get_pipeline("vlad-verify").verify_features
    f = extract_orb(scene(1), conf)
    assert f.angles is not None and len(f.angles) == len(f.xy)
    assert np.all((f.angles >= 0) & (f.angles < 360)) and np.unique(f.angles).size > 10  # FAST corners turn
    words = np.arange(len(f.xy)) % 7
    loaded = MapFeatures.load(MapFeatures.build([3], [f], [words]).save(tmp_path / "v.npz"))
    order = np.argsort(words, kind="stable")
    assert np.allclose(loaded.angles.astype(np.float32), f.angles[order], atol=0.3)  # float16 on disk
    # The difference wraps at 360; an orientation that is not known (NaN) never drops a match.
    q = np.array([359.0, 10.0, 100.0, 5.0], np.float32)
    m = np.array([1.0, 45.0, 100.0, np.nan], np.float16)
    assert same_turn(q, m, 30.0).tolist() == [True, False, True, True]
    assert same_turn(None, m, 30.0).all()


@pytest.mark.parametrize("preset", ["default", "default-1k"])
def test_the_orientation_filter_keeps_true_matches_and_drops_chance_ones(preset: str) -> None:
    conf = get_pipeline(preset)
    fconf, vconf = conf.verify_features, conf.verify
    assert vconf is not None and vconf.max_angle_deg is not None
    base = scene(1)
    shifted = np.roll(base, (6, 9), axis=(0, 1))
    from model.verify import Verifier

    feats = [extract_orb(base, fconf), extract_orb(scene(2), fconf)]
    store = MapFeatures.build([10, 20], feats, [np.zeros(len(f.xy), np.int64) for f in feats])
    q = extract_orb(shifted, fconf)
    qw = np.zeros(len(q.xy), np.int64)
    on = Verifier(vconf, None, store, 1, [0.0, 1.0, 0.0]).inliers(q, qw, [10, 20])
    no_angle = vconf.model_copy(update={"max_angle_deg": None})
    off = Verifier(no_angle, None, store, 1, [0.0, 1.0, 0.0]).inliers(q, qw, [10, 20])
    assert on[0] >= 0.9 * off[0] and on[0] > 30  # the same scene keeps (nearly) all its inliers
    assert on[1] <= off[1]  # another scene can only lose chance inliers
    # Turn the query keypoints' orientations by 90 degrees: the true matches are all dropped; what
    # survives is chance (the scene's rectangles have corners alike a quarter turn apart).
    turned = OrbFeatures(q.xy, q.descriptors, q.height, (q.angles + 90.0) % 360.0)
    assert Verifier(vconf, None, store, 1, [0.0, 1.0, 0.0]).inliers(turned, qw, [10])[0] <= 0.02 * on[0]


def test_the_verification_head_never_ranks_nearer_and_better_verified_lower() -> None:
    from retrieval.heads import monotone_head

    rng = np.random.default_rng(0)
    inl = rng.integers(0, 60, 400).astype(float)
    dist = rng.uniform(0.8, 1.4, 400)
    # Labels a logistic regression explains best with a backwards distance weight (farther = relevant).
    y = ((np.log1p(inl) + 3.0 * dist + rng.normal(0, 0.3, 400)) > 6.5).astype(float)
    w = monotone_head(np.column_stack([dist, np.log1p(inl)]), y)
    assert w[0] == 0.0 and w[1] > 0
    # Normal data keeps both features, with the expected signs.
    y2 = ((np.log1p(inl) - 4.0 * dist + rng.normal(0, 0.3, 400)) > -2.0).astype(float)
    w2 = monotone_head(np.column_stack([dist, np.log1p(inl)]), y2)
    assert w2[0] < 0 < w2[1]


def test_the_listwise_head_ranks_what_logistic_regression_gets_wrong() -> None:
    from retrieval.heads import listwise_head, monotone_head

    # Each query's shortlist of 20 holds one relevant candidate: clearly the nearest within its query,
    # no better verified than the rest. Across queries the distances shift (some queries are far from
    # everything), so a candidate-by-candidate regression finds distance a weak sign and leans on the
    # inliers; ranking within each query, distance is what tells.
    rng = np.random.default_rng(1)
    feats, labels = [], []
    for _ in range(80):
        dist = rng.uniform(0.0, 1.5) + rng.uniform(0.9, 1.3, 20)
        inl = rng.integers(0, 20, 20).astype(float)
        y = np.zeros(20)
        j = int(np.argmin(dist))
        dist[j] -= 0.15
        inl[j], y[j] = rng.integers(5, 25), 1.0
        feats.append(np.column_stack([dist, np.log1p(inl)]))
        labels.append(y)

    def first_right(w: list[float]) -> float:
        return float(
            np.mean([y[np.argmax(w[0] * f[:, 0] + w[1] * f[:, 1])] for f, y in zip(feats, labels, strict=True)])
        )

    w = listwise_head(feats, labels)
    assert w[0] <= 0 < w[1]  # nearer and better verified never ranks lower
    assert first_right(w) == 1.0
    assert first_right(monotone_head(np.concatenate(feats), np.concatenate(labels))) < 0.8
    # Calibrated: the relevant candidates score higher on average than the others.
    z = np.concatenate([w[0] * f[:, 0] + w[1] * f[:, 1] + w[2] for f in feats])
    y = np.concatenate(labels)
    assert z[y == 1].mean() > z[y == 0].mean()
    # Shortlists that are all relevant or all not teach no ranking: the logistic head then.
    same = [np.column_stack([np.linspace(1, 2, 5), np.zeros(5)])] * 3
    assert listwise_head(same, [np.ones(5), np.zeros(5), np.zeros(5)]) == monotone_head(
        np.concatenate(same), np.concatenate([np.ones(5), np.zeros(5), np.zeros(5)])
    )


def test_the_evidence_is_the_inliers_verification_counted_and_their_transform() -> None:
    from model.verify import Verifier

    conf = get_pipeline("vlad-verify")
    assert conf.verify is not None
    base = scene(1)
    feats = [extract_orb(base, conf.verify_features), extract_orb(scene(2), conf.verify_features)]
    words = [np.zeros(len(f.descriptors), np.int64) for f in feats]
    verifier = Verifier(conf.verify, None, MapFeatures.build([10, 20], feats, words), 1, [0.0, 1.0, 0.0])
    # The photo: the first scene shifted by (9, 6) pixels.
    q = extract_orb(np.roll(base, (6, 9), axis=(0, 1)), conf.verify_features)
    q_words = np.zeros(len(q.descriptors), np.int64)
    inliers = verifier.inliers(q, q_words, [10, 20, 10])
    ev = verifier.evidence(q, q_words, [10, 20, 10])
    assert [len(e.query_xy) for e in ev] == inliers.tolist() and inliers[0] > 30
    t = ev[0].transform
    assert t is not None and np.allclose(t[:, :2], np.eye(2), atol=0.02)
    assert np.allclose(t[:, 2], [-9, -6], atol=1.0)  # query pixels -> map pixels
    assert np.allclose(np.median(ev[0].query_xy - ev[0].map_xy, axis=0), [9, 6], atol=1.0)
    assert np.array_equal(ev[0].query_xy, ev[2].query_xy)  # the same pair gives the same evidence
    assert ev[0].matched >= inliers[0] and ev[1].matched >= inliers[1]  # RANSAC kept some of what it was given
    assert np.array_equal(q.xy[ev[0].query_index], ev[0].query_xy)  # which query keypoints they are


def _evidence(points: list[tuple[float, float]]) -> Evidence:
    """Inliers at these query positions; the query keypoint at (i, i) has index i."""
    xy = np.array(points, np.float32).reshape(-1, 2)
    return Evidence(xy, xy + 1.0, None, len(xy), xy[:, 0].astype(np.int64))


def test_an_inlier_other_places_explain_too_counts_less() -> None:
    # Images 0 and 1 stand 10 m apart (one place), image 2 100 m away; query keypoint (1, 1) is an
    # inlier of all three.
    found = [_evidence([(1, 1), (2, 2), (3, 3)]), _evidence([(1, 1), (2, 2)]), _evidence([(1, 1), (5, 5)])]
    where = np.array([[0.0, 0.0], [10.0, 0.0], [100.0, 0.0]])
    # Image 0: (1, 1) is held by image 2, far from it: 1/2, the two others 1 each; image 1 likewise;
    # image 2: (1, 1) is held by both others, far from it: 1/3.
    assert distinct_inliers(found, where, 50.0) == pytest.approx([2.5, 1.5, 1 + 1 / 3])
    # Within reach of one another, every inlier counts 1: the plain counts.
    assert distinct_inliers(found, where, 200.0) == pytest.approx([3, 2, 2])
    assert distinct_inliers([_evidence([]), found[0]], where[:2], 5.0) == pytest.approx([0, 3])
    assert len(distinct_inliers([], np.zeros((0, 2)), 50.0)) == 0


def test_an_image_added_with_its_query_words_is_stored_under_its_nearest_word(tmp_path: Path) -> None:
    """An image added online is analysed as a query: its keypoints come with their k nearest words. As
    a map image it is stored under the nearest, and verifies as the same image stored by the index."""
    from model.verify import Verifier, keypoint_arrays, keypoints_of_arrays

    conf = get_pipeline("default")
    assert conf.verify is not None and conf.verify.query_words == 2
    fconf = conf.verify_features
    base, other = extract_orb(scene(1), fconf), extract_orb(scene(2), fconf)
    rng = np.random.default_rng(0)
    nearest = rng.integers(0, 3, len(base.xy))
    two = np.stack([nearest, (nearest + 1) % 3], 1)  # what analysing it as a query gives
    q = extract_orb(np.roll(scene(1), (6, 9), axis=(0, 1)), fconf)
    q_words = np.stack([np.zeros(len(q.xy), np.int64), np.ones(len(q.xy), np.int64)], 1)
    stored = MapFeatures.build([10], [base], [nearest])
    as_stored = Verifier(conf.verify, None, stored, 3, [0.0, 1.0, 0.0]).inliers(q, q_words, [10])
    # Added online (the change's arrays written and read back), beside an unrelated stored image.
    arrays = keypoint_arrays(base, two)
    assert arrays["words"].shape == (len(base.xy),)
    added = Verifier(conf.verify, None, MapFeatures.build([20], [other], [np.zeros(len(other.xy), np.int64)]), 3,
                     [0.0, 1.0, 0.0], extra={10: keypoints_of_arrays(arrays), 11: (base, two)})  # fmt: skip
    assert added.inliers(q, q_words, [10, 11]).tolist() == [as_stored[0]] * 2 and as_stored[0] > 30
    assert np.array_equal(added.features([11]).words, stored.words)
