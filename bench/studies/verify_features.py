#!/usr/bin/env python3
"""Study: does where the inliers lie, what share of the tentative matches they are, or how distinctive
their query keypoints are, tell the relevant map image of a verified shortlist from the rest better
than their count and the distance?

    python bench/studies/verify_features.py --data ../shared/datasets/london --artifacts ARTIFACTS

Every query outside the test split is embedded out of fold (bench/studies/diffusion.py: collect, the
same encoders as `imgsearch evaluate`), its first-stage top `verify.n` is verified by the preset's
own Verifier, and each candidate gets: the embedding distance, its inliers, the tentative matches
RANSAC was given, the share of a 4 x 4 grid over the query's keypoints (and over the map image's)
that the inliers reach, the fitted transform's |log scale|, and the inliers weighed by how few
shortlisted map images more than 50 m away hold the same query keypoint (model/verify.py:
distinct_inliers, what `verify.distinct_m` scores). Per fold, a head over a variant's features is
fitted on the other folds' candidates by logistic regression and re-ranks the fold's shortlists.
The baseline is the head `default-counted` serves, monotone logistic weights over (distance,
log(1 + inliers)), fitted the same way.

Figures: R@1 and R@10 of the re-ranked shortlist over the queries with a relevant map image (a photo
the pipeline refuses is a miss), and the paired difference to the baseline with a 95% interval from
a bootstrap over the cross-validation's cells. The candidates' features are cached in
<artifacts>/<data>/verify-features-study-<cv name>.npz.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/studies/: the diffusion study's helpers
from diffusion import collect, squared_l2, study_parser

from common.pipeline import UnknownPresetError, get_pipeline
from common.retrieval_metrics import cluster_bootstrap
from common.threads import single_threaded
from dataset.layout import load_dataset
from evaluation.cv import cv_name
from features.decode import ImageDecodeError
from features.extract import image_to_features
from features.orb import NoKeypointsError
from indexer import build as index_build
from indexer import store
from model import vectors
from model.score_head import fit_logistic
from model.vectorize import Vectorizer
from model.verify import Evidence, Verifier, distinct_inliers
from retrieval.heads import monotone_head

GRID = 4
# Columns of the cached features, per candidate (the embedding distance is cached apart).
COLUMNS = ("inliers", "matched", "cover_query", "cover_map", "log_scale", "distinct")
DISTINCT_M = 50.0
_state: dict[str, object] = {}  # set before the pool is forked, read by its workers


def coverage(xy: np.ndarray, frame: np.ndarray, grid: int = GRID) -> float:
    """Share of a grid x grid partition of the keypoints' extent `frame` ((2, 2): min and max corner)
    holding at least one of the points `xy`."""
    if len(xy) == 0:
        return 0.0
    lo, hi = frame[0], frame[1]
    cell = np.clip(((xy - lo) / np.maximum(hi - lo, 1e-6) * grid).astype(np.int64), 0, grid - 1)
    return len(np.unique(cell[:, 0] * grid + cell[:, 1])) / grid**2


def candidate_features(evidence: Evidence, query_frame: np.ndarray, map_frame: np.ndarray) -> list[float]:
    """(inliers, matched, cover_query, cover_map, log_scale) of one verified candidate."""
    m = evidence.transform
    scale = 0.0 if m is None else float(abs(np.log(max(np.hypot(m[0, 0], m[1, 0]), 1e-6))))
    return [
        float(len(evidence.query_xy)),
        float(evidence.matched),
        coverage(evidence.query_xy, query_frame),
        coverage(evidence.map_xy, map_frame),
        scale,
    ]


def _frame(xy: np.ndarray) -> np.ndarray:
    return np.stack([xy.min(axis=0), xy.max(axis=0)]) if len(xy) else np.zeros((2, 2))


def _verify(args: tuple[int, np.ndarray]) -> np.ndarray | None:
    """(n, 6) features of query `q`'s candidates (None: the pipeline refuses the photo)."""
    q, cands = args
    path, verifier, vectorizer, conf = _state["paths"], _state["verifier"], _state["vectorizer"], _state["conf"]
    where = _state["where"]
    assert isinstance(verifier, Verifier) and isinstance(vectorizer, Vectorizer) and isinstance(path, list)
    assert isinstance(where, np.ndarray)
    try:
        feats = image_to_features(Path(path[q]).read_bytes(), conf.verify_features)  # type: ignore[attr-defined]
    except (ImageDecodeError, NoKeypointsError):
        return None
    words = vectorizer.words(feats.descriptors, verifier.conf.query_words)
    ids = cands.tolist()
    s = verifier.store
    frames = [_frame(s.xy[s.offsets[c] : s.offsets[c + 1]]) for c in ids]
    found = verifier.evidence(feats, words, ids)
    qf = _frame(feats.xy)
    out = np.array([candidate_features(e, qf, f) for e, f in zip(found, frames, strict=True)])
    return np.column_stack([out, distinct_inliers(found, where[cands], DISTINCT_M)])


