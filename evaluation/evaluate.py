"""Evaluate a Searcher on ground-truth queries, through the query path POST /search runs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from common.clock import utc_timestamp
from common.retrieval_metrics import accuracy_within_margin, average_precision, summarize
from dataset.layout import Dataset
from features.decode import ImageDecodeError
from features.orb import NoKeypointsError
from retrieval.query import search_image
from retrieval.searcher import Searcher

KS = (1, 5, 10, 20, 50)
MARGINS = (0.1, 0.05, 0.01)


@dataclass
class Evaluation:
    summary: dict[str, Any]  # JSON-ready figures
    ranked: np.ndarray  # (nq, k_max) map rows, -1 where nothing was returned
    ap: np.ndarray  # (nq,) average precision per query, NaN without a relevant map image
    latency_ms: np.ndarray  # (nq,) in-process time of each query, read + search


def localisation_summary(error_m: np.ndarray) -> dict[str, float | None]:
    """Median error of the answered queries, share answered, share of all queries within 25 m."""
    answered = ~np.isnan(error_m)
    return {
        "localisation_answered": float(answered.mean()) if len(error_m) else None,
        "localisation_median_m": float(np.median(error_m[answered])) if answered.any() else None,
        "localised_within_25m": float((error_m[answered] < 25.0).sum() / len(error_m)) if len(error_m) else None,
    }


def evaluate_searcher(
    searcher: Searcher, dataset: Dataset, query_rows: np.ndarray, split_name: str, k_max: int = 50
) -> Evaluation:
    """Rank every query with `search_image` (what POST /search runs) and score the rankings:
    P@k and R@k, mAP, nDCG@10 on fov, and the published accuracy within margin of the predicted
    score against fov over every (query, map image) pair. Queries the pipeline rejects (no
    keypoints) count as returning nothing."""
    if dataset.sim is None or dataset.fov is None:
        raise ValueError(f"{dataset.root}: evaluation needs ground truth")
    ndb = len(dataset.database)
    ranked = np.full((len(query_rows), k_max), -1, dtype=np.int64)
    all_scores = np.zeros((len(query_rows), ndb), dtype=np.float32)
    latency = np.zeros(len(query_rows))
    loc_error = np.full(len(query_rows), np.nan)  # metres; NaN where the answer was "unknown"
    rejected = 0
    for qi, q in enumerate(tqdm(query_rows, desc=f"evaluate {split_name}", unit="query", disable=None)):
        t0 = time.perf_counter()
        data = dataset.image_path(dataset.queries.paths[q]).read_bytes()
        try:
            # Location errors are in UTM metres, whatever the zone: the default zone will do.
            result = search_image(searcher, data, k_max)
        except (ImageDecodeError, NoKeypointsError):
            rejected += 1
            continue
        finally:
            latency[qi] = (time.perf_counter() - t0) * 1000
        ranked[qi, : len(result.hits)] = [h.id for h in result.hits]
        all_scores[qi] = searcher.score_all(result.query)
        est = result.location
        if est.status == "estimated":
            truth = dataset.queries.loc[q]
            loc_error[qi] = np.hypot(est.easting - truth[0], est.northing - truth[1])
    sim, fov = dataset.sim[query_rows], dataset.fov[query_rows]
    out: dict[str, Any] = {"split": split_name}
    out.update(summarize(ranked, sim, gains=fov, ks=KS))
    out["queries_total"] = len(query_rows)
    out["queries_rejected"] = rejected
    for m in MARGINS:
        out[f"accuracy_within_{m}"] = accuracy_within_margin(all_scores.ravel(), fov.ravel(), m)
    out.update(localisation_summary(loc_error))
    out["latency_ms_p50"] = round(float(np.median(latency)), 2) if len(latency) else None
    out["latency_ms_mean"] = round(float(latency.mean()), 2) if len(latency) else None
    out["computed_at"] = utc_timestamp()
    return Evaluation(out, ranked, average_precision(ranked, sim), latency)
