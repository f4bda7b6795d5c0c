#!/usr/bin/env python3
"""Study: rows read on demand when the page cache no longer holds them (common/files.py read_rows).

    python bench/studies/cold_rows.py [--file F.npz [--member vectors]] [--rows 131072] [--per-query 30]
                                      [--queries 150]

A query of a large index reads a few rows of files that stay on disk (the exact re-rank's float
vectors, the verification keypoints). Hosts that reclaim idle page cache (DAMON pages out what went
unread for a minute) leave most of those rows cold. This reads rows of --file (a 2-D member of an
uncompressed .npz, e.g. the vectors.npz that `bench/million.py --keep` leaves), or of a file of --rows
rows of 1,024 float32 (4 KB, as the re-rank's vectors) that it writes into a temporary folder under
--dir (just written, its "cold" rows may still sit in the virtual machine host's own cache: an older
file shows the disk). For each of --queries it draws --per-query random rows, drops them and their
neighbourhood (64 pages) from the page cache (POSIX_FADV_DONTNEED), and times, in turns:
- `read_rows`, the service's reader (the page cache first, the missing rows asked of the disk
  together, no read-ahead past a row, through the descriptor opened with the mapping);
- `read_rows, descriptor per call`: the same, the file opened, advised and closed for each call;
- `one-at-a-time`: one blocking pread per row, with the kernel's read-ahead;
each cold, then again at once (warm). Prints one JSON line per reader (p50 / p90 ms) and records
them as the `cold_rows` section of bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the harness and the results writer
import harness
import report

from common.files import atomic_savez, mapped_npz, read_rows

DIM = 1024
NEIGHBOURHOOD = 64  # pages dropped around each row: reclaim takes whole regions, not single pages
Reader = Callable[[np.ndarray, np.ndarray], np.ndarray]


def one_at_a_time(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One blocking pread per row, in row order (the kernel's read-ahead on)."""
    out = np.empty((len(rows), a.shape[1]), a.dtype)
    size = out[0].nbytes
    fd = os.open(a.filename, os.O_RDONLY)
    try:
        for j, r in enumerate(rows.tolist()):
            if os.preadv(fd, [memoryview(out[j]).cast("B")], a.offset + r * size) != size:
                raise OSError(f"{a.filename}: short read")
    finally:
        os.close(fd)
    return out


def per_call(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """read_rows on the same file mapped anew: it opens, advises and closes it for each call (as it
    does for an array that mapped_npz did not map)."""
    alone = np.memmap(a.filename, dtype=a.dtype, mode="r", offset=a.offset, shape=a.shape)
    return read_rows(alone, rows, rows + 1)


READERS: dict[str, Reader] = {
    "read_rows": lambda a, r: read_rows(a, r, r + 1),
    "read_rows, descriptor per call": per_call,
    "one-at-a-time": one_at_a_time,
}


def measure(
    a: np.ndarray, data: np.ndarray | None, args: argparse.Namespace, rng: np.random.Generator
) -> dict[str, dict[str, harness.Samples]]:
    """Each reader on the same kind of cold rows of `a`, in turns, then at once warm; checked against
    `data` (or, for a file of unknown contents, the plain reader). `a` is never read through its
    mapping: mapped pages cannot be dropped."""
    row = a[0].nbytes
    times = {name: {"cold": harness.Samples(), "warm": harness.Samples()} for name in READERS}
    fd = os.open(a.filename, os.O_RDONLY)
    try:
        for q in range(args.queries):
            for name in harness.rotated(list(READERS), q):
                rows = np.sort(rng.choice(len(a) - NEIGHBOURHOOD, args.per_query, replace=False))
                for r in rows.tolist():
                    os.posix_fadvise(fd, a.offset + r * row, NEIGHBOURHOOD * 4096, os.POSIX_FADV_DONTNEED)
                for state in ("cold", "warm"):
                    wall, cpu, got = harness.clock(lambda r, name=name: READERS[name](a, r), rows)
                    times[name][state].add(wall, cpu)
                if not np.array_equal(got, one_at_a_time(a, rows) if data is None else data[rows]):
                    raise AssertionError(f"{name} read other bytes than the file holds")
    finally:
        os.close(fd)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", type=Path, default=None, help="an existing .npz to read rows of (default: write one)")
    p.add_argument("--member", default="vectors", help="its 2-D member (default vectors)")
    p.add_argument("--rows", type=int, default=131_072, help="rows of the file (default 131,072: 512 MB)")
    p.add_argument("--per-query", type=int, default=30, help="rows a query reads (default 30, the re-rank's)")
    p.add_argument("--queries", type=int, default=150)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the file is written")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=report.RESULTS)
    args = p.parse_args(argv)
    if args.rows < 2 * NEIGHBOURHOOD or not 1 <= args.per_query <= args.rows // NEIGHBOURHOOD or args.queries < 1:
        p.error(f"--rows >= {2 * NEIGHBOURHOOD}, 1 <= --per-query <= rows / {NEIGHBOURHOOD}, --queries >= 1")
    if not hasattr(os, "POSIX_FADV_DONTNEED"):
        print("cold_rows: this system cannot drop pages from the cache (posix_fadvise)", file=sys.stderr)
        return 2
    started = report.started("bench/studies/cold_rows.py", argv)
    rng = np.random.default_rng(args.seed)
    if args.file is not None:
        try:
            a = mapped_npz(args.file)[args.member]
        except (OSError, ValueError, KeyError) as e:
            print(f"cold_rows: {args.file}: {e!r}", file=sys.stderr)
            return 2
        least = NEIGHBOURHOOD + max(NEIGHBOURHOOD, args.per_query)  # the rows are drawn clear of its end
        if not isinstance(a, np.memmap) or a.ndim != 2 or len(a) < least:
            print(f"cold_rows: {args.file}: {args.member} is not a stored 2-D array of {least}+ rows", file=sys.stderr)
            return 2
        times = measure(a, None, args, rng)
    else:
        try:
            tmp = tempfile.TemporaryDirectory(dir=args.dir, prefix="cold-rows-")
        except OSError as e:
            print(f"cold_rows: {args.dir}: {e}", file=sys.stderr)
            return 2
        with tmp as folder:
            path = Path(folder) / "vectors.npz"
            data = rng.standard_normal((args.rows, DIM), dtype=np.float32)  # to check the reads against
            # durable: written back, so that its pages can be dropped from the cache (dirty ones cannot)
            atomic_savez(path, durable=True, vectors=data)
            times = measure(mapped_npz(path)["vectors"], data, args, rng)
    out = []
    for name, t in times.items():
        row: dict[str, object] = {"reader": name, "rows_per_query": args.per_query, "queries": args.queries}
        for state, samples in t.items():
            row |= {f"{state}_{k}": v for k, v in samples.summary((50, 90)).items() if k != "n" and k != "max_ms"}
        print(json.dumps(row), flush=True)
        out.append(row)
    report.record("cold_rows", started | {"readers": out}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
