"""Order-free aggregates (bag of words, VLAD) and the calibrated score head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from common.pipeline import VectorConf
from features.orb import OrbFeatures
from model.encoder import NumpyEncoder
from model.score_head import fit_sigmoid
from model.vectorize import Vectorizer, residual_sums, unpack


def random_sets(n_images: int, n_desc: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Each image draws its descriptors around 3 of 24 prototypes: a vocabulary has structure to find
    # and images differ in which words they use.
    protos = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    sets = []
    for _ in range(n_images):
        mine = rng.choice(24, 3, replace=False)
        base = protos[mine[rng.integers(0, 3, n_desc)]]
        flips = rng.random((n_desc, 256)) < 0.05
        sets.append(np.packbits(np.unpackbits(base, axis=1) ^ flips, axis=1))
    return sets


def feats(desc: np.ndarray) -> OrbFeatures:
    return OrbFeatures(xy=np.zeros((len(desc), 2), np.float32), descriptors=desc)


def test_unpack_makes_l2_equal_hamming() -> None:
    a, b = random_sets(1, 2)[0]
    hamming = int(np.unpackbits(a ^ b).sum())
    assert np.sum((unpack(a[None]) - unpack(b[None])) ** 2) == hamming


@pytest.mark.parametrize("name", ["bow", "vlad"])
def test_aggregate_is_order_free_normalised_and_discriminative(name: str) -> None:
    sets = random_sets(30, 200)
    v = Vectorizer(VectorConf(name=name, words=16, power=0.5)).fit(sets, seed=0)
    x = v(feats(sets[0]))
    assert x.shape == (v.dim,) and abs(np.linalg.norm(x) - 1) < 1e-5
    # The published flaw was order dependence: an aggregate must not care about keypoint order.
    shuffled = sets[0][np.random.default_rng(1).permutation(len(sets[0]))]
    assert np.allclose(v(feats(shuffled)), x, atol=1e-6)
    # A noisy copy of an image is closer to it than another image is.
    noisy = np.packbits(np.unpackbits(sets[0], axis=1) ^ (np.random.default_rng(2).random((200, 256)) < 0.02), axis=1)
    assert np.linalg.norm(v(feats(noisy)) - x) < np.linalg.norm(v(feats(sets[1])) - x)


def test_bow_idf_downweights_words_seen_everywhere() -> None:
    sets = random_sets(30, 200)
    v = Vectorizer(VectorConf(name="bow", words=16)).fit(sets, seed=0)
    common = np.bincount(np.concatenate([np.unique(v.words(s)) for s in sets]), minlength=16)
    assert v.idf[np.argmax(common)] <= v.idf[np.argmin(common)]


def test_vectorizer_save_load_roundtrip(tmp_path: Path) -> None:
    sets = random_sets(20, 100)
    conf = VectorConf(name="vlad", words=8, power=0.5)
    v = Vectorizer(conf).fit(sets, seed=0)
    loaded = Vectorizer.load(v.save(tmp_path / "v.npz"), conf)
    assert np.array_equal(loaded(feats(sets[3])), v(feats(sets[3])))
    with pytest.raises(ValueError, match="holds a vlad vectorizer"):
        Vectorizer.load(tmp_path / "v.npz", VectorConf(name="bow", words=8))


def test_unfitted_or_unknown() -> None:
    # An unknown representation is refused when the conf is made, before any Vectorizer.
    with pytest.raises(ValidationError, match="name"):
        VectorConf(name="nope")
    with pytest.raises(RuntimeError, match="not fitted"):
        Vectorizer(VectorConf(name="bow", words=8))(feats(random_sets(1, 10)[0]))


def test_fit_sigmoid_recovers_parameters() -> None:
    rng = np.random.default_rng(0)
    d = rng.uniform(0, 2, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-(-6.0 * d + 3.0)))).astype(float)
    w, b = fit_sigmoid(d, y)
    assert w == pytest.approx(-6.0, rel=0.1) and b == pytest.approx(3.0, rel=0.1)


def test_identity_encoder_passes_vectors_through(tmp_path: Path) -> None:
    enc = NumpyEncoder([], [], [], -4.0, 2.0, identity_dim=5)
    x = np.random.default_rng(0).random((3, 5)).astype(np.float32)
    assert np.array_equal(enc.embed(x), x) and enc.dim == enc.input_dim == 5
    loaded = NumpyEncoder.load(enc.save(tmp_path / "e.npz"))
    assert loaded.dim == 5 and loaded.head_w == -4.0
    assert 0 < loaded.score(np.array([0.5]))[0] < 1


def test_vlad_regions_describe_each_band() -> None:
    sets = random_sets(20, 200)
    conf = VectorConf(name="vlad", words=8, power=0.5, regions=((0.0, 0.5), (0.5, 1.0)))
    v = Vectorizer(conf).fit(sets, seed=0)
    assert v.dim == 3 * 8 * 256 and conf.n_blocks == 3
    top_only = OrbFeatures(np.column_stack([np.zeros(200), np.full(200, 10.0)]).astype(np.float32), sets[0], height=100)
    x = v(top_only).reshape(3, -1)
    # All keypoints lie in the top band: its block equals the whole-image block, the bottom one is empty.
    assert np.allclose(x[0], x[1]) and not x[2].any()
    plain = Vectorizer(VectorConf(name="vlad", words=8, power=0.5), v.centroids)
    assert np.allclose(plain(top_only), x[0] * np.sqrt(2), atol=1e-5)


def test_vlad_columns_describe_the_left_and_right_halves() -> None:
    sets = random_sets(20, 200)
    halves = ((0.0, 0.5), (0.5, 1.0))
    conf = VectorConf(name="vlad", words=8, power=0.5, regions=halves, columns=halves)
    v = Vectorizer(conf).fit(sets, seed=0)
    assert v.n_blocks == 5 and v.dim == 5 * 8 * 256
    # The first 50 keypoints stand at the top left, the others at the bottom right.
    xy = np.where(np.arange(200)[:, None] < 50, [[10.0, 10.0]], [[300.0, 90.0]]).astype(np.float32)
    x = v(OrbFeatures(xy, sets[0], height=100, width=341)).reshape(5, -1)
    left = Vectorizer(VectorConf(name="vlad", words=8, power=0.5), v.centroids)(OrbFeatures(xy[:50], sets[0][:50]))
    # The top band and the left column hold the same keypoints: equal blocks, both the left-only VLAD.
    assert np.allclose(x[1], x[3]) and np.allclose(x[3] / np.linalg.norm(x[3]), left, atol=1e-5)
    assert np.allclose(x[2], x[4]) and not np.allclose(x[3], x[4])
    with pytest.raises(ValueError, match="image width"):
        v(OrbFeatures(xy, sets[0], height=100))


def test_overlapping_blocks_equal_each_block_aggregated_alone() -> None:
    # Blocks summed from shared cells must equal each block's VLAD computed from its own keypoints,
    # for overlapping and empty bands alike.
    sets = random_sets(20, 300)
    rng = np.random.default_rng(3)
    conf = VectorConf(
        name="vlad", words=8, power=0.5, regions=((0.0, 0.3), (0.2, 0.7), (0.9, 1.0)), columns=((0.0, 0.6), (0.4, 1.0))
    )
    v = Vectorizer(conf).fit(sets, seed=0)
    xy = np.column_stack([rng.uniform(0, 341, 300), rng.uniform(0, 85, 300)]).astype(np.float32)
    got = v(OrbFeatures(xy, sets[1], height=100, width=341)).reshape(v.n_blocks, -1)
    plain = Vectorizer(VectorConf(name="vlad", words=8, power=0.5), v.centroids)
    y, x = xy[:, 1] / 100, xy[:, 0] / 341
    masks = [np.ones(300, bool)] + [(y >= a) & (y < b) for a, b in conf.regions]
    masks += [(x >= a) & (x < b) for a, b in conf.columns]
    for block, m in zip(got, masks, strict=True):
        if not m.any():  # the band 0.9-1.0 holds no keypoint (all y < 0.85)
            assert not block.any()
            continue
        alone = plain(OrbFeatures(xy[m], sets[1][m]))
        assert np.allclose(block / np.linalg.norm(block), alone, atol=1e-5)


def direct_residual_sums(desc: np.ndarray, words: np.ndarray, cells: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The definition: the float residual of every descriptor added to its (cell, word) sum."""
    k = len(centroids)
    out = np.zeros((int(cells.max()) + 1, k, 256), np.float64)
    np.add.at(out, (cells, words), unpack(desc).astype(np.float64) - centroids[words])
    return out


