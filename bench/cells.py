#!/usr/bin/env python3
"""Fast-scan codes in coarse cells against a scan of every code, at a million entries.

    python bench/cells.py --data ../shared/datasets/london [--size 1000000] [--nlist 1024]
                          [--nprobe 32 64 128 256 512] [--queries 300]

The collection of bench/million.py (the London map embeddings, then generated ones with their
covariance), indexed as the served index is (indexer/kinds.py: PQIndex, the preset's m and rerank),
once with every code scanned (nlist 0) and once in --nlist cells; for each --nprobe, recall@10
against exact search for generated queries (new photos of generated places) and the p50 time of one
search as the service asks it (k = 200, the expansion pool; one query, one thread). Prints one JSON
line per row. This chooses the preset's `nlist`, so it reads no London query.
"""

from __future__ import annotations

import argparse
import json
import sys

import faiss
import numpy as np

# bench/ is sys.path[0] for these scripts
from ann import p50_ms, recall_at_k
from london import add_arguments, collection, open_london

from common.presets import get_conf
from indexer.kinds import PQIndex

SERVICE_K = 200  # what the service asks of the index: the expansion pool (common/presets.py: EXPAND)


def rows(index: PQIndex, xq: np.ndarray, truth: np.ndarray, nprobes: list[int]) -> list[dict[str, float]]:
    out = []
    cells = isinstance(index.codes, faiss.IndexIVFPQFastScan)
    for nprobe in nprobes if cells else [0]:
        if cells:
            index.codes.nprobe = nprobe
        found = np.stack([index.search(q[None, :], 10)[1][0] for q in xq])
        wall, _ = p50_ms(lambda x: index.search(x, SERVICE_K), xq, 100)  # one query, one thread
        row = {"nlist": int(index.codes.nlist) if cells else 0, "nprobe": nprobe}
        row |= {"recall_at_10": round(recall_at_k(found, truth), 4)}
        out.append(row | {"search_k200_p50_ms": round(wall, 2)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    p.add_argument("--queries", type=int, default=300, help="generated queries (default 300)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.size < 10_000 or args.nlist < 2 or min(args.nprobe) < 1 or args.queries < 10:
        p.error("--size >= 10000, --nlist >= 2, --nprobe >= 1, --queries >= 10")
    opened = open_london(args, "cells")
    if opened is None:
        return 2
    _, london = opened
    xb, gen = collection(london, args.size, 20, 1.0, args.seed)
    xq = gen.queries(args.queries)
    _, truth = faiss.knn(xq, xb, 10)
    conf = get_conf(args.preset)["index"]
    for nlist in (0, args.nlist):
        index = PQIndex.build(xb, np.arange(len(xb), dtype=np.int64), conf | {"nlist": nlist})
        for row in rows(index, xq, truth, sorted(n for n in args.nprobe if n <= nlist)):
            print(json.dumps(row), flush=True)
        del index
    return 0


if __name__ == "__main__":
    sys.exit(main())
