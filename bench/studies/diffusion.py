#!/usr/bin/env python3
"""Study: does diffusion over the map's own k-NN graph raise the first stage's recall?

    python bench/studies/diffusion.py --data ../shared/datasets/london --artifacts ARTIFACTS

Every query outside the test split is embedded out of fold, as `imgsearch evaluate` does (each
fold's encoder trained without it), with the map embedded by the same encoder. The first stage ranks
the map by L2 distance. Diffusion (Iscen et al., CVPR 2017) ranks it instead by f = (I - a W)^-1 y:
W is the map's mutual k-NN graph, its affinities exp(-d^2 / s)^gamma (s: the median squared distance
to the k-th neighbour) symmetrically normalised; y seeds the query's nearest map images with the
same affinity. The map is small enough here for (I - a W)^-1 to be inverted once per fold. A blend
mixes the diffused score with the first stage's affinity (each scaled to a maximum of 1), over the
whole map or re-ranking only the first-stage top 200 (the expansion pool).

Figures: first-stage R@1 / R@10 / R@50 over the queries with a relevant map image (a photo the
pipeline refuses is a miss), and the paired difference to the first stage with a 95% interval from
a bootstrap over the cross-validation's cells. The embeddings are cached in
<artifacts>/<data>/diffusion-study-<cv name>.npz.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from common.pipeline import Pipeline, get_pipeline
from common.retrieval_metrics import cluster_bootstrap
from dataset.layout import Dataset, load_dataset
from evaluation.cv import cv_name, fold_splits
from indexer import store
from model import train, vectors
from model.encoder import NumpyEncoder

KS = (1, 10, 50)


class Variant(NamedTuple):
    k: int  # neighbours per map image in the graph
    seeds: int  # the query's nearest map images that seed the diffusion
    alpha: float
    gamma: float = 3.0
    blend: float = 0.0  # weight of the first stage's affinity
    pool: int | None = None  # re-rank only the first-stage top `pool` (None: the whole map)

    @property
    def name(self) -> str:
        where = "whole map" if self.pool is None else f"top {self.pool}"
        return f"k {self.k}, {self.seeds} seeds, a {self.alpha:g}, blend {self.blend:g}, {where}"


VARIANTS = [
    Variant(30, 10, 0.99),
    Variant(30, 10, 0.8),
    Variant(30, 3, 0.9, blend=0.8, pool=200),
    Variant(30, 10, 0.99, blend=0.9, pool=200),
    Variant(50, 10, 0.99, blend=0.95),
]


def collect(preset: str, ds: Dataset, out_root: Path) -> dict[str, np.ndarray]:
    """Per fold f: the map (d{f}) and the held-out queries (q{f}) embedded by the encoder trained
    without the fold; with the folds, cells and which images have features."""
    conf = get_pipeline(preset)
    path = out_root / f"diffusion-study-{cv_name(conf).removeprefix('cv-')}.npz"
    if path.exists():
        with np.load(path) as z:
            return dict(z)
    vectors_path = vectors.main(conf, ds, out_root, None)
    xq, q_ok = vectors.load_vectors(vectors_path, ds.queries.paths)
    xd, ok = vectors.load_vectors(vectors_path, ds.database.paths)
    out = embed_folds(conf, ds, xq, xd, out_root) | {"ok": ok, "q_ok": q_ok}
    tmp_path = path.with_suffix(".tmp.npz")
    np.savez(tmp_path, **out)
    tmp_path.replace(path)
    return out


def embed_folds(conf: Pipeline, ds: Dataset, xq: np.ndarray, xd: np.ndarray, out_root: Path) -> dict[str, np.ndarray]:
    """The cross-validation's query rows (pool), folds and cells, and per fold f the map (d{f}) and
    the held-out queries (q{f}) embedded by the encoder trained without the fold, from the query and
    map vectors xq and xd."""
    assert ds.sim is not None
    pool, fold, cell, splits = fold_splits(ds.queries.loc, conf.split, np.asarray(ds.sim.any(axis=1)))
    out = {"pool": pool, "fold": fold, "cell": cell}
    with tempfile.TemporaryDirectory(prefix=".first-stage-", dir=out_root) as tmp:
        for f, split in enumerate(splits):
            model_dir = train.fit(conf, ds, xq, xd, split, Path(tmp) / f"fold-{f}")
            encoder = NumpyEncoder.load(model_dir / "encoder.npz")
            out[f"d{f}"], out[f"q{f}"] = encoder.embed(xd), encoder.embed(xq[pool[fold == f]])
            print(f"fold {f + 1}/{len(splits)} embedded", file=sys.stderr)
    return out


def squared_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0)


def diffuse(dq: np.ndarray, dm: np.ndarray, v: Variant) -> np.ndarray:
    """(nq, n) ranking of the map by the variant, from query-map and map-map squared distances
    (inf for map images without features)."""
    n = len(dm)
    nearest = np.argsort(dm, axis=1)[:, : v.k]
    scale = np.median(np.take_along_axis(dm, nearest[:, -1:], 1)[np.isfinite(dm).any(1)])
    rows = np.arange(n)[:, None]
    a = np.zeros((n, n))
    a[rows, nearest] = np.exp(-dm[rows, nearest] / scale) ** v.gamma
    a = np.minimum(a, a.T)  # mutual neighbours only
    deg = np.sqrt(a.sum(1) + 1e-12)
    inv = np.linalg.inv(np.eye(n) - v.alpha * a / deg[:, None] / deg[None, :])
    first = np.exp(-dq / scale)
    seeds = np.argsort(dq, axis=1)[:, : v.seeds]
    qrows = np.arange(len(dq))[:, None]
    y = np.zeros_like(dq)
    y[qrows, seeds] = first[qrows, seeds] ** v.gamma
    f = y @ inv
    score = (1 - v.blend) * f / (f.max(1, keepdims=True) + 1e-12)
    score += v.blend * first / (first.max(1, keepdims=True) + 1e-12)
    score[:, ~np.isfinite(dq).all(0)] = -np.inf
    if v.pool is None:
        return np.argsort(-score, axis=1)
    order = np.argsort(dq, axis=1)
    top = order[:, : v.pool]
    order[:, : v.pool] = np.take_along_axis(top, np.argsort(-np.take_along_axis(score, top, 1), axis=1), 1)
    return order


def hits(z: dict[str, np.ndarray], sim: np.ndarray, variant: Variant | None) -> np.ndarray:
    """(n_pool, max K) relevance of each query's ranked map images (False for a refused photo)."""
    pool, fold, ok, q_ok = z["pool"], z["fold"], z["ok"], z["q_ok"]
    out = np.zeros((len(pool), max(KS)), bool)
    for f in np.unique(fold):
        held = np.flatnonzero(fold == f)
        dq, dm = squared_l2(z[f"q{f}"], z[f"d{f}"]), squared_l2(z[f"d{f}"], z[f"d{f}"])
        dq[:, ~ok] = np.inf
        dm[:, ~ok] = dm[~ok, :] = np.inf
        np.fill_diagonal(dm, np.inf)
        ranked = np.argsort(dq, axis=1) if variant is None else diffuse(dq, dm, variant)
        q = pool[held]
        out[held] = sim[q[:, None], ranked[:, : max(KS)]] & q_ok[q][:, None]
    return out


