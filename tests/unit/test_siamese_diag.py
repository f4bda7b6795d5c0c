"""The default preset's Siamese model (model/siamese_diag.py): its pairs and its exported encoder."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from common.presets import DEFAULT_PRESET, get_conf
from dataset.layout import load_dataset
from dataset.relevance import pairwise_distance
from dataset.split import split_queries


def test_map_anchors_keep_away_from_held_out_queries_and_duplicates(tiny_data: Path) -> None:
    from model.siamese_diag import anchors_and_positives

    ds = load_dataset(tiny_data)
    conf = get_conf(DEFAULT_PRESET)
    split = split_queries(ds.queries.loc, conf["split"])
    m = conf["model"] | {"holdout_m": 30.0, "min_pair_m": 3.0}
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
    without = anchors_and_positives(ds, split, m | {"map_pairs": False})[0]
    assert all(r >= ndb for r in without)


def test_trained_scales_fold_into_the_served_projection(tiny_data: Path, tmp_path: Path) -> None:
    from model.encoder import NumpyEncoder
    from model.projection import pca_projection
    from model.siamese_diag import train_siamese_diag

    ds = load_dataset(tiny_data)
    conf = get_conf(DEFAULT_PRESET)
    conf["model"] |= {"embed_dim": 16, "epochs": 2, "holdout_m": 0.0, "positives": 2, "negatives": 4, "hard_pool": 8}
    split = split_queries(ds.queries.loc, conf["split"])
    rng = np.random.default_rng(0)
    # Vectors that carry the place (location) plus noise: something a metric can learn to weigh.
    signal = lambda loc: np.column_stack([np.cos(loc[:, :2] / 40.0), np.sin(loc[:, 2:] / 60.0)])  # noqa: E731
    xd = np.hstack([signal(ds.database.loc), rng.normal(size=(len(ds.database), 40))]).astype(np.float32)
    xq = np.hstack([signal(ds.queries.loc), rng.normal(size=(len(ds.queries), 40))]).astype(np.float32)
    details = train_siamese_diag(conf, ds, xq, xd, split, tmp_path)
    by_epoch = details["val_recall_by_epoch"]
    assert len(by_epoch) == 3 and details["best_epoch"] == int(np.argmax(by_epoch))
    enc = NumpyEncoder.load(tmp_path / "encoder.npz")
    model = keras.models.load_model(tmp_path / "siamese.keras")
    proj, offset = pca_projection(xd, 16, conf["model"]["whiten_power"])
    white = xd @ proj + offset
    white /= np.linalg.norm(white, axis=1, keepdims=True)
    assert np.allclose(enc.embed(xd), model.predict(white, verbose=0), atol=1e-4)
    assert details["scale_range"][0] > 0 and (tmp_path / "loss.png").is_file()
