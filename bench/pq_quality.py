#!/usr/bin/env python3
"""What fast-scan PQ costs the London queries among generated distractors (issue 14).

    python bench/pq_quality.py --data ../shared/datasets/london [--size 1000000] [--split val]

The collection of bench/million.py (the London map embeddings, then generated ones with their
covariance), searched by the held-out London queries: the share of queries with a relevant map image
among the first 10 / 50 / 200 hits (hit@k, before verification), with exact search and with
fast-scan PQ codes of m x 4 bits for several m, each shortlist of `depth` re-ranked exactly; and the
p50 time of one codes search on one thread. Prints one JSON line per row. Validation queries by
default: this chooses an index setting, so the test queries stay untouched.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import faiss
import numpy as np

# bench/ is sys.path[0] for these scripts
from london import add_arguments, analysed_queries, collection, hit_rate, open_london

from retrieval.searcher import Searcher


def hit_at(found: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Share of queries with a relevant map image among their first k ids."""
    return hit_rate(found[:, :k], relevant)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--m", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--depth", type=int, nargs="+", default=[200, 500])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.size < 10_000 or min(args.m) < 1 or min(args.depth) < 200:
        p.error("--size >= 10000, --m >= 1, --depth >= 200")
    opened = open_london(args, "pq_quality")
    if opened is None:
        return 2
    ds, london = opened
    rows, _, queries = analysed_queries(Searcher(london), ds, args.split)
    xq_a, relevant = np.stack([q.embedding[0] for q in queries]), np.asarray(ds.sim[rows], bool)
    xb, _ = collection(london, args.size, 20, 1.0, args.seed)
    real = xb[: len(london.images)]
    _, alone = faiss.knn(xq_a, real, 200)
    print(
        json.dumps(
            {"index": f"exact, {len(real)} London map images alone"}
            | {f"hit@{k}": hit_at(alone, relevant, k) for k in (10, 50, 200)}
        ),
        flush=True,
    )
    _, truth = faiss.knn(xq_a, xb, 200)
    print(
        json.dumps(
            {"index": f"exact, {args.size:,} entries"} | {f"hit@{k}": hit_at(truth, relevant, k) for k in (10, 50, 200)}
        ),
        flush=True,
    )
    sample = xb[np.sort(np.random.default_rng(args.seed).choice(len(xb), min(len(xb), 65_536), replace=False))]
    faiss.omp_set_num_threads(1)
    for m in args.m:
        codes = faiss.IndexPQFastScan(xb.shape[1], m, 4)
        codes.train(sample)
        codes.add(xb)
        for depth in args.depth:
            _, cand = codes.search(xq_a, depth)
            found = np.array([c[np.argsort(((xb[c] - q) ** 2).sum(1))[:200]] for c, q in zip(cand, xq_a, strict=True)])
            times = []
            for q in xq_a[:30]:
                t0 = time.perf_counter()
                codes.search(q[None, :], depth)
                times.append(time.perf_counter() - t0)
            row = {"index": f"PQ{m}x4 fast-scan, top {depth} re-ranked", "bytes_per_vector": m // 2}
            row |= {f"hit@{k}": hit_at(found, relevant, k) for k in (10, 50, 200)}
            row["codes_p50_ms"] = round(1000 * float(np.median(times)), 2)
            print(json.dumps(row), flush=True)
        del codes
    return 0


if __name__ == "__main__":
    sys.exit(main())
