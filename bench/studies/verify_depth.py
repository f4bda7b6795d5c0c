#!/usr/bin/env python3
"""Study: what verifying a deeper shortlist adds, by area-fold cross-validation.

    python bench/studies/verify_depth.py --data ../shared/datasets/london --artifacts ARTIFACTS --n 100

The preset is cross-validated as `imgsearch evaluate` does (its own cv-*.json is reused when it
exists), and again with the verified shortlist `n` long instead of its own (cached beside it as
cv-<preset>-n<n>-*.json). Figures: each's R@1 / R@10 / R@50 / P@10 / located within 25 m, and the
paired difference with a 95% interval from a bootstrap over the cross-validation's cells.

With the preset's served index built (`imgsearch build`), the verification of `--time` queries is
also timed on one thread: the preset's own shortlist of each against `n` candidates (its deeper
run's list, filled up with the next map rows), as the median ratio of the two, measured in one run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from common.pipeline import Pipeline, get_pipeline
from common.retrieval_metrics import cluster_bootstrap
from common.threads import single_threaded
from dataset.layout import Dataset, load_dataset
from evaluation import cv
from features.decode import ImageDecodeError
from features.extract import image_to_features
from features.orb import NoKeypointsError
from indexer import store
from model import vectors
from model.vectorize import Vectorizer
from model.verify import MapFeatures, Verifier

FIGURES = ("recall@1", "recall@10", "recall@50", "precision@10", "localised_within_25m")


def deeper(conf: Pipeline, n: int) -> Pipeline:
    if conf.verify is None:
        raise ValueError(f"{conf.name}: the preset does not verify")
    return conf.model_copy(update={"name": f"{conf.name}-n{n}", "verify": conf.verify.model_copy(update={"n": n})})


def time_ratio(conf: Pipeline, ds: Dataset, version: Path, lists: np.ndarray, rows: np.ndarray, n: int) -> float:
    """Median over the queries `rows` of (time to verify n candidates) / (time to verify the preset's
    shortlist), single-threaded, each pair timed back to back."""
    assert conf.verify is not None
    vectorizer = Vectorizer.load(version / "vectorizer.npz", conf.vector)
    keypoints = MapFeatures.load(version / "verify.npz")
    verifier = Verifier(conf.verify, None, keypoints, vectorizer.n_words, [0.0, 1.0, 0.0])
    ratios = []
    with single_threaded():
        for q, listed in zip(rows.tolist(), lists, strict=True):
            try:
                feats = image_to_features(ds.image_path(ds.queries.paths[q]).read_bytes(), conf.verify_features)
            except (ImageDecodeError, NoKeypointsError):
                continue
            words = vectorizer.words(feats.descriptors, conf.verify.query_words)
            ids = list(dict.fromkeys([int(i) for i in listed if i >= 0] + keypoints.ids.tolist()))[:n]
            took = []
            for m in (conf.verify.n, n):
                t0 = time.perf_counter()
                verifier.inliers(feats, words, ids[:m])
                took.append(time.perf_counter() - t0)
            ratios.append(took[1] / took[0])
    return float(np.median(ratios))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/datasets/london"))
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--preset", default="default")
    p.add_argument("--n", type=int, default=100, help="verified shortlist length to compare with the preset's")
    p.add_argument("--time", type=int, default=100, help="queries whose verification is timed (0: none)")
    args = p.parse_args(argv)
    if not 1 <= args.n <= 1000:
        p.error("--n must be within 1..1000")
    ds = load_dataset(args.data)
    if ds.sim is None:
        p.error(f"{args.data}: the study needs ground truth")
    root = store.data_dir(args.artifacts, ds.root)
    base_conf = get_pipeline(args.preset)
    try:
        confs = [base_conf, deeper(base_conf, args.n)]
    except ValueError as e:
        p.error(str(e))
    runs = []
    for conf in confs:
        path = cv.main(conf, ds, vectors.main(conf, ds, root, None), root)
        runs.append(cv.CrossValidation.load(path))
    base, other = runs
    assert (base.rows == other.rows).all()  # the same queries and folds: the split does not depend on n
    sim = np.asarray(ds.sim)[base.rows]
    a, b = (cv.per_query(r.ranked, sim, r.loc_error) for r in runs)
    shortlist = confs[0].verify.n if confs[0].verify else 0
    print(f"| figure (CV) | {shortlist} verified | {args.n} verified | paired (95%) |")
    print("|---|---|---|---|")
    for key in FIGURES:
        diff = b[key] - a[key]
        iv = cluster_bootstrap(diff, base.cell)
        paired = f"{100 * np.nanmean(diff):+.1f}" + (f" ({100 * iv[0]:+.1f} to {100 * iv[1]:+.1f})" if iv else "")
        print(f"| {key} | {100 * np.nanmean(a[key]):.1f} | {100 * np.nanmean(b[key]):.1f} | {paired} |")
    if args.time > 0:
        try:
            version = store.current_version(store.index_family(args.artifacts, ds.root, args.preset))
        except store.IndexLoadError as e:
            p.error(f"--time needs the preset's served index: {e}")
        pick = np.random.default_rng(0).choice(len(base.rows), min(args.time, len(base.rows)), replace=False)
        lists = np.concatenate([other.ranked[pick], base.ranked[pick]], axis=1)
        ratio = time_ratio(confs[0], ds, version, lists, base.rows[pick], args.n)
        print(f"\nverify stage, {args.n} against {shortlist} candidates: x{ratio:.2f} (median of {len(pick)} queries)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
