#!/usr/bin/env python3
"""Study: the in-process floor of one served preset under two versions of the code.

    git worktree add ../old <commit>
    PYTHONPATH=../old python bench/studies/floor_versions.py --artifacts OLD_ARTIFACTS --label old
    python bench/studies/floor_versions.py --artifacts NEW_ARTIFACTS --label new     # then again, in turns

bench/run.py --floor-baseline compares two presets within one process; a change of the code itself
cannot be loaded twice in one process, so this runs once per version (the version on PYTHONPATH), on
the same test-split photos, with one thread per library as the service runs, and prints one JSON line
(median ms of `search_image` over --repeats passes). Run the versions in turns, several times: only a
ratio of neighbouring runs on one machine means anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from common.pipeline import get_pipeline
from common.threads import single_threaded_kernels
from dataset.layout import load_dataset
from dataset.split import split_queries
from features.decode import ImageDecodeError
from features.orb import NoKeypointsError
from indexer import store
from retrieval.query import search_image, warm_up
from retrieval.searcher import Searcher


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the in-process floor of a served preset under this version of the code")
    p.add_argument("--data", type=Path, default=Path("../shared/datasets/london"))
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--preset", default="default")
    p.add_argument("--label", required=True)
    p.add_argument("--queries", type=int, default=150)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    try:
        ds = load_dataset(args.data, check_files=False)
        searcher = Searcher(store.load(store.current_version(store.index_family(args.artifacts, ds.root, args.preset))))
    except (OSError, ValueError) as e:
        print(f"floor_versions: {e}", file=sys.stderr)
        return 2
    single_threaded_kernels()
    warm_up(searcher)
    rows = split_queries(ds.queries.loc, get_pipeline(args.preset).split)["test"][: args.queries]
    images = [ds.image_path(ds.queries.paths[q]).read_bytes() for q in rows]
    ms = []
    for _ in range(args.repeats):
        for data in images:
            t0 = time.perf_counter()
            try:
                search_image(searcher, data, 10)
            except (ImageDecodeError, NoKeypointsError):
                continue
            ms.append((time.perf_counter() - t0) * 1000)
    out = {"label": args.label, "version": searcher.version, "queries": len(images), "median_ms": float(np.median(ms))}
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
