"""Training stage: fit the Siamese network on query/map pairs; save model, history and loss curve."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from dataset.layout import Dataset
from dataset.split import save_split, split_queries
from features.extract import load_vectors
from indexer.store import sha256_file
from pipeline.encoder import NumpyEncoder
from pipeline.presets import conf_hash

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    pass


def model_name(conf: dict[str, Any]) -> str:
    return f"model-{conf['preset']}-{conf_hash(conf, 'image', 'features', 'vector', 'model', 'split')}"


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "val_loss"):
        if key in history:
            ax.plot(range(1, len(history[key]) + 1), history[key], label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Siamese training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(conf: dict[str, Any], dataset: Dataset, vectors_path: Path, out_root: Path) -> Path:
    """Train the preset's model; returns the model folder (reused when it already exists)."""
    out = out_root / model_name(conf)
    if (out / "manifest.json").exists():
        return out
    if dataset.sim is None or dataset.fov is None:
        raise TrainingError(f"{dataset.root}: training needs ground truth (london_gt.h5)")
    import keras

    from model.siamese import build_siamese

    mconf = conf["model"]
    keras.utils.set_random_seed(int(mconf["seed"]))
    rng = np.random.default_rng(int(mconf["seed"]))
    split = split_queries(dataset.queries.loc, conf["split"])
    xq, _ = load_vectors(vectors_path, dataset.queries.paths)
    xd, _ = load_vectors(vectors_path, dataset.database.paths)
    target = dataset.sim.astype(np.float32) if mconf["target"] == "sim" else dataset.fov
    npp = int(mconf["negatives_per_positive"])
    tq, td, ty = sample_pairs(split["train"], dataset.sim, target, npp, rng)
    vq, vd, vy = sample_pairs(split["val"], dataset.sim, target, npp, rng)
    log.info("training on %d pairs, validating on %d", len(ty), len(vy))

    tmp = out_root / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = build_siamese(xq.shape[1], mconf)
    t0 = time.time()
    hist = model.fit(
        [xq[tq], xd[td]],
        ty,
        validation_data=([xq[vq], xd[vd]], vy),
        batch_size=int(mconf["batch_size"]),
        epochs=int(mconf["epochs"]),
        shuffle=True,
        verbose=2,
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=int(mconf["patience"]), restore_best_weights=True
            ),
            keras.callbacks.ModelCheckpoint(str(tmp / "siamese.keras"), monitor="val_loss", save_best_only=True),
        ],
    )
    train_s = time.time() - t0
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    # The checkpoint holds the best epoch; export exactly those weights for serving.
    best = keras.models.load_model(tmp / "siamese.keras")
    NumpyEncoder.from_keras(best).save(tmp / "encoder.npz")
    (tmp / "history.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    _plot_history(history, tmp / "loss.png")
    save_split(tmp / "split.json", split, dataset.queries.paths)
    best_epoch = int(np.argmin(history["val_loss"])) + 1
    manifest = {
        "name": out.name,
        "preset": conf["preset"],
        "conf": conf,
        "data": str(dataset.root),
        "pairs": {"train": len(ty), "val": len(vy)},
        "queries": {s: len(v) for s, v in split.items()},
        "epochs_run": len(history["loss"]),
        "best_epoch": best_epoch,
        "best_val_loss": min(history["val_loss"]),
        "train_seconds": round(train_s, 1),
        "keras_version": keras.__version__,
        "files": {f: sha256_file(tmp / f) for f in ("siamese.keras", "encoder.npz", "split.json")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
