#!/usr/bin/env python3
"""How deep the coarse codes' shortlist of a two-stage index must be, and how many of the fine codes'
nearest must be re-ranked exactly (issue 14).

    python bench/million.py --data ../shared/datasets/london --keep --work /work/m1
    python bench/shortlist.py --data ../shared/datasets/london --work /work/m1 \
        [--shortlist 500 800 1000] [--rerank 50 30]

Loads the served version that bench/million.py built and kept in --work (a `pq-fastscan` index with
fine codes: common/presets.py, index conf), and for each shortlist depth and exact re-rank count
measures recall@10 against exact search, for new photos of the generated places (the same generator
and seed as bench/million.py, so the same queries as its `recall_at_10`), and the p50 time of one
search on one thread for the nearest 10 and for the expansion pool of 200. Settings are measured in
turns (each `--rounds` times), so that a host whose speed drifts does not favour the first. Prints
one JSON line per setting.
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np

# bench/ is sys.path[0] for these scripts
from ann import recall_at_k
from london import add_arguments, add_kept_arguments, open_kept

K = 10


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    add_kept_arguments(p)
    p.add_argument("--shortlist", type=int, nargs="+", default=[500, 800, 1000])
    p.add_argument("--rerank", type=int, nargs="+", default=None, help="exact re-ranks (default: the version's)")
    p.add_argument("--queries", type=int, default=300, help="generated queries (default 300)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    if min(args.shortlist + (args.rerank or [1])) < 1 or args.queries < 1 or args.rounds < 1:
        p.error("--shortlist, --rerank, --queries and --rounds must be positive")
    kept = open_kept(args, "shortlist")
    if kept is None:
        return 2
    index, gen = kept[:2]
    xq = gen.queries(args.queries)
    xb = np.asarray(index.base)  # the float vectors in slot order (the whole file: exact search)
    _, rows = faiss.knn(xq, xb, K)
    truth = index.slot_ids[rows]
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # one query on one thread, as `imgsearch serve` runs FAISS
    settings = [(s, r) for s in args.shortlist for r in (args.rerank or [index.rerank])]
    times: dict[tuple[int, int], dict[int, list[float]]] = {s: {K: [], 200: []} for s in settings}
    recall: dict[tuple[int, int], float] = {}
    try:
        for _ in range(args.rounds):
            for depth in settings:
                index.shortlist, index.rerank = depth
                found = []
                for k in (K, 200):
                    for x in xq:
                        t0 = time.perf_counter()
                        hits = index.search(x[None, :], k)[1][0]
                        times[depth][k].append(time.perf_counter() - t0)
                        if k == K:
                            found.append(hits)
                recall[depth] = round(recall_at_k(np.array(found), truth), 4)
    finally:
        faiss.omp_set_num_threads(threads)
    for depth in settings:
        row = {"shortlist": depth[0], "rerank": depth[1], "recall_at_10": recall[depth]}
        row |= {f"search_k{k}_p50_ms": round(1000 * float(np.median(v)), 3) for k, v in times[depth].items()}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
