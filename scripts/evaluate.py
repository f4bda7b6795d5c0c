#!/usr/bin/env python3
"""Post every query image of a data folder to /search and score the answers on the client side
against london_gt.h5: precision@k and recall@k (k = 5, 10, 20, 50).

    python scripts/evaluate.py --data ../shared/datasets/london --split test
    python scripts/evaluate.py --data DIR                      # every query of the folder

--split uses the train/val/test split saved with the served index (found under --artifacts for the
preset), so the figures can be compared with GET /metrics/precision.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from common.presets import DEFAULT_PRESET
from common.retrieval_metrics import summarize
from dataset.layout import DatasetError, load_dataset
from dataset.split import load_split
from evaluation.evaluate import localisation_summary

KS = (5, 10, 20, 50)


def split_rows(args: argparse.Namespace, query_paths: list[str]) -> np.ndarray:
    if args.split is None:
        return np.arange(len(query_paths))
    split_file = args.split_file
    if split_file is None:
        from indexer.store import current_version, index_family

        split_file = current_version(index_family(args.artifacts, args.data, args.preset)) / "split.json"
    return load_split(split_file, query_paths)[args.split]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env = os.environ
    p.add_argument("--data", type=Path, default=env.get("IMGSEARCH_DATA"), help="data folder (course layout)")
    p.add_argument("--split", choices=["train", "val", "test"], help="evaluate only this split's queries")
    p.add_argument("--split-file", type=Path, help="split.json to use (default: the served index's)")
    p.add_argument("--artifacts", type=Path, default=Path(env.get("IMGSEARCH_ARTIFACTS", "artifacts")))
    p.add_argument("--preset", default=env.get("IMGSEARCH_PRESET", DEFAULT_PRESET), help="served preset")
    default_url = f"http://{env.get('IMGSEARCH_HOST', '127.0.0.1')}:{env.get('IMGSEARCH_PORT', '8000')}"
    p.add_argument("--url", default=default_url)
    p.add_argument("--concurrency", type=int, default=2, help="requests in flight (default 2)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    if args.data is None:
        p.error("--data (or IMGSEARCH_DATA) is required")
    if args.concurrency < 1:
        p.error("--concurrency must be >= 1")
    try:
        ds = load_dataset(args.data, check_files=False)
        rows = split_rows(args, ds.queries.paths)
    except (DatasetError, OSError, ValueError) as e:
        print(f"evaluate.py: {e}", file=sys.stderr)
        return 2
    k_max = max(KS)
    ranked = np.full((len(rows), k_max), -1, dtype=np.int64)
    col = {path: j for j, path in enumerate(ds.database.paths)}
    rejected = 0
    loc_error = np.full(len(rows), np.nan)

    def one(client: httpx.Client, q: int) -> httpx.Response:
        with open(ds.image_path(ds.queries.paths[q]), "rb") as f:
            return client.post(f"{args.url}/search", params={"k": k_max}, files={"file": f})

    try:
        with httpx.Client(timeout=60) as client, ThreadPoolExecutor(args.concurrency) as pool:
            answers = pool.map(lambda q: one(client, q), rows)
            for i, r in enumerate(answers):
                if r.status_code == 422:
                    rejected += 1  # no keypoints: the query returns nothing
                    continue
                r.raise_for_status()
                body = r.json()
                paths = [h["path"] for h in body["results"]]
                ranked[i, : len(paths)] = [col[path] for path in paths]
                est = body["query_location"]
                if est["status"] == "estimated":
                    truth = ds.queries.loc[rows[i]]
                    loc_error[i] = np.hypot(est["easting"] - truth[0], est["northing"] - truth[1])
    except httpx.HTTPError as e:
        print(f"evaluate.py: request failed: {e}", file=sys.stderr)
        return 3
    figures = summarize(ranked, ds.sim[rows], gains=ds.fov[rows], ks=KS)
    figures |= {"split": args.split or "all", "queries_total": len(rows), "queries_rejected": rejected}
    figures |= localisation_summary(loc_error)
    if args.json:
        print(json.dumps(figures, indent=1))
        return 0
    print(f"{len(rows)} queries ({args.split or 'all'}), {figures['n_queries']} with a relevant map image")
    print("| k | precision@k | recall@k |\n|---|---|---|")
    for k in KS:
        print(f"| {k} | {figures[f'precision@{k}']:.4f} | {figures[f'recall@{k}']:.4f} |")
    med = figures["localisation_median_m"]
    print(
        f"location: answered {figures['localisation_answered']:.1%}, median error "
        f"{'–' if med is None else f'{med:.1f} m'}, within 25 m {figures['localised_within_25m']:.1%} of all queries"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
