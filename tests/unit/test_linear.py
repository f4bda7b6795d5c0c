"""Matching pairs from locations, the whitening learned from them and the linear encoders
(model/linear.py, model/projection.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from common.pipeline import LinearConf, get_pipeline
from dataset.layout import Dataset, load_dataset
from dataset.relevance import pairwise_distance
from dataset.split import split_queries
from model.linear import anchors_and_positives, base_projection, linear_encoder
from model.projection import balanced_axes, pair_whitening


def test_pair_whitening_shrinks_what_differs_between_matching_views() -> None:
    rng = np.random.default_rng(0)
    # 300 places; two views of each differ along direction 0 (nuisance: light, season) and agree
    # along direction 1 (the place), which has the smaller variance overall.
    place = rng.normal(size=(300, 4)) * np.array([1.0, 3.0, 1.0, 1.0])
    nuisance = np.zeros((2, 300, 4))
    nuisance[:, :, 0] = rng.normal(scale=5.0, size=(2, 300))
    nuisance[:, :, 1:] = rng.normal(scale=0.3, size=(2, 300, 3))
    z = np.concatenate([place + nuisance[0], place + nuisance[1]])
    first, second = np.arange(300), np.arange(300, 600)
    w = pair_whitening(z, first, second, np.ones(300), shrink=0.0)
    d = (z[first] - z[second]) @ w
    # The whitened pair differences have identity covariance (C_S^(-1/2) C_S C_S^(-1/2) = I) ...
    assert np.allclose(d.T @ d / len(d), np.eye(4), atol=1e-6)

    # ... and a matching view is now nearer than any other image far more often than before.
    def nn_accuracy(x: np.ndarray) -> float:
        dist = ((x[first][:, None] - x[second][None]) ** 2).sum(-1)
        return float((dist.argmin(axis=1) == np.arange(300)).mean())

    assert nn_accuracy(z @ w) > nn_accuracy(z) + 0.15


def test_pair_whitening_weights_and_shrinkage() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=(50, 3))
    a, b = np.arange(0, 20), np.arange(20, 40)
    # A weight of 2 counts a pair twice: the same as listing it twice with weight 1.
    w2 = pair_whitening(z, a, b, np.r_[np.full(10, 2.0), np.ones(10)], 0.0)
    dup = pair_whitening(z, np.r_[a, a[:10]], np.r_[b, b[:10]], np.ones(30), 0.0)
    assert np.allclose(w2 @ w2.T, dup @ dup.T, atol=1e-5)  # same metric (the rotation may differ)
    # Full shrinkage towards the identity leaves a multiple of the identity metric.
    near_identity = pair_whitening(z, a, b, np.ones(20), 0.999)
    m = near_identity @ near_identity.T
    assert np.allclose(m / m[0, 0], np.eye(3), atol=0.01)
    with pytest.raises(ValueError, match="shrink"):
        pair_whitening(z, a, b, np.ones(20), 1.0)
    with pytest.raises(ValueError, match="one weight per pair"):
        pair_whitening(z, a, b, np.ones(19), 0.1)


LW = "teblid-rvlad-lw"


def lw(**over: object) -> LinearConf:
    """The pair-whitening encoder conf of the LW preset with some fields changed (validated)."""
    return LinearConf.model_validate(get_pipeline(LW).encoder.model_dump() | over)


def test_map_anchors_keep_away_from_held_out_queries_and_duplicates(tiny_data: Path) -> None:
    ds = load_dataset(tiny_data)
    split = split_queries(ds.queries.loc, get_pipeline(LW).split)
    m = lw(holdout_m=30.0, min_pair_m=3.0)
    rows, pos, fov = anchors_and_positives(ds, split, m)
    ndb = len(ds.database)
    held = ds.queries.loc[np.concatenate([split["val"], split["test"]])]
    loc = ds.database.loc
    queries = [r - ndb for r in rows if r >= ndb]
    assert set(queries) <= set(split["train"].tolist()) and queries
    for r, p, f in zip(rows, pos, fov, strict=True):
        assert len(p) and np.all(f >= 0) and len(f) == len(p)
        if r < ndb:  # a map anchor and its positives are far from every held-out query
            assert pairwise_distance(loc[[r, *p]], held).min() >= 30.0
            assert pairwise_distance(loc[[r]], loc[p]).min() >= 3.0
    without = anchors_and_positives(ds, split, m.model_copy(update={"map_pairs": False}))[0]
    assert all(r >= ndb for r in without)


def lw_inputs(tiny_data: Path, seed: int) -> tuple[Dataset, LinearConf, dict, np.ndarray, np.ndarray]:
    """The tiny data set, a small pair-whitening conf (8 outputs), its split and random vectors of 20."""
    ds = load_dataset(tiny_data)
    conf = lw(embed_dim=8, holdout_m=0.0)
    split = split_queries(ds.queries.loc, get_pipeline(LW).split)
    rng = np.random.default_rng(seed)
    return ds, conf, split, rng.normal(size=(len(ds.database), 20)), rng.normal(size=(len(ds.queries), 20))


def test_base_projection_is_pca_then_the_pairs_whitening(tiny_data: Path) -> None:
    from model.projection import pca_projection

    ds, conf, split, xd, xq = lw_inputs(tiny_data, 0)
    proj, offset = base_projection(conf, ds, xq, xd, split)
    p0, o0 = pca_projection(xd, 8, conf.whiten_power)
    assert proj.shape == (20, 8) and not np.allclose(proj, p0)
    # The learned part is an invertible map of the PCA output: the same subspace, re-weighted.
    w = np.linalg.lstsq(p0, proj, rcond=None)[0]
    assert np.allclose(p0 @ w, proj, atol=1e-4) and np.allclose(o0 @ w, offset, atol=1e-4)
    pca = conf.model_copy(update={"kind": "pca-whiten"})
    assert pca.whiten == "pca" and conf.whiten == "pairs"
    assert np.allclose(base_projection(pca, ds, xq, xd, split)[0], p0)
    # A whitening the encoder does not know is refused when the conf is made.
    with pytest.raises(ValidationError, match="kind"):
        lw(kind="zca")


def test_block_encoder_projects_each_block_then_whitens_jointly(tiny_data: Path, tmp_path: Path) -> None:
    from model.encoder import NumpyEncoder
    from model.projection import pca_projection

    ds = load_dataset(tiny_data)
    conf = lw(embed_dim=6, block_dim=4, holdout_m=0.0)
    split = split_queries(ds.queries.loc, get_pipeline(LW).split)
    rng = np.random.default_rng(0)
    xd, xq = rng.normal(size=(len(ds.database), 30)), rng.normal(size=(len(ds.queries), 30))
    enc = linear_encoder(conf, ds, xq, xd, split, n_blocks=3)
    assert enc.weights[0].shape == (3, 10, 4) and enc.input_dim == 30 and enc.dim == 6
    # Block b of the first layer is the PCA of the map vectors' values 10b..10b+9 alone.
    p1, o1 = pca_projection(xd[:, 10:20], 4)
    h = enc.weights[0]
    assert np.allclose(h[1], p1, atol=1e-4) and np.allclose(enc.biases[0][4:8], o1, atol=1e-4)
    emb = enc.embed(xd)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Saved and loaded, the block layer computes the same.
    loaded = NumpyEncoder.load(enc.save(tmp_path / "enc.npz"))
    assert np.allclose(loaded.embed(xq), enc.embed(xq), atol=1e-6)
    with pytest.raises(ValueError, match="do not split into 4 blocks"):
        linear_encoder(conf, ds, xq, xd, split, n_blocks=4)


def test_word_basis_factors_each_block_through_a_shared_descriptor_subspace(tiny_data: Path, tmp_path: Path) -> None:
    from model.encoder import NumpyEncoder
    from model.linear import word_basis

    ds = load_dataset(tiny_data)
    base = lw(embed_dim=6, block_dim=5, holdout_m=0.0)
    split = split_queries(ds.queries.loc, get_pipeline(LW).split)
    rng = np.random.default_rng(1)
    # 3 blocks of 4 words x 8 descriptor values.
    xd, xq = rng.normal(size=(len(ds.database), 96)), rng.normal(size=(len(ds.queries), 96))
    plain = linear_encoder(base, ds, xq, xd, split, n_blocks=3, n_words=4)
    full = linear_encoder(base.model_copy(update={"word_basis": 8}), ds, xq, xd, split, n_blocks=3, n_words=4)
    low = linear_encoder(base.model_copy(update={"word_basis": 2}), ds, xq, xd, split, n_blocks=3, n_words=4)
    assert [w.shape for w in low.weights[:2]] == [(3, 8, 2), (3, 4 * 2, 5)]
    assert low.input_dim == 96 and low.dim == 6 and low.tiles == 4
    # A basis of full rank changes nothing; a smaller one is the block projection seen through the
    # block's top descriptor directions: basis then reduced projection equals U U^T w.
    assert np.allclose(full.embed(xq), plain.embed(xq), atol=1e-4)
    basis, reduced = word_basis(plain.weights[0], 4, 2)
    h = xq[:3].astype(np.float32)
    for i in range(3):
        w = plain.weights[0][i].reshape(4, 8, 5)
        projected = np.einsum("dr,er,wep->wdp", basis[i], basis[i], w).reshape(32, 5)
        part = h[:, 32 * i : 32 * (i + 1)]
        assert np.allclose(part @ projected, (part.reshape(3, 4, 8) @ basis[i]).reshape(3, 8) @ reduced[i], atol=1e-4)
    assert not np.allclose(low.embed(xq), plain.embed(xq), atol=1e-2)
    loaded = NumpyEncoder.load(low.save(tmp_path / "enc.npz"))
    assert loaded.input_dim == 96 and np.allclose(loaded.embed(xq), low.embed(xq), atol=1e-6)
    with pytest.raises(ValueError, match=r"word_basis 9 must be in 1\.\.8"):
        word_basis(plain.weights[0], 4, 9)
    with pytest.raises(ValueError, match="do not split into 5 visual words"):
        word_basis(plain.weights[0], 5, 2)


def test_balanced_axes_decorrelate_and_share_the_variance_evenly() -> None:
    rng = np.random.default_rng(2)
    # Correlated values with a steep spectrum: raw groups of 4 consecutive values hold very different
    # shares of the variance, and the values within a group are correlated with other groups.
    spectrum = np.geomspace(10.0, 0.01, 16)
    x = (rng.normal(size=(3000, 16)) * np.sqrt(spectrum)) @ np.linalg.qr(rng.normal(size=(16, 16)))[0]
    basis = balanced_axes(x, 4)
    assert basis.shape == (16, 16) and np.allclose(basis.T @ basis, np.eye(16), atol=1e-5)
    y = (x - x.mean(0)) @ basis
    cov = y.T @ y / (len(y) - 1)
    assert np.allclose(cov, np.diag(np.diag(cov)), atol=1e-3 * cov.max())  # uncorrelated
    # The greedy deal: the groups' variances differ by at most the largest axis' variance, where the
    # principal axes in order would put the top 4 (84 % of it) in one group.
    groups = np.diag(cov).reshape(4, 4).sum(axis=1)
    assert groups.max() - groups.min() <= np.diag(cov).max() + 1e-9
    top = np.sort(np.diag(cov))[::-1]
    assert groups.min() > 0.3 * groups.max() and groups.max() < 0.5 * top[:4].sum()

    # Distances are unchanged; the basis does not depend on the solver's signs.
    def d2(v: np.ndarray) -> np.ndarray:
        return ((v[:5, None] - v[None, :5]) ** 2).sum(-1)

    assert np.allclose(d2(x), d2(y), atol=1e-6)
    assert np.all(basis[np.abs(basis).argmax(axis=0), np.arange(16)] > 0)
    assert np.array_equal(balanced_axes(x, 4), basis)
    # Groups as equal as the dimensions allow (4, 3, 3, 3, 3), still one rotation.
    five = balanced_axes(x, 5)
    assert np.allclose(five.T @ five, np.eye(16), atol=1e-5)
    assert np.allclose(balanced_axes(x, 99).T @ balanced_axes(x, 99), np.eye(16), atol=1e-5)  # 16 groups of 1
    with pytest.raises(ValueError, match="at least one group"):
        balanced_axes(x, 0)


def test_code_bins_rotate_the_encoder_output_without_changing_distances(tiny_data: Path) -> None:
    ds, conf, split, xd, xq = lw_inputs(tiny_data, 3)
    plain = linear_encoder(conf, ds, xq, xd, split)
    turned = linear_encoder(conf.model_copy(update={"code_bins": 4}), ds, xq, xd, split)
    a, b = plain.embed(xq), turned.embed(xq)
    assert not np.allclose(a, b, atol=1e-2)
    assert np.allclose(((a[:, None] - a[None]) ** 2).sum(-1), ((b[:, None] - b[None]) ** 2).sum(-1), atol=1e-5)
    # In its output basis the map embeddings are uncorrelated, grouped by balanced_axes.
    zd = turned.embed(xd)
    cov = np.cov(zd.T)
    assert np.allclose(cov, np.diag(np.diag(cov)), atol=1e-5)
    assert np.allclose(turned.embed(xd), plain.embed(xd) @ balanced_axes(plain.embed(xd), 4), atol=1e-5)
    # Groups need not divide the output (a small collection's PCA has fewer dimensions than asked).
    three = linear_encoder(conf.model_copy(update={"code_bins": 3}), ds, xq, xd, split).embed(xq)
    assert np.allclose(((three[:, None] - three[None]) ** 2).sum(-1), ((a[:, None] - a[None]) ** 2).sum(-1), atol=1e-5)
