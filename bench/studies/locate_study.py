#!/usr/bin/env python3
"""Study: is there more in the verified shortlist than the fitted heads take? Ranking and position.

    python bench/studies/locate_study.py --data ../shared/datasets/london --artifacts ARTIFACTS

Every query outside the test split is searched out of fold, as `imgsearch evaluate` does (each fold's
pieces fitted without it): without a prior, and with the simulated fixes of `imgsearch evaluate
--prior` (sigma 30 m / radius 100 m and 50 / 150, seed 0). Each answer's top 10 (id, score,
embedding distance, inliers) is kept, with the similarity transform of the first 3 verified hits,
in <artifacts>/<data>/locate-study-<cv name>.json (reused when it exists). Then, on those answers:

1. Ranking: a listwise linear model (softmax over the top 10, fitted on the other folds' queries)
   over features the heads do not see (inliers relative to the list's best, neighbours that agree,
   the fix's penalty, the rank), against the served order: R@1 with a paired 95% interval from a
   bootstrap over cells.
2. Position: the estimate's weighting (score, inliers above a floor, a power, the vote's radius) and
   a blend with the fix, by median error of the estimates and the share located within 25 m.
3. What the map's positions allow: the inlier-weighted mean of the relevant hits only, and the
   nearest relevant one (an oracle each), and whether the transform's scale says how far ahead of
   the map image the query stood (its correlation with that offset, on relevant hits).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from common.pipeline import get_pipeline
from common.retrieval_metrics import cluster_bootstrap
from common.threads import single_threaded
from dataset.layout import Dataset, load_dataset
from evaluation.cv import Fitter, cv_name, discard, fold_splits
from evaluation.prior_cv import Scenario, fix_of
from indexer import store
from model import vectors
from retrieval.locate import location_confidence
from retrieval.prior import logit

SCENARIOS = [Scenario(30.0, 100.0), Scenario(50.0, 150.0)]
K = 10
RIGHT_M = 25.0


def collect(preset: str, ds: Dataset, out_root: Path, seed: int) -> dict[str, Any]:
    """Out-of-fold top 10 of every query, without and with each scenario's fix (cached as JSON)."""
    conf = get_pipeline(preset)
    path = out_root / f"locate-study-{cv_name(conf).removeprefix('cv-')}-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    assert ds.sim is not None
    vectors_path = vectors.main(conf, ds, out_root, None)
    pool, fold, cell, splits = fold_splits(ds.queries.loc, conf.split, np.asarray(ds.sim.any(axis=1)))
    fitter = Fitter(conf, ds, vectors_path, out_root, None)
    queries: dict[str, Any] = {}

    def top(hits: list[Any]) -> list[list[float]]:
        return [[h.id, h.score, h.distance, -1 if h.inliers is None else h.inliers] for h in hits]

    with tempfile.TemporaryDirectory(prefix=".locate-", dir=out_root) as tmp:
        for f, split in enumerate(splits):
            staged = fitter.fit(split, Path(tmp) / f"fold-{f}")
            searcher = fitter.searcher(staged.loaded)
            heads = {"plain": searcher.location_head, "prior": searcher.prior_location_head}
            held = np.flatnonzero(fold == f)
            analysed = dict(fitter.queries(staged, pool[held]))
            with single_threaded():
                for i in held.tolist():
                    q = int(pool[i])
                    if (query := analysed.get(q)) is None:
                        continue
                    rec: dict[str, Any] = {"fold": f, "cell": int(cell[i]), "heads": heads}
                    rec["plain"] = {"hits": top(searcher.rank(query, K))}
                    for s in SCENARIOS:
                        prior = fix_of(ds, q, s, seed)
                        hits, _ = searcher.rank_near(query, prior, K)
                        verified = [h for h in hits if h.inliers is not None][:3]
                        assert query.verify_features is not None and query.verify_words is not None
                        ids = [h.id for h in verified]
                        ev = searcher.backend.evidence(query.verify_features, query.verify_words, ids)
                        scales = {
                            h.id: float(np.sqrt(abs(np.linalg.det(e.transform[:, :2]))))
                            for h, e in zip(verified, ev, strict=True)
                            if e.transform is not None
                        }
                        rec[s.name] = {"fix": [prior.easting, prior.northing], "hits": top(hits), "scale": scales}
                    queries[str(q)] = rec
            discard(staged)
            print(f"fold {f + 1}/{len(splits)} collected", file=sys.stderr)
    out = {"preset": preset, "seed": seed, "queries": queries}
    path.write_text(json.dumps(out))
    return out


