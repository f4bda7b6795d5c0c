#!/usr/bin/env python3
"""Study: how deep the coarse codes' shortlist of the served index must be, and how many of the fine
codes' nearest must be re-ranked exactly.

    python bench/million.py --data ../shared/datasets/london --keep --work /work/m1
    python bench/studies/shortlist.py --data ../shared/datasets/london --work /work/m1 \
        [--shortlist 500 800 1000] [--rerank 50 30]

Loads the served version that bench/million.py built and kept in --work (a `pq-fastscan` index:
indexer/kinds.py), and for each shortlist depth and exact re-rank count measures recall@10 against
exact search, for new photos of the generated places (the same generator and seed as
bench/million.py, so the same queries as its `recall_at_10`), and the p50 time of one search on one
thread for the nearest 10 and for the expansion pool of 200, every setting timed in turns. Prints one
JSON line per setting and records them as the `shortlist` section of bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the harness, london.py, the results writer
import harness
import report
from ann import recall_at_k
from london import add_arguments, add_kept_arguments, open_kept

from common.threads import single_threaded
from indexer.kinds import PQIndex

K = 10
POOL = 200  # the expansion pool the service asks for


def searches(index: PQIndex, settings: list[tuple[int, int]]) -> dict[str, Callable[[np.ndarray], object]]:
    """One search per (shortlist, rerank) setting and k, named "shortlist rerank k"."""

    def search(x: np.ndarray, shortlist: int, rerank: int, k: int) -> object:
        index.shortlist, index.rerank = shortlist, rerank
        return index.search(x[None, :], k)

    return {f"{s} {r} {k}": (lambda x, s=s, r=r, k=k: search(x, s, r, k)) for s, r in settings for k in (K, POOL)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    add_kept_arguments(p)
    p.add_argument("--shortlist", type=int, nargs="+", default=[500, 800, 1000])
    p.add_argument("--rerank", type=int, nargs="+", default=None, help="exact re-ranks (default: the version's)")
    p.add_argument("--queries", type=int, default=300, help="generated queries (default 300)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=report.RESULTS)
    args = p.parse_args(argv)
    if min(args.shortlist + (args.rerank or [1])) < 1 or args.queries < 1 or args.rounds < 1:
        p.error("--shortlist, --rerank, --queries and --rounds must be positive")
    started = report.started("bench/studies/shortlist.py", argv)
    kept = open_kept(args, "shortlist")
    if kept is None:
        return 2
    index, gen = kept[:2]
    xq = gen.queries(args.queries)
    xb = np.asarray(index.base)  # the float vectors in slot order (the whole file: exact search)
    _, rows = faiss.knn(xq, xb, K)
    truth = index.slot_ids[rows]
    settings = [(s, r) for s in args.shortlist for r in (args.rerank or [index.rerank])]
    calls = searches(index, settings)
    with single_threaded():  # one query on one thread, as `imgsearch serve` runs FAISS
        recall = {st: recall_at_k(np.concatenate([calls[f"{st[0]} {st[1]} {K}"](x)[1] for x in xq]), truth)
                  for st in settings}  # fmt: skip
        times = harness.in_turns(calls, xq, rounds=args.rounds)
    out = []
    for s, r in settings:
        row = {"shortlist": s, "rerank": r, "recall_at_10": round(recall[s, r], 4)}
        row |= {f"search_k{k}_p50_ms": times[f"{s} {r} {k}"].ms(50) for k in (K, POOL)}
        print(json.dumps(row), flush=True)
        out.append(row)
    report.record("shortlist", started | {"settings": out}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
