"""The one evaluation: rank ground-truth queries, then score the rankings in one summary.

Every figure of retrieval quality is a key of `summary` (common/retrieval_metrics.py underneath), so
that it means the same wherever it is printed:
- in process, each fold of the area cross-validation (evaluation/cv.py), pooled into the figures an
  index is published with (GET /metrics/precision serves them) and that `imgsearch evaluate` compares;
- with `imgsearch evaluate --url`, a running service's answers to POST /search, scored here
  (scripts/client_evaluate.py is that, with its defaults);
- the benchmarks' London figures (bench/million.py), from rankings of their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from common.clock import utc_timestamp
from common.retrieval_metrics import accuracy_within_margin, average_precision, summarize
from dataset.layout import Dataset
from dataset.split import load_split

KS = (1, 5, 10, 20, 50)
MARGINS = (0.1, 0.05, 0.01)
IN_PROCESS, HTTP = "in-process", "POST /search"  # how the rankings were made (`ranked_by`)


@dataclass(frozen=True)
class Answer:
    """One query's answer: map rows, best first (-1: an entry that is no map image of the data set),
    the estimated location (easting, northing; None: unknown), and in process what scores every map
    image (called after the query is timed: the service does not compute it)."""

    rows: list[int]
    location: tuple[float, float] | None
    score_all: Callable[[], np.ndarray] | None = None


Ranker = Callable[[int], Answer | None]  # a query's row -> its answer; None: the photo was refused


@dataclass
class Evaluation:
    summary: dict[str, Any]  # JSON-ready figures
    ranked: np.ndarray  # (nq, k_max) map rows, -1 where nothing was returned
    ap: np.ndarray  # (nq,) average precision per query, NaN without a relevant map image
    latency_ms: np.ndarray  # (nq,) time of each query's answer
    loc_error: np.ndarray  # (nq,) metres from the estimated location to the truth, NaN where unknown
    scores: np.ndarray | None = None  # (nq, n_map) every map image's score, when `scored`


LOCALISATION = ("localisation_answered", "localisation_median_m", "localised_within_25m")


def localisation_summary(error_m: np.ndarray) -> dict[str, float | None]:
    """Median error of the answered queries, share answered, share of all queries within 25 m."""
    answered = ~np.isnan(error_m)
    return {
        "localisation_answered": float(answered.mean()) if len(error_m) else None,
        "localisation_median_m": float(np.median(error_m[answered])) if answered.any() else None,
        "localised_within_25m": float((error_m[answered] < 25.0).sum() / len(error_m)) if len(error_m) else None,
    }


def summary(
    ranked: np.ndarray,
    dataset: Dataset,
    query_rows: np.ndarray,
    split_name: str,
    *,
    ranked_by: str,
    rejected: int = 0,
    scores: np.ndarray | None = None,
    loc_error: np.ndarray | None = None,
    latency_ms: np.ndarray | None = None,
) -> dict[str, Any]:
    """The figures of rankings of these queries (ranked: (nq, k) map rows, -1 for none): P@k and R@k,
    mAP, nDCG@10 on fov; the accuracy within margin of the predicted scores (nq, n_map) against fov
    over every (query, map image) pair; localisation; latency. What a caller could not measure is None,
    so every evaluation has the same keys."""
    if dataset.sim is None or dataset.fov is None:
        raise ValueError(f"{dataset.root}: evaluation needs ground truth")
    sim, fov = dataset.sim[query_rows], dataset.fov[query_rows]
    out: dict[str, Any] = {"split": split_name, "ranked_by": ranked_by}
    out |= summarize(ranked, sim, gains=fov, ks=KS)
    out |= {"queries_total": len(query_rows), "queries_rejected": rejected}
    for m in MARGINS:
        out[f"accuracy_within_{m}"] = None if scores is None else accuracy_within_margin(scores.ravel(), fov.ravel(), m)
    out |= localisation_summary(loc_error) if loc_error is not None else dict.fromkeys(LOCALISATION)
    if latency_ms is not None and len(latency_ms) > 0:
        out["latency_ms_p50"] = round(float(np.median(latency_ms)), 2)
        out["latency_ms_mean"] = round(float(np.mean(latency_ms)), 2)
    else:
        out["latency_ms_p50"] = None
        out["latency_ms_mean"] = None
    out["computed_at"] = utc_timestamp()
    return out


def evaluate(
    rank: Ranker,
    dataset: Dataset,
    query_rows: np.ndarray,
    split_name: str,
    *,
    ranked_by: str,
    k_max: int = max(KS),
    scored: bool = False,
    concurrency: int = 1,
) -> Evaluation:
    """Every query through `rank` (timed), then the summary. `scored`: the answers carry every map
    image's score. With concurrency 1 the queries run one at a time in this thread (whose kernel
    threads the caller may have set); above, from a pool of that many threads (a client of a service)."""
    if dataset.sim is None:
        raise ValueError(f"{dataset.root}: evaluation needs ground truth")
    nq = len(query_rows)
    ranked = np.full((nq, k_max), -1, dtype=np.int64)
    scores = np.zeros((nq, len(dataset.database)), dtype=np.float32) if scored else None
    latency = np.zeros(nq)
    loc_error = np.full(nq, np.nan)  # metres; NaN where the answer was "unknown"
    rejected = 0

    def timed(q: int) -> tuple[Answer | None, float]:
        t0 = time.perf_counter()
        answer = rank(int(q))
        return answer, (time.perf_counter() - t0) * 1000

    def answers() -> Iterator[tuple[Answer | None, float]]:
        if concurrency == 1:
            yield from map(timed, query_rows)
            return
        with ThreadPoolExecutor(concurrency) as pool:
            yield from pool.map(timed, query_rows)

    bar = tqdm(answers(), total=nq, desc=f"evaluate {split_name}", unit="query", disable=None)
    for qi, (answer, ms) in enumerate(bar):
        latency[qi] = ms
        if answer is None:
            rejected += 1
            continue
        rows = _map_rows(answer.rows[:k_max], len(dataset.database))
        ranked[qi, : len(rows)] = rows
        if scores is not None and answer.score_all is not None:
            scores[qi] = answer.score_all()
        if answer.location is not None:
            truth = dataset.queries.loc[query_rows[qi]]
            loc_error[qi] = np.hypot(answer.location[0] - truth[0], answer.location[1] - truth[1])
    out = summary(
        ranked, dataset, query_rows, split_name, ranked_by=ranked_by, rejected=rejected, scores=scores,
        loc_error=loc_error, latency_ms=latency,
    )  # fmt: skip
    return Evaluation(out, ranked, average_precision(ranked, dataset.sim[query_rows]), latency, loc_error, scores)


def _map_rows(rows: list[int], n_map: int) -> list[int]:
    """The rows in place, -1 for one that is no map row or repeats an earlier one (it would count twice)."""
    seen: set[int] = set()
    out = []
    for r in rows:
        out.append(r if 0 <= r < n_map and r not in seen else -1)
        seen.add(r)
    return out


def service_ranker(client: httpx.Client, url: str, dataset: Dataset, k_max: int) -> Ranker:
    """POST /search of a running service; its hits are mapped to map rows by path (an image added
    online is no map image of the data set: -1). A 422 (no keypoints) is a refused photo."""
    row_of = {p: j for j, p in enumerate(dataset.database.paths)}

    def rank(q: int) -> Answer | None:
        with open(dataset.image_path(dataset.queries.paths[q]), "rb") as f:
            r = client.post(f"{url}/search", params={"k": k_max}, files={"file": f})
        if r.status_code == 422:
            return None
        r.raise_for_status()
        body = r.json()
        est = body["query_location"]
        where = (est["easting"], est["northing"]) if est["status"] == "estimated" else None
        return Answer([row_of.get(h["path"], -1) for h in body["results"]], where)

    return rank


def evaluate_service(
    url: str, dataset: Dataset, query_rows: np.ndarray, split_name: str, concurrency: int = 2, k_max: int = max(KS)
) -> Evaluation:
    """The queries sent to the service at `url` (POST /search, `concurrency` in flight), its answers
    scored here. Latency is each request's round trip, queueing included. Raises httpx.HTTPError."""
    with httpx.Client(timeout=60) as client:
        rank = service_ranker(client, url.rstrip("/"), dataset, k_max)
        return evaluate(rank, dataset, query_rows, split_name, ranked_by=HTTP, k_max=k_max, concurrency=concurrency)


def held_out_rows(dataset: Dataset, split_name: str, split_file: Path | None) -> np.ndarray:
    """The query rows of a split saved with an index (split.json), or "all": every query."""
    if split_name == "all":
        return np.arange(len(dataset.queries))
    if split_file is None:
        raise ValueError(f"split {split_name!r} needs the index's split.json")
    return load_split(split_file, dataset.queries.paths)[split_name]