def features(hits: list[list[float]], loc: np.ndarray, fix: list[float] | None, sigma: float) -> np.ndarray:
    """(n, 8) per hit: logit of the served score, distance, log(1 + inliers), verified, the fix's
    penalty, log(1 + inliers) minus the list's best, neighbours within 25 m with 15+ inliers, rank."""
    h = np.asarray(hits, np.float64)
    inl = h[:, 3]
    li = np.log1p(np.maximum(inl, 0.0))
    xy = loc[h[:, 0].astype(int), :2]
    pen = np.zeros(len(h)) if fix is None else ((xy - np.asarray(fix)) ** 2).sum(1) / (2 * sigma**2)
    near = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1)) < RIGHT_M
    np.fill_diagonal(near, False)
    support = (near & (inl >= 15)[None, :]).sum(1)
    return np.stack(
        [logit(h[:, 1]), h[:, 2], li, inl >= 0, pen, li - li.max(), np.log1p(support), np.arange(len(h))], axis=1
    )


def fit_listwise(xs: list[np.ndarray], ys: list[np.ndarray], iters: int = 300, lr: float = 0.5) -> np.ndarray:
    """Weights of a linear score whose softmax over each list puts its mass on the relevant hits."""
    mu = np.concatenate(xs).mean(0)
    sd = np.concatenate(xs).std(0) + 1e-9
    zs = [(x - mu) / sd for x in xs]
    w = np.zeros(xs[0].shape[1])
    for _ in range(iters):
        g = np.zeros_like(w)
        for z, y in zip(zs, ys, strict=True):
            s = z @ w
            p = np.exp(s - s.max())
            g += z.T @ (p / p.sum() - y / y.sum())
        w -= lr * (g / len(zs) + 1e-3 * w)
    return np.concatenate([w / sd, [-(w / sd) @ mu]])


def rerank(data: dict[str, Any], ds: Dataset, key: str, sigma: float) -> None:
    sim = np.asarray(ds.sim)
    # Every query with a relevant map image counts, as in the cross-validation: one without hits
    # (the pipeline refused the photo) is a miss either way.
    rows = [q for q in data if sim[int(q)].any()]
    answered = [q for q in rows if data[q][key]["hits"]]
    x = {q: features(data[q][key]["hits"], ds.database.loc, data[q][key].get("fix"), sigma) for q in answered}
    y = {q: sim[int(q), np.asarray(data[q][key]["hits"])[:, 0].astype(int)].astype(float) for q in answered}
    served = np.array([y[q][0] if q in y else 0.0 for q in rows])
    cell = np.array([data[q]["cell"] for q in rows])
    fold = np.array([data[q]["fold"] for q in rows])
    for name, cols in (("served score", [0]), ("+ inliers", [0, 2, 3]), ("all 8", list(range(8)))):
        top1 = np.zeros(len(rows))
        for f in np.unique(fold):
            train = [q for q, g in zip(rows, fold, strict=True) if g != f and q in y and y[q].any()]
            w = fit_listwise([x[q][:, cols] for q in train], [y[q] for q in train])
            for i in np.flatnonzero(fold == f):
                if (q := rows[i]) in y:
                    top1[i] = y[q][int(np.argmax(x[q][:, cols] @ w[:-1]))]
        diff, iv = top1 - served, cluster_bootstrap(top1 - served, cell)
        paired = f"{100 * diff.mean():+.1f}" + (f" ({100 * iv[0]:+.1f} to {100 * iv[1]:+.1f})" if iv else "")
        print(f"| {key} | {name} | {100 * served.mean():.1f} | {100 * top1.mean():.1f} | {paired} |")


def position(
    rec: dict[str, Any], key: str, loc: np.ndarray, weight: str, floor: float, power: float, radius: float, blend: float
) -> np.ndarray | None:
    """The estimate of one answer (None: no hits or below the location head's 0.5)."""
    hits = sorted(rec[key]["hits"], key=lambda h: -h[1])
    if not hits or location_confidence(hits[0][1], rec["heads"]["plain" if key == "plain" else "prior"]) < 0.5:
        return None
    h = np.asarray(hits, np.float64)
    xy = loc[h[:, 0].astype(int), :2]
    near = np.hypot(*(xy - xy[0]).T) < radius
    base = np.maximum(h[:, 1], 1e-12) if weight == "score" else np.maximum(h[:, 3] - floor, 0.0)
    w = base**power * near
    p = np.average(xy, axis=0, weights=w if w.sum() > 0 else near.astype(float))
    if blend > 0 and "fix" in rec[key]:
        p = (1 - blend) * p + blend * np.asarray(rec[key]["fix"])
    return p


