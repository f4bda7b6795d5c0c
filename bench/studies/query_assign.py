#!/usr/bin/env python3
"""Study: does assigning a query's descriptors to their second nearest word too raise first-stage recall?

    python bench/studies/query_assign.py --data ../shared/datasets/london --artifacts ARTIFACTS

A descriptor near the boundary of two visual words adds its residual to one word in the query and
may add it to the other in the map image of the same place. Here the query's VLAD also adds each
descriptor to its second nearest word when that word's squared distance is within ratio^2 of the
nearest's (multiple assignment, the map images unchanged). For each ratio the encoder is trained
again on the queries' new vectors, fold by fold as `imgsearch evaluate` does, and the first stage
ranks the map by L2 distance. Figures: first-stage R@1 / R@10 / R@50 over the queries with a relevant
map image (a refused photo is a miss), paired against single assignment (ratio 0, the vectors as the
vectors stage made them) with a 95% interval from a bootstrap over the cross-validation's cells.
"""

from __future__ import annotations

import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/studies/: the diffusion study's helpers
from diffusion import KS, embed_folds, hits, study_parser

from common.pipeline import Pipeline, get_pipeline
from common.retrieval_metrics import cluster_bootstrap
from common.threads import single_threaded
from dataset.layout import Dataset, load_dataset
from features.decode import ImageDecodeError
from features.extract import image_to_features
from features.orb import NoKeypointsError, OrbFeatures
from indexer import store
from model import vectors
from model.vectorize import EPS, Vectorizer, unpack

_state: dict[str, object] = {}  # set before the pool is forked, read by its workers


def assigned(vectorizer: Vectorizer, feats: OrbFeatures, ratio: float) -> np.ndarray:
    """The query's regional VLAD with each descriptor also in its second nearest word where that
    word's squared distance is within ratio^2 of the nearest's (ratio 0: single assignment)."""
    assert vectorizer.centroids is not None
    bits = unpack(feats.descriptors)
    d = bits.sum(1, keepdims=True) - 2.0 * (bits @ vectorizer.centroids.T) + (vectorizer.centroids**2).sum(1)
    two = np.argsort(d, axis=1, kind="stable")[:, :2]
    d1, d2 = np.take_along_axis(d, two, 1).T
    extra = np.flatnonzero(d2 <= ratio**2 * d1) if ratio > 0 else np.zeros(0, np.int64)
    words = np.concatenate([two[:, 0], two[extra, 1]])
    desc = np.concatenate([feats.descriptors, feats.descriptors[extra]])
    xy = np.concatenate([feats.xy, feats.xy[extra]])
    v = vectorizer.regional(words, desc, xy, feats.width, feats.height)
    return (v / max(float(np.linalg.norm(v)), EPS)).astype(np.float32)


def _vectors(q: int) -> list[np.ndarray] | None:
    ds, conf, vectorizer, ratios = _state["ds"], _state["conf"], _state["vectorizer"], _state["ratios"]
    assert isinstance(ds, Dataset) and isinstance(conf, Pipeline) and isinstance(vectorizer, Vectorizer)
    try:
        feats = image_to_features(ds.image_path(ds.queries.paths[q]).read_bytes(), conf.features)
    except (ImageDecodeError, NoKeypointsError):
        return None
    return [assigned(vectorizer, feats, r) for r in ratios]


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__)
    p.add_argument("--ratios", type=float, nargs="+", default=[1.05, 1.15], help="distance ratios (> 1) to try")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    if any(not 1.0 < r <= 2.0 for r in args.ratios) or args.jobs < 1:
        p.error("each ratio must be within (1, 2] and --jobs positive")
    ds = load_dataset(args.data)
    if ds.sim is None:
        p.error(f"{args.data}: the study needs ground truth")
    conf = get_pipeline(args.preset)
    if conf.vector.name != "vlad":
        p.error(f"{args.preset}: the study needs a VLAD pipeline")
    root = store.data_dir(args.artifacts, ds.root)
    vectors_path = vectors.main(conf, ds, root, None)
    vectorizer = Vectorizer.load(vectors.vectorizer_path(vectors_path), conf.vector)
    xq, q_ok = vectors.load_vectors(vectors_path, ds.queries.paths)
    xd, ok = vectors.load_vectors(vectors_path, ds.database.paths)
    ratios = [0.0, *args.ratios]
    _state.update(ds=ds, conf=conf, vectorizer=vectorizer, ratios=ratios)
    with single_threaded(), Pool(args.jobs) as pool:
        got = pool.map(_vectors, range(len(ds.queries.paths)), chunksize=16)
    done = [q for q, g in enumerate(got) if g is not None]
    # Ratio 0 must be the vectors stage's own query vectors, or the comparison is not paired.
    worst = max(float(np.abs(got[q][0] - xq[q]).max()) for q in done[:50])  # type: ignore[index]
    if worst > 1e-5:
        raise SystemExit(f"single assignment differs from the vectors stage by {worst}")
    sim = np.asarray(ds.sim)
    base = None
    print("| query assignment | " + " | ".join(f"R@{k}" for k in KS) + " | paired R@1 (95%) | paired R@50 (95%) |")
    print("|---|" + "---|" * (len(KS) + 2))
    for j, ratio in enumerate(ratios):
        xv = xq.copy()
        for q in done:
            xv[q] = got[q][j]  # type: ignore[index]
        z = embed_folds(conf, ds, xv, xd, root) | {"ok": ok, "q_ok": q_ok}
        scored = sim[z["pool"]].any(axis=1)
        h = hits(z, sim, None)[scored]
        base = h if base is None else base
        cols = [f"{100 * h[:, :k].any(1).mean():.1f}" for k in KS]
        for k in (1, 50):
            diff = h[:, :k].any(1).astype(float) - base[:, :k].any(1)
            iv = cluster_bootstrap(diff, z["cell"][scored])
            cols.append(f"{100 * diff.mean():+.1f}" + (f" ({100 * iv[0]:+.1f} to {100 * iv[1]:+.1f})" if iv else ""))
        name = "nearest word" if ratio == 0 else f"+ second word within {ratio:g}"
        print(f"| {name} | " + " | ".join(cols) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
