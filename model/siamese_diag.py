"""The default preset's Siamese model: a diagonal metric after PCA-whitening, trained on graded relevance.

Both branches share one encoder: the PCA-whitened aggregate (fitted on the map images, fixed), each
dimension scaled by exp(w), L2-normalised. w has one weight per dimension (1,024) and starts at 0,
so epoch 0 is the untrained pipeline: a model with few parameters, trained on many pairs, cannot
stray far from a good start (a full linear map over-fitted 1,600 queries in every epoch).

Anchors are the train queries and the map images at least `holdout_m` from every validation and test
query (map-map relevance follows from locations, so they add thousands of anchors for free; those
near the held-out areas are left out so the held-out figures stay honest). An anchor's candidates
are `positives` of its relevant map images (sim; map images under `min_pair_m` apart are the same
frame, not a pair) and `negatives` drawn from the `hard_pool` nearest non-relevant map images under
the current encoder. The loss is a softmax over each anchor's candidates (similarity / tau) with the
positives' fov, normalised, as the target: a graded listwise loss. The epoch with the best validation
R@1 + R@10 is kept; the scales fold into the projection, so serving costs nothing extra.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from dataset.layout import Dataset
from dataset.relevance import fov_matrix
from model.encoder import NumpyEncoder
from model.gcl import plot_history, validation_recall
from model.linear import anchors_and_positives, linear_encoder
from model.vectorize import Vectorizer

log = logging.getLogger(__name__)


@keras.saving.register_keras_serializable(package="imgsearch")
class DiagonalScale(keras.layers.Layer):
    """x * exp(w), one weight per dimension, w = 0 at the start (the identity)."""

    def build(self, input_shape: tuple[int, ...]) -> None:
        self.log_scale = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="log_scale")

    def call(self, x):  # type: ignore[override]
        return x * keras.ops.exp(self.log_scale)


def build_encoder(dim: int) -> keras.Model:
    """The shared branch: diagonal scale, then unit length."""
    inp = keras.Input((dim,), name="whitened")
    return keras.Model(inp, keras.layers.UnitNormalization()(DiagonalScale(name="scale")(inp)), name="encoder")


def _candidates(
    emb_a: np.ndarray,
    emb_d: np.ndarray,
    pos: list[np.ndarray],
    fov: list[np.ndarray],
    relevant_to: list[np.ndarray],
    conf: dict[str, Any],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(n_anchor, P + N) map rows and their target distribution (positives' fov, normalised)."""
    import faiss

    n_pos, n_neg, pool = int(conf["positives"]), int(conf["negatives"]), int(conf["hard_pool"])
    index = faiss.IndexFlatIP(emb_d.shape[1])
    index.add(np.ascontiguousarray(emb_d))
    _, near = index.search(np.ascontiguousarray(emb_a), pool + 64)
    cands = np.zeros((len(pos), n_pos + n_neg), np.int64)
    target = np.zeros((len(pos), n_pos + n_neg), np.float32)
    for a in range(len(pos)):
        k = rng.choice(len(pos[a]), n_pos, replace=len(pos[a]) < n_pos)
        hard = near[a][(near[a] >= 0) & ~np.isin(near[a], relevant_to[a])][:pool]  # -1: fewer map images than asked
        if len(hard) < n_neg:  # a tiny map: fill with any non-relevant map image
            others = np.setdiff1d(np.arange(len(emb_d)), relevant_to[a])
            hard = np.concatenate([hard, others])
        cands[a] = np.concatenate([pos[a][k], rng.choice(hard, n_neg, replace=len(hard) < n_neg)])
        t = np.maximum(fov[a][k], 0.05)  # every sim positive counts, the better-overlapping more
        target[a, :n_pos] = t / t.sum()
    return cands, target


def train_siamese_diag(
    conf: dict[str, Any], dataset: Dataset, xq: np.ndarray, xd: np.ndarray, split: dict[str, np.ndarray], tmp: Path
) -> dict[str, Any]:
    m = conf["model"]
    keras.utils.set_random_seed(int(m["seed"]))
    rng = np.random.default_rng(int(m["seed"]))
    base = linear_encoder(m, dataset, xq, xd, split, Vectorizer(conf["vector"]).n_blocks, int(conf["vector"]["words"]))
    # The fixed part of both branches, computed once: whitened, L2-normalised aggregates.
    white = np.concatenate([base.embed(xd), base.embed(xq)])
    ndb, dim = len(xd), white.shape[1]

    encoder = build_encoder(dim)
    scale = encoder.get_layer("scale").log_scale

    rows, pos, fov = anchors_and_positives(dataset, split, m)
    # Everything relevant to an anchor by location (fov > 0), never drawn as a negative.
    loc_all = np.concatenate([dataset.database.loc, dataset.queries.loc])
    rel_any = [np.flatnonzero(row > 0) for row in fov_matrix(loc_all[rows], dataset.database.loc)]
    x_all = tf.constant(white)
    opt = keras.optimizers.Adam(float(m["lr"]))
    tau = float(m["tau"])

    @tf.function
    def step(ia: tf.Tensor, ic: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            ea = encoder(tf.gather(x_all, ia))
            ec = encoder(tf.reshape(tf.gather(x_all, ic), (-1, dim)))
            ec = tf.reshape(ec, (tf.shape(ic)[0], tf.shape(ic)[1], dim))
            logits = tf.einsum("bd,bcd->bc", ea, ec) / tau
            loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(t, logits))
        opt.apply_gradients([(tape.gradient(loss, scale.value), scale.value)])
        return loss

    val = split["val"]
    history: dict[str, list[float]] = {"loss": [], "val_recall": []}
    best = (-1.0, scale.numpy().copy(), 0)
    rows_arr = np.array(rows)
    for epoch in range(int(m["epochs"]) + 1):
        emb = encoder.predict(white, batch_size=1024, verbose=0)
        score = validation_recall(emb[ndb:][val], emb[:ndb], dataset.sim[val])
        history["val_recall"].append(score)
        log.info("Siamese diagonal metric, epoch %d: validation R@1+R@10 = %.3f", epoch, score)
        if score > best[0]:
            best = (score, scale.numpy().copy(), epoch)
        if epoch == int(m["epochs"]):
            break
        cands, target = _candidates(emb[rows_arr], emb[:ndb], pos, fov, rel_any, m, rng)
        order = rng.permutation(len(rows_arr))
        bs = int(m["batch_size"])
        losses = [
            float(step(rows_arr[o], cands[o], target[o])) for o in (order[s : s + bs] for s in range(0, len(order), bs))
        ]
        history["loss"].append(float(np.mean(losses)))
    scale.assign(best[1])
    encoder.save(tmp / "siamese.keras")
    scale_best = np.exp(best[1]).astype(np.float32)
    (tmp / "history.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    plot_history(history, tmp / "loss.png", "listwise fov loss (train)", "epoch (0 = untrained)")
    # Scaling a vector before L2-normalising it scales its whitened coordinates: fold exp(w) into the
    # last layer.
    weights = [*base.weights[:-1], base.weights[-1] * scale_best]
    biases = [*base.biases[:-1], base.biases[-1] * scale_best]
    NumpyEncoder(weights, biases, base.activations, 0.0, 0.0).save(tmp / "encoder.npz")
    return {
        "best_epoch": best[2],
        "val_recall_by_epoch": history["val_recall"],
        "anchors": {"queries": int((rows_arr >= ndb).sum()), "map_images": int((rows_arr < ndb).sum())},
        "scale_range": [float(scale_best.min()), float(scale_best.max())],
        "keras_version": keras.__version__,
    }