def positions(data: dict[str, Any], ds: Dataset, key: str) -> None:
    sim = np.asarray(ds.sim)
    rows = [q for q in data if sim[int(q)].any()]
    truth = ds.queries.loc[[int(q) for q in rows], :2]
    variants = [("score", 0, 1, 25, 0), ("score", 0, 4, 25, 0), ("inliers", 0, 2, 25, 0), ("inliers", 10, 1, 25, 0)]
    variants += [("inliers", 10, 1, 40, 0), ("score", 0, 1, 25, 0.1), ("score", 0, 1, 25, 0.3)]
    for weight, floor, power, radius, blend in variants:
        err = np.full(len(rows), np.nan)
        for i, q in enumerate(rows):
            p = position(data[q], key, ds.database.loc, weight, floor, power, radius, blend)
            if p is not None:
                err[i] = np.hypot(*(p - truth[i]))
        a = ~np.isnan(err)
        print(
            f"| {key} | {weight} > {floor}, power {power}, radius {radius} m, fix {blend:g} | "
            f"{np.median(err[a]):.1f} | {100 * (err[a] < RIGHT_M).mean():.1f} | {100 * (err < RIGHT_M).mean():.1f} |"
        )


def bounds(data: dict[str, Any], ds: Dataset, key: str) -> None:
    sim = np.asarray(ds.sim)
    loc, qloc = ds.database.loc, ds.queries.loc
    mean_rel, nearest_rel, first_rel, log_s, ahead = [], [], [], [], []
    for q, rec in data.items():
        qi = int(q)
        rel = [h for h in rec[key]["hits"] if sim[qi, int(h[0])] and h[3] >= 0]
        if len(rel) < 2:
            continue
        ids = np.array([int(h[0]) for h in rel])
        d = np.hypot(*(loc[ids, :2] - qloc[qi, :2]).T)
        w = np.array([h[3] for h in rel], np.float64) + 1e-9
        mean_rel.append(np.hypot(*(np.average(loc[ids, :2], axis=0, weights=w) - qloc[qi, :2])))
        nearest_rel.append(d.min())
        first_rel.append(d[0])
        for m, s in rec[key].get("scale", {}).items():
            if sim[qi, int(m)]:
                rad = np.deg2rad(loc[int(m), 2])
                off = qloc[qi, :2] - loc[int(m), :2]
                log_s.append(np.log(s))
                ahead.append(off[0] * np.sin(rad) + off[1] * np.cos(rad))
    print(
        f"| {key} | {len(first_rel)} | {np.median(first_rel):.1f} | {np.median(mean_rel):.1f} | "
        f"{np.median(nearest_rel):.1f} | {np.corrcoef(log_s, ahead)[0, 1]:+.3f} ({len(log_s)} pairs) |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/datasets/london"))
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--preset", default="default")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ds = load_dataset(args.data)
    if ds.sim is None:
        p.error(f"{args.data}: the study needs ground truth")
    data = collect(args.preset, ds, store.data_dir(args.artifacts, ds.root), args.seed)["queries"]
    keys = ["plain"] + [s.name for s in SCENARIOS]
    print("| answers | ranked by | served R@1 | R@1 | paired difference (95%) |\n|---|---|---|---|---|")
    for key, s in zip(keys, [1.0] + [s.sigma_m for s in SCENARIOS], strict=True):
        rerank(data, ds, key, s)
    print("\n| answers | position | median error m | estimates right % | located ≤25 m % |\n|---|---|---|---|---|")
    for key in keys:
        positions(data, ds, key)
    print(
        "\n| answers | queries with 2+ relevant verified hits | first relevant m | inlier-weighted mean of "
        "the relevant m | nearest relevant m | corr(log scale, metres ahead) |\n|---|---|---|---|---|---|"
    )
    for key in keys[1:]:
        bounds(data, ds, key)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
