"""The Siamese network in Keras: a shared encoder, the Euclidean distance of the two encodings,
and a Dense(1, sigmoid) head that turns the distance into a relevance in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import layers, ops, regularizers

from common.pipeline import SiameseMlpConf


@keras.saving.register_keras_serializable(package="imgsearch")
class EuclideanDistance(layers.Layer):  # type: ignore[misc]  # keras ships no types: its Layer is Any to mypy
    """||a - b||_2 per row, kept away from 0 so its gradient stays finite."""

    def call(self, inputs: Sequence[Any]) -> Any:
        a, b = inputs
        return ops.sqrt(ops.maximum(ops.sum(ops.square(a - b), axis=-1, keepdims=True), 1e-12))


def build_encoder(input_dim: int, conf: SiameseMlpConf) -> keras.Model:
    """Dense layers of conf.hidden widths with dropout before the embedding layer (as published)."""
    reg = regularizers.L2(conf.l2)
    x_in = keras.Input(shape=(input_dim,), name="vector")
    x = x_in
    for i, width in enumerate(conf.hidden):
        x = layers.Dense(width, activation=conf.activation, kernel_regularizer=reg, name=f"dense_{i}")(x)
    x = layers.Dropout(conf.dropout, name="dropout")(x)
    out = layers.Dense(conf.embed_dim, activation=conf.activation, name="embedding")(x)
    return keras.Model(x_in, out, name="encoder")


def build_siamese(input_dim: int, conf: SiameseMlpConf) -> keras.Model:
    encoder = build_encoder(input_dim, conf)
    a = keras.Input(shape=(input_dim,), name="a")
    b = keras.Input(shape=(input_dim,), name="b")
    dist = EuclideanDistance(name="distance")([encoder(a), encoder(b)])
    score = layers.Dense(1, activation="sigmoid", name="head")(dist)
    model = keras.Model([a, b], score, name="siamese")
    model.compile(optimizer=keras.optimizers.Adam(conf.lr), loss=conf.loss)
    return model