@pytest.mark.parametrize("n", [500, 70_000])
def test_residual_sums_equal_the_residuals_summed_one_by_one(n: int) -> None:
    # 70,000 descriptors exceed a 16-bit counter: the sums must switch to wider ones, not wrap.
    rng = np.random.default_rng(n)
    desc = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    big = n - 400  # one (cell, word) group of descriptors with every bit set: 69,600 of them at n 70,000
    desc[:big] = 255
    words, cells = rng.integers(0, 6, n), rng.integers(0, 3, n)
    words[:big], cells[:big] = 2, 1
    words[words == 4] = 5  # a word no descriptor uses: its sums stay zero
    centroids = rng.random((6, 256)).astype(np.float32)
    got = residual_sums(desc, words, cells, centroids)
    assert got.shape == (3, 6, 256)
    assert np.allclose(got, direct_residual_sums(desc, words, cells, centroids), rtol=1e-6, atol=1e-2)
    assert not got[:, 4].any()
    assert residual_sums(desc[:0], words[:0], cells[:0], centroids).shape == (0, 6, 256)


def test_words_are_the_nearest_centroids_in_every_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    sets = random_sets(10, 100)
    v = Vectorizer(VectorConf(name="vlad", words=16)).fit(sets, seed=0)
    desc = np.concatenate(sets[:3])
    d2 = ((unpack(desc).astype(np.float64)[:, None, :] - v.centroids[None].astype(np.float64)) ** 2).sum(-1)
    want = d2.argmin(1)
    monkeypatch.setattr("model.vectorize.WORDS_CHUNK", 7)  # 300 rows in chunks of 7, the last one short
    got = v.words(desc)
    assert got.dtype == np.int64 and got.shape == (300,)
    # Equal up to exact ties of the float distances.
    assert np.allclose(d2[np.arange(300), got], d2[np.arange(300), want])
    assert len(v.words(desc[:0])) == 0
    # k nearest words, nearest first: the first column is the nearest word, the k distances ascend and
    # no word outside them is nearer than the k-th.
    top3 = v.words(desc, 3)
    assert top3.shape == (300, 3) and np.array_equal(top3[:, 0], got)
    d3 = np.take_along_axis(d2, top3, 1)
    assert (np.diff(d3, axis=1) >= -1e-6).all() and (np.sort(d2, 1)[:, 2] >= d3[:, 2] - 1e-6).all()
    assert (top3[:, 0] != top3[:, 1]).all() and (top3[:, 1] != top3[:, 2]).all()
    assert v.words(desc[:0], 3).shape == (0, 3)
    with pytest.raises(ValueError, match=r"k must be in 1\.\.16"):
        v.words(desc, 17)


def test_nearest_words_break_ties_to_the_lower_word() -> None:
    # Word 0 holds the descriptor's bits, words 1 and 3 are one bit away from it (a tie), word 2 two.
    desc = np.zeros((1, 32), np.uint8)
    desc[0, 0] = 0b1000_0000
    bits = unpack(desc)[0]
    one_off, two_off = bits.copy(), bits.copy()
    one_off[1] = 1.0
    two_off[1:3] = 1.0
    other = bits.copy()
    other[5] = 1.0
    v = Vectorizer(VectorConf(name="vlad", words=4), np.stack([bits, one_off, two_off, other]).astype(np.float32))
    assert v.words(desc).tolist() == [0]
    assert v.words(desc, 2).tolist() == [[0, 1]]
    assert v.words(desc, 3).tolist() == [[0, 1, 3]]
    assert v.words(desc, 4).tolist() == [[0, 1, 3, 2]]
    # The same with the tied words swapped in the vocabulary: the lower index still comes first.
    v = Vectorizer(VectorConf(name="vlad", words=4), np.stack([other, two_off, bits, one_off]).astype(np.float32))
    assert v.words(desc, 3).tolist() == [[2, 0, 3]]
