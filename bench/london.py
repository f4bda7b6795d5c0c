"""What the benchmark scripts share: the London index they measure, its test-split queries analysed
by it and their figures (evaluation/evaluate.py's, as every evaluation prints them), and the
generated collection of a million map entries around its embeddings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# bench/ is sys.path[0] for these scripts
from ann import Generator

from common.pipeline import ALL_PRESETS
from common.settings import Settings
from dataset.layout import Dataset, DatasetError, load_dataset
from dataset.split import split_queries
from evaluation.evaluate import IN_PROCESS, summary
from features.decode import ImageDecodeError
from features.orb import NoKeypointsError
from indexer import store
from indexer.kinds import PQIndex
from retrieval.searcher import Query, Searcher

ROOT = Path(__file__).resolve().parents[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--data, --artifacts, --preset: which built London index a script measures."""
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "london")
    p.add_argument("--artifacts", type=Path, default=Settings().artifacts, help="default: IMGSEARCH_ARTIFACTS")
    p.add_argument("--preset", choices=sorted(ALL_PRESETS), default=Settings().preset)


def open_london(args: argparse.Namespace, prog: str) -> tuple[Dataset, store.LoadedIndex] | None:
    """The data set and the served version of its index; None, with the reason on stderr, when
    either is missing or unreadable (the caller exits 2)."""
    try:
        ds = load_dataset(args.data, check_files=False)
        family = store.index_family(args.artifacts, args.data, args.preset)
        return ds, store.load(store.current_version(family))
    except (DatasetError, OSError, ValueError) as e:
        print(f"{prog}: {e} (build the London index first: imgsearch build)", file=sys.stderr)
        return None


def analysed_queries(
    searcher: Searcher, ds: Dataset, split: str, limit: int | None = None
) -> tuple[list[int], list[Path], list[Query]]:
    """The queries of `split` (dataset/split.py; the first `limit`) that the searcher can analyse:
    their rows in the ground truth, their files and their features and embeddings."""
    rows, files, queries = [], [], []
    for q in split_queries(ds.queries.loc, searcher.pipeline.split)[split][:limit]:
        f = ds.image_path(ds.queries.paths[q])
        try:
            queries.append(searcher.analyze(f.read_bytes()))
        except (ImageDecodeError, NoKeypointsError):
            continue
        rows.append(q)
        files.append(f)
    return rows, files, queries


def collection(
    london: store.LoadedIndex, size: int, per_place: int, spread: float, seed: int
) -> tuple[np.ndarray, Generator]:
    """(size, d) vectors: the London map images' embeddings as ids 0..n-1, then generated ones with
    their covariance (bench/ann.py's Generator: places, and photos of each place); and the generator,
    whose queries are new photos of the generated places."""
    ids, real = store.index_contents(london.index)
    order = np.argsort(ids)
    ids, real = ids[order], real[order]
    if not np.array_equal(ids, np.arange(len(ids))) or size <= len(ids):
        raise ValueError(f"need a served version with ids 0..n-1 and a size above its {len(ids)} images")
    gen = Generator(real, max(1, (size - len(ids)) // per_place), spread, seed)
    xb = np.empty((size, real.shape[1]), np.float32)
    xb[: len(ids)] = real
    row = len(ids)
    for chunk in gen.database(size - len(ids)):
        xb[row : row + len(chunk)] = chunk
        row += len(chunk)
    return xb, gen


def recall_at(found: np.ndarray, ds: Dataset, rows: list[int], k: int = 10) -> float:
    """recall@k of the London queries `rows` from their ranked ids (found: (nq, >= k)), in the sense of
    every evaluation (GET /metrics/precision's): the share of the queries with a relevant map image that
    have one in their first k. Generated entries (ids past the London map images) are relevant to none."""
    ranked = np.where((found >= 0) & (found < len(ds.database)), found, -1)[:, :k]
    return round(summary(ranked, ds, np.asarray(rows), "test", ranked_by=IN_PROCESS)[f"recall@{k}"], 4)


def add_kept_arguments(p: argparse.ArgumentParser) -> None:
    """--work and the generator's settings of a collection that bench/million.py --keep left."""
    p.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench-1m", help="bench/million.py's --work")
    p.add_argument("--per-place", type=int, default=20, help="as bench/million.py's (default 20)")
    p.add_argument("--spread", type=float, default=1.0, help="as bench/million.py's (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="as bench/million.py's (default 0)")


def open_kept(args: argparse.Namespace, prog: str) -> tuple[PQIndex, Generator, Dataset, store.LoadedIndex] | None:
    """The two-stage index of the collection bench/million.py kept in --work, the generator of its
    entries (the same seed, so its queries are bench/million.py's), and the London data set and index
    (open_london); None, with the reason on stderr, when there is none (the caller exits 2)."""
    opened = open_london(args, prog)
    if opened is None:
        return None
    families = sorted((args.work / "artifacts").glob("*/index-*"))
    if not families:
        print(f"{prog}: no collection kept in {args.work}: run bench/million.py --keep first", file=sys.stderr)
        return None
    try:
        index = store.load(store.current_version(families[0])).index
    except (OSError, ValueError) as e:
        print(f"{prog}: {families[0]}: {e}", file=sys.stderr)
        return None
    if not isinstance(index, PQIndex):
        print(f"{prog}: the index in {args.work} is not a pq-fastscan index", file=sys.stderr)
        return None
    ids, real = store.index_contents(opened[1].index)
    real = real[np.argsort(ids)]
    gen = Generator(real, max(1, (index.ntotal - len(real)) // args.per_place), args.spread, args.seed)
    return index, gen, *opened