def shortlists(z: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pooled query's first-stage top n (map rows, nearest first) and their Euclidean distances."""
    pool, fold = z["pool"], z["fold"]
    cands = np.zeros((len(pool), n), np.int64)
    dist = np.zeros((len(pool), n))
    for f in np.unique(fold).tolist():
        held = np.flatnonzero(fold == f)
        d = squared_l2(z[f"q{f}"], z[f"d{f}"])
        d[:, ~z["ok"].astype(bool)] = np.inf
        top = np.argsort(d, axis=1, kind="stable")[:, :n]
        cands[held], dist[held] = top, np.sqrt(np.take_along_axis(d, top, 1))
    return cands, dist


class Variant(NamedTuple):
    name: str
    columns: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (distance, features) -> (n, d) head inputs
    monotone: bool = False  # fitted as the served heads are (retrieval/heads.py: monotone_head), not standardised


VARIANTS = [
    Variant("counted: distance, log inliers", lambda d, f: np.column_stack([d, np.log1p(f[:, 0])]), monotone=True),
    Variant("+ inlier coverage of the query", lambda d, f: np.column_stack([d, np.log1p(f[:, 0]), f[:, 2]])),
    Variant("+ coverage of query and map", lambda d, f: np.column_stack([d, np.log1p(f[:, 0]), f[:, 2], f[:, 3]])),
    Variant("+ log tentative matches", lambda d, f: np.column_stack([d, np.log1p(f[:, 0]), np.log1p(f[:, 1])])),
    Variant(
        "+ coverages, tentative, scale",
        lambda d, f: np.column_stack([d, np.log1p(f[:, 0]), np.log1p(f[:, 1]), f[:, 2], f[:, 3], f[:, 4]]),
    ),
    Variant("distinct inliers instead", lambda d, f: np.column_stack([d, np.log1p(f[:, 5])]), monotone=True),
    Variant("distinct inliers + coverage", lambda d, f: np.column_stack([d, np.log1p(f[:, 5]), f[:, 2]])),
]


def rerank(variant: Variant, dist: np.ndarray, feats: np.ndarray, labels: np.ndarray, train: np.ndarray) -> np.ndarray:
    """(n_queries, n) scores of every shortlist by the variant's head fitted on the `train` queries."""
    x = np.stack([variant.columns(dist[i], feats[i]) for i in range(len(dist))])  # (nq, n, d)
    xt, yt = x[train].reshape(-1, x.shape[2]), labels[train].ravel()
    if variant.monotone:
        w = np.asarray(monotone_head(xt, yt))
    else:
        mu, sd = xt.mean(axis=0), xt.std(axis=0) + 1e-9
        w = fit_logistic((xt - mu) / sd, yt, l2=1.0)
        w = np.append(w[:-1] / sd, w[-1] - (w[:-1] * mu / sd).sum())
    out = x @ w[:-1] + w[-1]
    return out


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    try:
        conf = get_pipeline(args.preset)
    except UnknownPresetError as e:
        p.error(str(e))
    if conf.verify is None:
        print(f"verify_features: preset {args.preset!r} does not verify", file=sys.stderr)
        return 2
    ds = load_dataset(args.data)
    if ds.sim is None:
        print("verify_features: the data has no ground truth", file=sys.stderr)
        return 2
    root = store.data_dir(args.artifacts, ds.root)
    root.mkdir(parents=True, exist_ok=True)
    z = collect(args.preset, ds, root)
    pool, fold, cell = z["pool"], z["fold"], z["cell"]
    cache = root / f"verify-features-study-{cv_name(conf).removeprefix('cv-')}.npz"
    if cache.exists():
        with np.load(cache) as c:
            cands, dist, feats, valid = c["cands"], c["dist"], c["feats"], c["valid"]
    else:
        cands, dist = shortlists(z, conf.verify.n)
        vectorizer = Vectorizer.load(vectors.vectorizer_path(vectors.main(conf, ds, root, None)), conf.vector)
        keypoints = index_build.build_map_features(conf, ds, vectorizer, root, args.jobs)
        verifier = Verifier(conf.verify, None, keypoints, vectorizer.n_words, [0.0, 1.0, 0.0])
        paths = [str(ds.image_path(p)) for p in ds.queries.paths]
        _state.update(paths=paths, verifier=verifier, vectorizer=vectorizer, conf=conf, where=ds.database.loc[:, :2])
        with single_threaded(), Pool(args.jobs) as workers:
            got = workers.map(_verify, list(zip(pool.tolist(), cands, strict=True)), chunksize=8)
        valid = np.array([g is not None for g in got])
        feats = np.stack([np.zeros((conf.verify.n, len(COLUMNS))) if g is None else g for g in got])
        np.savez(cache.with_suffix(".tmp.npz"), cands=cands, dist=dist, feats=feats, valid=valid)
        cache.with_suffix(".tmp.npz").replace(cache)
    labels = ds.sim[pool[:, None], cands].astype(np.float64)
    scored = np.asarray(ds.sim[pool].any(axis=1))
    base: dict[int, np.ndarray] = {}
    counted_order = None
    print(f"{'head':40} {'R@1':>6} {'R@10':>6}  paired R@1 (95%)        paired R@10 (95%)")
    for variant in VARIANTS:
        scores = np.zeros(dist.shape)
        for f in np.unique(fold).tolist():
            train = valid & (fold != f)
            scores[fold == f] = rerank(variant, dist, feats, labels, train)[fold == f]
        order = np.argsort(-scores, axis=1, kind="stable")
        counted_order = order if counted_order is None else counted_order
        ranked_rel = np.take_along_axis(labels, order, 1) > 0
        row = f"{variant.name:40}"
        for k in (1, 10):
            hit = (ranked_rel[:, :k].any(axis=1) & valid)[scored].astype(np.float64)
            row += f" {100 * hit.mean():6.1f}"
            if k not in base:
                base[k] = hit
        for k in (1, 10):
            hit = (ranked_rel[:, :k].any(axis=1) & valid)[scored].astype(np.float64)
            iv = cluster_bootstrap(hit - base[k], cell[scored])
            delta = 100 * float((hit - base[k]).mean())
            row += "" if iv is None else f"  {delta:+5.1f} ({100 * iv[0]:+.1f} to {100 * iv[1]:+.1f})"
        print(row, flush=True)
    assert counted_order is not None
    below = ranked_below(counted_order, labels, valid & scored)
    top = np.take_along_axis(cands, counted_order[:, :1], 1)[:, 0]
    far = np.hypot(*(ds.queries.loc[pool, :2] - ds.database.loc[top, :2]).T) > 300.0
    top_inl = np.take_along_axis(feats[..., 0], counted_order[:, :1], 1)[:, 0]
    rel_inl = np.where(labels > 0, feats[..., 0], -1.0).max(axis=1)
    print(
        f"counted head, a relevant candidate ranked below another: {below.sum()} queries; the first hit "
        f"stands > 300 m from the photo for {100 * far[below].mean():.0f}% of them; median inliers of the "
        f"first hit {np.median(top_inl[below]):.0f}, of the best relevant candidate {np.median(rel_inl[below]):.0f}"
    )
    return 0


def ranked_below(order: np.ndarray, labels: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """Which of the `counted` queries have a relevant candidate in their shortlist, but not first in
    `order` (each row a ranking of that query's candidates)."""
    first = np.take_along_axis(labels, order[:, :1], 1)[:, 0] > 0
    return counted & (labels > 0).any(axis=1) & ~first


if __name__ == "__main__":
    sys.exit(main())
