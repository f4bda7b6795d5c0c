"""Siamese encoder trained on graded relevance with the Generalized Contrastive Loss (GCL):

    L = psi * d^2 / 2 + (1 - psi) * max(tau - d, 0)^2 / 2,   psi = fov of the pair in [0, 1]

The encoder is a linear projection of the aggregate to `embed_dim` values, L2-normalised, started
from the PCA of the map images' vectors (so epoch 0 already ranks about as well as the aggregate),
then trained on pairs of (train query, map image) and, if `map_pairs`, (map image, map image): the
relevance of any two images follows from their locations. Each epoch mines hard negatives (the
nearest map images that are not relevant) with the current encoder. The epoch with the best
validation recall (R@1 + R@10 of the validation queries against all map images) is kept.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from common import plots
from common.retrieval_metrics import recall_at_k
from dataset.layout import Dataset
from dataset.relevance import fov_matrix
from model.encoder import NumpyEncoder
from model.projection import pca_projection

log = logging.getLogger(__name__)


def validation_recall(emb_q: np.ndarray, emb_d: np.ndarray, sim: np.ndarray) -> float:
    """R@1 + R@10 of queries that have a relevant map image."""
    import faiss

    keep = sim.any(axis=1)
    index = faiss.IndexFlatL2(emb_d.shape[1])
    index.add(np.ascontiguousarray(emb_d))
    _, top = index.search(np.ascontiguousarray(emb_q[keep]), 10)
    return float(recall_at_k(top, sim[keep], 1).mean() + recall_at_k(top, sim[keep], 10).mean())


def train_gcl(
    conf: dict[str, Any], dataset: Dataset, xq: np.ndarray, xd: np.ndarray, split: dict[str, np.ndarray], tmp: Path
) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    m = conf["model"]
    keras.utils.set_random_seed(int(m["seed"]))
    rng = np.random.default_rng(int(m["seed"]))
    proj, offset = pca_projection(xd, int(m["embed_dim"]))
    dim = proj.shape[1]
    inp = keras.Input((xd.shape[1],))
    linear = keras.layers.Dense(dim, name="projection")
    encoder = keras.Model(inp, keras.layers.UnitNormalization()(linear(inp)))
    linear.set_weights([proj, offset])
    opt = keras.optimizers.Adam(float(m["lr"]))
    x_all = tf.constant(np.concatenate([xd, xq]))
    ndb, tau = len(xd), float(m["tau"])

    @tf.function
    def step(ia: tf.Tensor, ib: tf.Tensor, psi: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            ea = encoder(tf.gather(x_all, ia), training=True)
            eb = encoder(tf.gather(x_all, ib), training=True)
            d = tf.sqrt(tf.reduce_sum(tf.square(ea - eb), axis=-1) + 1e-12)
            loss = tf.reduce_mean(psi * d**2 / 2 + (1 - psi) * tf.square(tf.maximum(tau - d, 0.0)) / 2)
        grads = tape.gradient(loss, encoder.trainable_variables)
        opt.apply_gradients(zip(grads, encoder.trainable_variables, strict=True))
        return loss

    # Anchors: train queries (rows ndb + q of x_all) with their fov to every map image, and map images.
    anchors = [(ndb + int(q), dataset.fov[q]) for q in split["train"]]
    if m["map_pairs"]:
        fmm = fov_matrix(dataset.database.loc, dataset.database.loc)
        np.fill_diagonal(fmm, 0.0)
        anchors += [(j, fmm[j]) for j in range(ndb)]
    val = split["val"]
    history: dict[str, list[float]] = {"loss": [], "val_recall": []}
    best = (-1.0, encoder.get_weights(), 0)
    for epoch in range(int(m["epochs"]) + 1):
        emb = encoder.predict(np.concatenate([xd, xq]), batch_size=512, verbose=0)
        score = validation_recall(emb[ndb:][val], emb[:ndb], dataset.sim[val])
        history["val_recall"].append(score)
        log.info("GCL epoch %d: validation R@1+R@10 = %.3f", epoch, score)
        if score > best[0]:
            best = (score, encoder.get_weights(), epoch)
        if epoch == int(m["epochs"]):
            break
        ia, ib, psi = _mine_pairs(anchors, emb, ndb, int(m["positives"]), int(m["negatives"]), rng)
        order = rng.permutation(len(ia))
        losses = [
            float(step(ia[order[s : s + 128]], ib[order[s : s + 128]], psi[order[s : s + 128]]))
            for s in range(0, len(order), 128)
        ]
        history["loss"].append(float(np.mean(losses)))
    encoder.set_weights(best[1])
    w, b = linear.get_weights()
    (tmp / "history.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    plot_history(history, tmp / "loss.png", "GCL loss (train)", "epoch (0 = PCA start)")
    NumpyEncoder([w], [b], ["linear_l2"], 0.0, 0.0).save(tmp / "encoder.npz")
    return {"best_epoch": best[2], "val_recall_by_epoch": history["val_recall"], "anchors": len(anchors)}


def _mine_pairs(
    anchors: list[tuple[int, np.ndarray]], emb: np.ndarray, ndb: int, n_pos: int, n_neg: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per anchor: up to n_pos relevant map images (fov > 0), half of n_neg hard negatives (nearest
    non-relevant map images under the current encoder) and the rest random non-relevant ones."""
    import faiss

    index = faiss.IndexFlatL2(emb.shape[1])
    index.add(np.ascontiguousarray(emb[:ndb]))
    rows = np.array([a for a, _ in anchors])
    _, near = index.search(np.ascontiguousarray(emb[rows]), 30)
    ia, ib, psi = [], [], []
    for (a, fov), nn in zip(anchors, near, strict=True):
        pos = np.flatnonzero(fov > 0)
        if len(pos) == 0:
            continue
        p = rng.choice(pos, min(n_pos, len(pos)), replace=False)
        hard = nn[(fov[nn] == 0) & (nn != a)][: n_neg // 2]
        rand = rng.integers(0, ndb, n_neg - len(hard))
        rand = rand[fov[rand] == 0]
        b = np.concatenate([p, hard, rand])
        ia.append(np.full(len(b), a))
        ib.append(b)
        psi.append(fov[b])
    return np.concatenate(ia), np.concatenate(ib), np.concatenate(psi).astype(np.float32)


def plot_history(history: dict[str, list[float]], out: Path, loss_label: str, start_label: str) -> Path:
    """Training loss by epoch and validation recall by epoch (0: before training), side by side."""
    fig, ax = plots.pyplot().subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(range(1, len(history["loss"]) + 1), history["loss"])
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel(loss_label)
    ax[1].plot(range(len(history["val_recall"])), history["val_recall"])
    ax[1].set_xlabel(start_label)
    ax[1].set_ylabel("validation R@1 + R@10")
    return plots.save(fig, out)
