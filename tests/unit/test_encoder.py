"""The numpy export of the encoder computes what the Keras model computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.pipeline import SiameseMlpConf, get_pipeline
from model.encoder import NumpyEncoder
from model.siamese import build_siamese


def test_numpy_encoder_matches_keras(tmp_path: Path) -> None:
    import keras

    conf = get_pipeline("paper").encoder
    assert isinstance(conf, SiameseMlpConf)
    keras.utils.set_random_seed(1)
    model = build_siamese(64, conf)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, (7, 64)).astype(np.float32)
    b = rng.integers(0, 2, (7, 64)).astype(np.float32)
    enc = NumpyEncoder.from_keras(model)
    keras_emb = np.asarray(model.get_layer("encoder")(a, training=False))
    assert np.allclose(enc.embed(a), keras_emb, atol=1e-5)
    # The head: score = sigmoid(w * ||ea - eb|| + b), as the Keras model predicts.
    dist = np.linalg.norm(enc.embed(a) - enc.embed(b), axis=1)
    assert np.allclose(enc.score(dist), model.predict([a, b], verbose=0).ravel(), atol=1e-5)
    # Save/load keeps every weight.
    loaded = NumpyEncoder.load(enc.save(tmp_path / "enc.npz"))
    assert loaded.dim == conf.embed_dim and loaded.input_dim == 64
    assert np.array_equal(loaded.embed(a), enc.embed(a))


def test_numpy_encoder_rejects_wrong_width() -> None:
    enc = NumpyEncoder([np.zeros((4, 2), np.float32)], [np.zeros(2, np.float32)], ["relu"], 1.0, 0.0)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        enc.embed(np.zeros((1, 5), np.float32))
