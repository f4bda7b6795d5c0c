"""Evaluate a Searcher on ground-truth queries, through the same code path as POST /search."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from tqdm import tqdm

from dataset.layout import Dataset
from evaluation.metrics import accuracy_within_margin, summarize
from features.decode import ImageDecodeError
from features.orb import NoKeypointsError
from pipeline.searcher import Searcher

KS = (5, 10, 20, 50)
MARGINS = (0.1, 0.05, 0.01)


def evaluate_searcher(
    searcher: Searcher, dataset: Dataset, query_rows: np.ndarray, split_name: str, k_max: int = 50
) -> dict[str, Any]:
    """P@k and R@k for k in KS, mAP, and the published accuracy within margin of the predicted
    score against fov over every (query, map image) pair. Queries the pipeline rejects (no
    keypoints) count as returning nothing."""
    if dataset.sim is None or dataset.fov is None:
        raise ValueError(f"{dataset.root}: evaluation needs ground truth")
    ndb = len(dataset.database)
    ranked = np.full((len(query_rows), k_max), -1, dtype=np.int64)
    all_scores = np.zeros((len(query_rows), ndb), dtype=np.float32)
    rejected = 0
    t0 = time.time()
    for qi, q in enumerate(tqdm(query_rows, desc=f"evaluate {split_name}", unit="query", disable=None)):
        try:
            emb = searcher.embed(dataset.image_path(dataset.queries.paths[q]).read_bytes())
        except (ImageDecodeError, NoKeypointsError):
            rejected += 1
            continue
        hits = searcher.search_embedding(emb, ndb)  # the full ranking: top k_max and every pair's score
        cols = np.array([h.id for h in hits], dtype=np.int64)
        ranked[qi, : min(k_max, len(cols))] = cols[:k_max]
        all_scores[qi, cols] = [h.score for h in hits]
    elapsed = time.time() - t0
    sim, fov = dataset.sim[query_rows], dataset.fov[query_rows]
    out: dict[str, Any] = {"split": split_name}
    out.update(summarize(ranked, sim, gains=fov, ks=KS))
    out["queries_total"] = len(query_rows)
    out["queries_rejected"] = rejected
    for m in MARGINS:
        out[f"accuracy_within_{m}"] = accuracy_within_margin(all_scores.ravel(), fov.ravel(), m)
    out["seconds_per_query"] = round(elapsed / max(1, len(query_rows)), 4)
    out["computed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return out
