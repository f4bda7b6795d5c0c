"""Training stage: fit the Siamese network on query/map pairs; save model, history and loss curve."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common import plots
from common.clock import utc_timestamp
from common.files import sha256_file
from common.pipeline import IdentityConf, LinearConf, Pipeline, SiameseMlpConf
from dataset.layout import Dataset
from dataset.split import fit_split, save_split, split_queries
from model.encoder import NumpyEncoder
from model.score_head import fit_sigmoid, pair_distances
from model.vectors import load_vectors

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    pass


def sample_pairs(
    queries: np.ndarray, sim: np.ndarray, target: np.ndarray, neg_per_pos: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced pairs for the given query rows: every relevant (sim) map image of a query, and
    neg_per_pos random non-relevant ones for each. Returns (query_rows, map_cols, labels)."""
    qs, ds = [], []
    for q in queries:
        pos = np.flatnonzero(sim[q])
        if len(pos) == 0:
            continue
        neg_pool = np.flatnonzero(~sim[q])
        neg = rng.choice(neg_pool, size=min(len(neg_pool), len(pos) * neg_per_pos), replace=False)
        cols = np.concatenate([pos, neg])
        qs.append(np.full(len(cols), q))
        ds.append(cols)
    if not qs:
        raise TrainingError("no query in this split has a relevant map image: nothing to train on")
    q_rows, d_cols = np.concatenate(qs), np.concatenate(ds)
    perm = rng.permutation(len(q_rows))
    q_rows, d_cols = q_rows[perm], d_cols[perm]
    return q_rows, d_cols, target[q_rows, d_cols].astype(np.float32)


