"""Searches with a position prior, cross-validated: what a phone's rough fix adds on unseen streets.

The same area folds as evaluation/cv.py: per fold every labelled piece, the prior's fusion heads
included, is fitted from the other folds (Fitter.fit), and each held-out query is searched through
Searcher.rank_near with a simulated fix: its true position plus Gaussian noise of `sigma_m` per axis
(seeded by the seed and the query's row, so every method sees the same fix), a radius of `radius_m`
and the accuracy sigma_m. The baseline is the fix alone: the map images within the radius ranked by
their distance to it, the fix itself as the location. Saved as cvprior-<preset>-<hash>-....json (the
figures) and .npz (each query's top hit and errors, for paired comparisons).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.clock import utc_timestamp
from common.files import atomic_write, npz_bytes
from common.pipeline import Pipeline
from common.retrieval_metrics import cluster_bootstrap
from common.threads import single_threaded
from dataset.layout import Dataset
from dataset.relevance import heading_diff
from evaluation.cv import Fitter, cv_name, discard, fold_splits
from evaluation.cv import per_query as cv_per_query
from retrieval.locate import DEFAULT_UTM_EPSG, estimate_location
from retrieval.prior import Prior, simulated_prior
from retrieval.searcher import Searcher
from retrieval.spatial import Places

log = logging.getLogger(__name__)

K = 10


@dataclass(frozen=True)
class Scenario:
    sigma_m: float
    radius_m: float

    @property
    def name(self) -> str:
        return f"sigma{self.sigma_m:g}-r{self.radius_m:g}"


def fix_of(dataset: Dataset, q: int, scenario: Scenario, seed: int) -> Prior:
    """The simulated fix of query row q: the same for every method, reproducible from (seed, q)."""
    rng = np.random.default_rng([seed, q, int(scenario.sigma_m * 1000)])
    return simulated_prior(dataset.queries.loc[q], scenario.sigma_m, scenario.radius_m, rng)


def per_query(
    ranked: list[list[int]], sim: np.ndarray, loc_err: np.ndarray, head_err: np.ndarray
) -> dict[str, np.ndarray]:
    """(n,) values whose means are the figures (NaN: the query does not count for it): the area-fold
    cross-validation's (evaluation/cv.py per_query) of the top K, and the heading's."""
    padded = np.full((len(ranked), K), -1, np.int64)
    for i, rows in enumerate(ranked):
        padded[i, : len(rows[:K])] = rows[:K]
    values = cv_per_query(padded, sim, loc_err)
    keys = ("recall@1", "recall@10", "precision@10", "localised_within_25m")
    return {k: values[k] for k in keys} | {
        "heading_within_30deg": np.where(np.isnan(head_err), np.nan, head_err <= 30.0)
    }


def figures(
    ranked: list[list[int]], sim: np.ndarray, loc_err: np.ndarray, head_err: np.ndarray, cell: np.ndarray
) -> dict[str, Any]:
    values = per_query(ranked, sim, loc_err, head_err)
    out: dict[str, Any] = {"n_queries": len(ranked)}
    for key, v in values.items():
        ok = ~np.isnan(v)
        out[key] = round(float(v[ok].mean()), 4) if ok.any() else None
        iv = cluster_bootstrap(v, cell)
        out[f"{key}_interval"] = None if iv is None else [round(iv[0], 4), round(iv[1], 4)]
    answered = ~np.isnan(loc_err)
    out["localisation_answered"] = round(float(answered.mean()), 4)
    out["localisation_right"] = round(float((loc_err[answered] < 25).mean()), 4) if answered.any() else None
    out["localisation_median_m"] = round(float(np.median(loc_err[answered])), 2) if answered.any() else None
    has_h = ~np.isnan(head_err)
    out["heading_median_deg"] = round(float(np.median(head_err[has_h])), 2) if has_h.any() else None
    return out


def main(
    conf: Pipeline,
    dataset: Dataset,
    vectors_path: Path,
    out_root: Path,
    scenarios: list[Scenario],
    seed: int = 0,
    jobs: int | None = None,
) -> Path:
    """Cross-validate prior searches of every scenario against the fix alone; cached by name."""
    tag = "-".join(s.name for s in scenarios)
    path = out_root / f"cvprior-{cv_name(conf).removeprefix('cv-')}-{tag}-seed{seed}.json"
    if path.exists():
        return path
    if dataset.sim is None:
        raise ValueError(f"{dataset.root}: cross-validation needs ground truth")
    sim_all = np.asarray(dataset.sim)
    loc = dataset.queries.loc
    pool, fold, cell, splits = fold_splits(loc, conf.split, np.asarray(sim_all.any(axis=1)))
    keep = sim_all[pool].any(axis=1)  # queries with a relevant map image, as the retrieval figures count
    fitter = Fitter(conf, dataset, vectors_path, out_root, jobs)
    places = Places(np.arange(len(dataset.database)), dataset.database.loc[:, 0], dataset.database.loc[:, 1])
    runs: dict[str, dict[str, Any]] = {}
    for s in scenarios:
        for method in ("fused", "fix-alone"):
            runs[f"{s.name}/{method}"] = {
                "ranked": [[] for _ in pool],
                "loc": np.full(len(pool), np.nan),
                "head": np.full(len(pool), np.nan),
            }
    with tempfile.TemporaryDirectory(prefix=".cvprior-", dir=out_root) as tmp:
        for f, split in enumerate(splits):
            staged = fitter.fit(split, Path(tmp) / f"fold-{f}")
            searcher = fitter.searcher(staged.loaded)
            held = np.flatnonzero(fold == f)
            analysed = dict(fitter.queries(staged, pool[held]))
            with single_threaded():
                for i in held.tolist():
                    q = int(pool[i])
                    for s in scenarios:
                        prior = fix_of(dataset, q, s, seed)
                        _fused(runs[f"{s.name}/fused"], i, q, searcher, analysed.get(q), prior, dataset)
                        _fix_alone(runs[f"{s.name}/fix-alone"], i, q, places, prior, dataset)
            discard(staged)
            log.info("cv prior %s fold %d/%d done", conf.name, f + 1, conf.split.folds)
    out: dict[str, Any] = {
        "preset": conf.name,
        "seed": seed,
        "folds": conf.split.folds,
        "n_queries_total": len(pool),
        "computed_at": utc_timestamp(),
        "results": {},
    }
    answers: dict[str, np.ndarray] = {"rows": pool[keep], "cell": cell[keep]}
    for name, r in runs.items():
        ranked = [r["ranked"][i] for i in np.flatnonzero(keep)]
        out["results"][name] = figures(ranked, sim_all[pool][keep], r["loc"][keep], r["head"][keep], cell[keep])
        top = np.array([rows[0] if rows else -1 for rows in ranked], np.int64)
        answers |= {f"{name}/top1": top, f"{name}/loc_error": r["loc"][keep], f"{name}/heading_error": r["head"][keep]}
    # Per query, for paired comparisons of two fusions over the same fixes.
    atomic_write(path.with_suffix(".npz"), npz_bytes(**answers))
    path.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return path


def _fused(run: dict[str, Any], i: int, q: int, searcher: Searcher, query: Any, prior: Prior, dataset: Dataset) -> None:
    if query is None:  # the pipeline refuses the photo: no answer
        return
    hits, _ = searcher.rank_near(query, prior, K)
    run["ranked"][i] = [h.id for h in hits]
    est = estimate_location(
        hits, DEFAULT_UTM_EPSG, head=searcher.prior_location_head, heading_head=searcher.heading_head
    )
    if est.status == "estimated" and est.easting is not None and est.northing is not None:
        truth = dataset.queries.loc[q]
        run["loc"][i] = float(np.hypot(est.easting - truth[0], est.northing - truth[1]))
        run["head"][i] = float(heading_diff(float(est.heading or 0.0), float(truth[2])))


def _fix_alone(run: dict[str, Any], i: int, q: int, places: Places, prior: Prior, dataset: Dataset) -> None:
    ids, _ = places.within(prior.easting, prior.northing, prior.radius_m)
    run["ranked"][i] = ids[:K].tolist()
    truth = dataset.queries.loc[q]
    run["loc"][i] = float(np.hypot(prior.easting - truth[0], prior.northing - truth[1]))


def markdown(result: dict[str, Any]) -> str:
    """The figures of a cvprior-*.json as a table: each scenario, fused against the fix alone."""
    pct = ("recall@1", "recall@10", "precision@10", "localised_within_25m", "localisation_right")

    def cell(fig: dict[str, Any], key: str) -> str:
        v = fig.get(key)
        if v is None:
            return "–"
        iv = fig.get(f"{key}_interval")
        return f"{100 * v:.1f}" + (f" ({100 * iv[0]:.1f}–{100 * iv[1]:.1f})" if iv else "")

    n = next(iter(result["results"].values()))["n_queries"]
    lines = [
        f"{result['preset']}: {result['folds']}-fold area cross-validation, {n} queries with a relevant map image, "
        f"simulated fixes seed {result['seed']}; 95% intervals over cells",
        "",
        "| prior | ranking | R@1 | R@10 | P@10 | localised ≤25 m | estimates right | median error m "
        "| median heading error ° |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, fig in result["results"].items():
        scenario, method = name.split("/")
        cells = [cell(fig, k) for k in pct]
        extra = [str(fig.get("localisation_median_m") or "–"), str(fig.get("heading_median_deg") or "–")]
        lines.append(f"| {scenario} | {method} | " + " | ".join(cells + extra) + " |")
    return "\n".join(lines) + "\n"
