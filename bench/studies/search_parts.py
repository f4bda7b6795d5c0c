#!/usr/bin/env python3
"""Study: where a million-entry search goes, and what the coarse codes' block size saves.

    python bench/million.py --data ../shared/datasets/london --keep --work /work/m1
    python bench/studies/search_parts.py --data ../shared/datasets/london --work /work/m1 \
        [--queries-from london|generated] [--queries 200] [--rounds 3]

Loads the index that bench/million.py built and kept in --work and times, on one thread, for the
London held-out test queries (default) or new photos of the generated places (bench/million.py's
generator and seed), each part of a search as the service asks it (the expansion pool of 200):
- `coarse`: the scan of every coarse code for the shortlist, in FAISS fast-scan blocks of 64 codes
  (the served index) and of 32 (FAISS's default: a copy of the same codes);
- `two code stages`: the coarse scan, then the fine codes' order of its shortlist (IndexRefine);
- `search`: the whole index.search of the service (the two code stages, then the exact re-rank of
  the fine codes' nearest, whose float vectors are read from disk).
Parts are timed in turns, each call after a 64 MB stream through the caches (as the encode stage
leaves them before a search), `--rounds` times. Prints one JSON line per part and setting (p50 / p90
ms) and records them as the `search_parts` section of bench/results.json.
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
from london import add_arguments, add_kept_arguments, analysed_queries, open_kept

from common.threads import single_threaded
from indexer.kinds import PQIndex
from retrieval.searcher import Searcher

POOL = 200  # the expansion pool the service asks for (verify conf: expand pool)


def blocks_of(index: PQIndex, bbs: int) -> faiss.IndexPQFastScan:
    """The index's coarse codes in fast-scan blocks of `bbs` codes (the same codebooks and codes)."""
    out = faiss.IndexPQFastScan(index.d, index.codes.pq.M, 4, faiss.METRIC_L2, bbs)
    out.pq = index.codes.pq
    out.is_trained = True
    for start in range(0, len(index.base), 65536):
        out.add(np.ascontiguousarray(index.base[start : start + 65536]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    add_kept_arguments(p)
    p.add_argument("--queries-from", choices=["london", "generated"], default="london")
    p.add_argument("--queries", type=int, default=200, help="queries, at most (default 200)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=report.RESULTS)
    args = p.parse_args(argv)
    if args.queries < 1 or args.rounds < 1:
        p.error("--queries and --rounds must be positive")
    started = report.started("bench/studies/search_parts.py", argv)
    kept = open_kept(args, "search_parts")
    if kept is None:
        return 2
    index, gen, ds, london = kept
    if args.queries_from == "generated":
        xq = gen.queries(args.queries)
    else:
        queries = analysed_queries(Searcher(london), ds, "test", args.queries)[2]
        xq = np.concatenate([q.embedding for q in queries])
    deep = index.shortlist
    other_bbs = 32 if index.codes.bbs != 32 else 64
    other = blocks_of(index, other_bbs)
    params = faiss.IndexRefineSearchParameters(k_factor=(deep + 0.5) / POOL)  # the coarse codes' nearest `deep`
    parts: dict[str, Callable[[np.ndarray], object]] = {
        f"coarse: blocks of {index.codes.bbs} (served)": lambda x: index.codes.search(x[None, :], deep),
        f"coarse: blocks of {other_bbs}": lambda x: other.search(x[None, :], deep),
        "two code stages: IndexRefine (served)": lambda x: index.refine.search(x[None, :], POOL, params=params),
        "search: index.search (served)": lambda x: index.search(x[None, :], POOL),
    }
    junk = np.ones(16 << 20, np.float32)  # 64 MB

    def evict(x: np.ndarray) -> np.ndarray:
        junk.sum()
        return x

    with single_threaded():  # one query on one thread, as `imgsearch serve` runs FAISS
        times = harness.in_turns(parts, xq, rounds=args.rounds, prepare=evict)
    out = []
    for name, t in times.items():
        part, setting = name.split(": ", 1)
        row = {"part": part, "setting": setting, "shortlist": deep, "queries": f"{len(xq)} {args.queries_from}"}
        row |= {"rounds": args.rounds, "p50_ms": t.ms(50), "p90_ms": t.ms(90)}
        print(json.dumps(row), flush=True)
        out.append(row)
    report.record("search_parts", started | {"parts": out}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