def _plot_history(history: dict[str, list[float]], out: Path) -> Path:
    fig, ax = plots.pyplot().subplots(figsize=(6, 4))
    for key in ("loss", "val_loss"):
        if key in history:
            ax.plot(range(1, len(history[key]) + 1), history[key], label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Siamese training")
    ax.legend()
    return plots.save(fig, out)


def _train_siamese(
    conf: Pipeline, dataset: Dataset, xq: np.ndarray, xd: np.ndarray, split: dict[str, np.ndarray], tmp: Path
) -> dict[str, Any]:
    """The published Siamese network (Keras): balanced pairs, MSE on the target, best epoch kept."""
    import keras

    from model.siamese import build_siamese

    mconf = conf.encoder
    assert isinstance(mconf, SiameseMlpConf)
    assert dataset.sim is not None and dataset.fov is not None  # main() requires ground truth
    keras.utils.set_random_seed(mconf.seed)
    rng = np.random.default_rng(mconf.seed)
    target = dataset.sim.astype(np.float32) if mconf.target == "sim" else dataset.fov
    npp = mconf.negatives_per_positive
    tq, td, ty = sample_pairs(split["train"], dataset.sim, target, npp, rng)
    vq, vd, vy = sample_pairs(split["val"], dataset.sim, target, npp, rng)
    log.info("training on %d pairs, validating on %d", len(ty), len(vy))
    model = build_siamese(xq.shape[1], mconf)
    hist = model.fit(
        [xq[tq], xd[td]],
        ty,
        validation_data=([xq[vq], xd[vd]], vy),
        batch_size=mconf.batch_size,
        epochs=mconf.epochs,
        shuffle=True,
        verbose=2,
        callbacks=[
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=mconf.patience, restore_best_weights=True),
            keras.callbacks.ModelCheckpoint(str(tmp / "siamese.keras"), monitor="val_loss", save_best_only=True),
        ],
    )
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    # The checkpoint holds the best epoch; export exactly those weights for serving.
    best = keras.models.load_model(tmp / "siamese.keras")
    NumpyEncoder.from_keras(best).save(tmp / "encoder.npz")
    (tmp / "history.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    _plot_history(history, tmp / "loss.png")
    return {
        "pairs": {"train": len(ty), "val": len(vy)},
        "epochs_run": len(history["loss"]),
        "best_epoch": int(np.argmin(history["val_loss"])) + 1,
        "best_val_loss": min(history["val_loss"]),
        "keras_version": keras.__version__,
    }


def _with_calibrated_head(
    enc: NumpyEncoder,
    conf: Pipeline,
    dataset: Dataset,
    xq: np.ndarray,
    xd: np.ndarray,
    val: np.ndarray,
    tmp: Path,
) -> dict[str, Any]:
    """Fit the score head of an encoder that has none on validation pairs, so its scores are
    calibrated relevance probabilities; save the encoder."""
    assert dataset.sim is not None  # main() requires ground truth
    rng = np.random.default_rng(conf.encoder.seed)
    dist, label = pair_distances(enc.embed(xq[val]), enc.embed(xd), dataset.sim[val], n_neg=200, rng=rng)
    w, b = fit_sigmoid(dist, label)
    enc.with_head(w, b).save(tmp / "encoder.npz")
    return {"head": {"w": w, "b": b, "pairs": len(dist)}, "embed_dim": enc.dim}


def _identity(
    conf: Pipeline, dataset: Dataset, xq: np.ndarray, xd: np.ndarray, split: dict[str, np.ndarray], tmp: Path
) -> dict[str, Any]:
    """No learned layers: the aggregate itself is the embedding."""
    enc = NumpyEncoder([], [], [], 0.0, 0.0, identity_dim=xd.shape[1])
    return _with_calibrated_head(enc, conf, dataset, xq, xd, split["val"], tmp)


def _linear(
    conf: Pipeline, dataset: Dataset, xq: np.ndarray, xd: np.ndarray, split: dict[str, np.ndarray], tmp: Path
) -> dict[str, Any]:
    """A linear encoder (model/linear.py): [a PCA of each VLAD block,] PCA of the map vectors to
    embed_dim, then either a partial whitening (`pca-whiten`: large shared directions such as sky or
    road texture count less; nothing learned from labels) or the whitening learned in closed form from
    matching pairs (`pair-whiten`), L2."""
    from model.linear import linear_encoder

    assert isinstance(conf.encoder, LinearConf)
    try:
        enc = linear_encoder(conf.encoder, dataset, xq, xd, split, conf.vector.n_blocks, conf.vector.words)
    except ValueError as e:
        raise TrainingError(str(e)) from e
    return _with_calibrated_head(enc, conf, dataset, xq, xd, split["val"], tmp)


Trainer = Callable[[Pipeline, Dataset, np.ndarray, np.ndarray, dict[str, np.ndarray], Path], dict[str, Any]]
TRAINERS: dict[type, Trainer] = {SiameseMlpConf: _train_siamese, IdentityConf: _identity, LinearConf: _linear}


def model_name(conf: Pipeline, served: bool = True) -> str:
    """Named by what made it: the features, vector, encoder and split confs (not the pipeline's name,
    so pipelines that differ only after the encoder share one model); a model that learned from the
    train and val queries only (the test split held out) is named `-heldout`."""
    return f"model-{conf.encoder.kind}-{conf.digest('features', 'vector', 'encoder', 'split')}" + (
        "" if served else "-heldout"
    )


def served_split(dataset: Dataset, conf: Pipeline, served: bool = True) -> dict[str, np.ndarray]:
    """What the model learns from: every labelled query (`served`), or all but the test split's; the
    heads' queries among them as dataset/split.py fit_split deals them; "test" holds what it never saw."""
    loc = dataset.queries.loc
    if served:
        rows, test = np.arange(len(loc)), np.zeros(0, np.int64)
    else:
        outer = split_queries(loc, conf.split)
        rows, test = np.sort(np.concatenate([outer["train"], outer["val"]])), outer["test"]
    relevant = None if dataset.sim is None else np.asarray(dataset.sim.any(axis=1))
    return fit_split(loc, rows, conf.split, relevant) | {"test": test}


def fit(
    conf: Pipeline,
    dataset: Dataset,
    xq: np.ndarray,
    xd: np.ndarray,
    split: dict[str, np.ndarray],
    out: Path,
) -> Path:
    """Train the pipeline's encoder on the split's train queries (val: its calibration, and the
    Siamese network's early stopping) into the model folder `out`, atomically; returns it."""
    if dataset.sim is None or dataset.fov is None:
        raise TrainingError(f"{dataset.root}: training needs ground truth (london_gt.h5)")
    trainer = TRAINERS[type(conf.encoder)]
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    details = trainer(conf, dataset, xq, xd, split, tmp)
    save_split(tmp / "split.json", split, dataset.queries.paths)
    manifest = {
        "name": out.name,
        "preset": conf.name,
        "conf": conf.to_json(),
        "data": str(dataset.root),
        "queries": {s: len(v) for s, v in split.items()},
        **details,
        "train_seconds": round(time.time() - t0, 1),
        "files": {f.name: sha256_file(f) for f in sorted(tmp.iterdir())},
        "created": utc_timestamp(),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(conf: Pipeline, dataset: Dataset, vectors_path: Path, out_root: Path, served: bool = True) -> Path:
    """Train the pipeline's encoder on every labelled query (`served`; else all but the test split's);
    returns the model folder (reused when it already exists)."""
    out = out_root / model_name(conf, served)
    if (out / "manifest.json").exists():
        return out
    if dataset.sim is None or dataset.fov is None:
        raise TrainingError(f"{dataset.root}: training needs ground truth (london_gt.h5)")
    xq, _ = load_vectors(vectors_path, dataset.queries.paths)
    xd, _ = load_vectors(vectors_path, dataset.database.paths)
    return fit(conf, dataset, xq, xd, served_split(dataset, conf, served), out)
