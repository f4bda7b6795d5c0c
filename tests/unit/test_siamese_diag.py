"""The Siamese diagonal metric (model/siamese_diag.py): its exported encoder equals the Keras model."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from common.presets import get_conf
from dataset.layout import load_dataset
from dataset.split import split_queries


def test_trained_scales_fold_into_the_served_projection(tiny_data: Path, tmp_path: Path) -> None:
    from model.encoder import NumpyEncoder
    from model.projection import pca_projection
    from model.siamese_diag import train_siamese_diag

    ds = load_dataset(tiny_data)
    conf = get_conf("orb-dense-teblid-rvlad-siamese-verify-expand")
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