def study_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the studies over out-of-fold embeddings (this one, query_assign.py,
    verify_features.py): the data, the artifacts they read and cache in, the preset; described by
    the first line of the study's docstring."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/datasets/london"))
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--preset", default="default")
    return p


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__)
    args = p.parse_args(argv)
    ds = load_dataset(args.data)
    if ds.sim is None:
        p.error(f"{args.data}: the study needs ground truth")
    z = collect(args.preset, ds, store.data_dir(args.artifacts, ds.root))
    sim = np.asarray(ds.sim)
    scored = sim[z["pool"]].any(axis=1)
    cell = z["cell"][scored]
    base = hits(z, sim, None)[scored]
    heads = " | ".join(f"R@{k}" for k in KS) + " | " + " | ".join(f"paired R@{k} (95%)" for k in (1, 50))
    print(f"| ranking | {heads} |\n|---|" + "---|" * (len(KS) + 2))
    for variant in [None, *VARIANTS]:
        h = base if variant is None else hits(z, sim, variant)[scored]
        cols = [f"{100 * h[:, :k].any(1).mean():.1f}" for k in KS]
        for k in (1, 50):
            diff = h[:, :k].any(1).astype(float) - base[:, :k].any(1)
            iv = cluster_bootstrap(diff, cell)
            cols.append(f"{100 * diff.mean():+.1f}" + (f" ({100 * iv[0]:+.1f} to {100 * iv[1]:+.1f})" if iv else ""))
        print(f"| {'first stage (L2)' if variant is None else variant.name} | " + " | ".join(cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
