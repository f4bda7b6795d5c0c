#!/usr/bin/env python3
"""ANN benchmark: the served index against exact search and a graph index, on generated vectors shaped
like the served embeddings (part of `make bench`: bench/run.py runs it).

    python bench/ann.py --index-dir artifacts/<data>/index-<preset>/<v> [--preset P] [--sizes 100000 1000000]

The vectors have the dimension of the served index and the covariance of its real London map
embeddings: "places" are drawn from a Gaussian with that covariance, each vector is a place plus
`--spread` times more of the same noise (another photo of the place), L2-normalised like the
encoder's output; queries are new photos of random places. Seeded, so runs are reproducible.

For each size: exact search (IndexFlatL2, which also holds the one copy of the vectors); the index the
service builds above `exact_below` (indexer/kinds.py PQIndex with the preset's index conf: coarse
fast-scan codes find a shortlist, finer codes order it, the nearest are re-ranked exactly), over its
shortlist depth; and HNSW-Flat over efSearch. Each with its build time (train + add), the p50 time of
one query (batch of 1, one thread, as `imgsearch serve` runs FAISS) and recall@10 against exact
search. Records the `ann` section of bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss

# bench/ is sys.path[0] for these scripts
import harness
import numpy as np
import report

from common.pipeline import get_pipeline
from common.settings import Settings
from common.threads import single_threaded
from indexer.kinds import PQIndex

ROOT = Path(__file__).resolve().parents[1]
K = 10
CHUNK = 65536
PQ_LABEL = "pq-fastscan, two stages + exact re-rank (served)"


class Generator:
    """Clustered unit vectors with the covariance of real embeddings `real` (n_real, d)."""

    def __init__(self, real: np.ndarray, n_places: int, spread: float, seed: int) -> None:
        real = np.asarray(real, np.float64)
        self.mu = real.mean(0)
        _, s, vt = np.linalg.svd(real - self.mu, full_matrices=False)
        # x = mu + g @ L with g ~ N(0, I) has the sample covariance of `real`.
        self.L = ((s / math.sqrt(len(real) - 1))[:, None] * vt).astype(np.float32)
        self.spread, self.seed = spread, seed
        rng = np.random.default_rng([seed, 0])
        self.places = self._gauss(rng, n_places) + self.mu.astype(np.float32)

    @property
    def dim(self) -> int:
        return int(self.L.shape[1])

    def _gauss(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.standard_normal((n, self.L.shape[0]), dtype=np.float32) @ self.L

    def _photos(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = self.places[rng.integers(len(self.places), size=n)] + self.spread * self._gauss(rng, n)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return np.ascontiguousarray(x, dtype=np.float32)

    def database(self, n: int) -> Iterator[np.ndarray]:
        """n vectors in chunks, so only one full copy (the flat index's) is ever held."""
        for i, start in enumerate(range(0, n, CHUNK)):
            yield self._photos(np.random.default_rng([self.seed, 1, i]), min(CHUNK, n - start))

    def queries(self, n: int) -> np.ndarray:
        return self._photos(np.random.default_rng([self.seed, 2]), n)


def real_embeddings(index_dir: Path) -> np.ndarray:
    index = faiss.read_index(str(index_dir / "index.faiss"))
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return inner.reconstruct_n(0, inner.ntotal)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """ANN recall: the share of the exact top K found (not the retrieval figures of evaluation/)."""
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def p50_ms(search: Callable[[np.ndarray], Any], xq: np.ndarray, n: int) -> tuple[float, float]:
    """Median wall and CPU ms of one query (batch of 1) on one thread, as the service runs FAISS."""
    with single_threaded():
        t = harness.time_calls(lambda q: search(q[None, :]), xq[:n], warmup=1)
    return t.ms(50), t.cpu_ms(50)


def sweep(
    name: str,
    build_s: float,
    memory_mb: float,
    set_param: Callable[[int], None],
    values: list[int],
    param: str,
    search: Callable[[np.ndarray], Any],
    xq: np.ndarray,
    truth: np.ndarray,
    n_time: int,
    extra: dict[str, Any],
) -> list[dict[str, Any]]:
    rows = []
    for v in values:
        set_param(v)
        _, found = search(xq)  # all queries at once (all threads) for recall
        wall, cpu = p50_ms(search, xq, n_time)
        row = {
            "index": name,
            **extra,
            param: v,
            "build_s": round(build_s, 2),
            "memory_mb": round(memory_mb, 1),
            "p50_ms": wall,
            "p50_cpu_ms": cpu,
            "recall_at_10": round(recall_at_k(found, truth), 4),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        if row["recall_at_10"] >= 0.999 or (
            len(rows) >= 3 and rows[-1]["recall_at_10"] - rows[-3]["recall_at_10"] < 0.002
        ):
            break  # larger values only cost time
    return rows


def run_size(
    gen: Generator, n: int, nq: int, n_time: int, hnsw_max: int, seed: int, pq_conf: dict[str, Any]
) -> dict[str, Any]:
    d = gen.dim
    out: dict[str, Any] = {"n": n, "queries": nq, "indexes": []}
    rows = out["indexes"]

    t0 = time.perf_counter()
    flat = faiss.IndexFlatL2(d)
    for chunk in gen.database(n):
        flat.add(chunk)
    out["generate_and_add_s"] = round(time.perf_counter() - t0, 2)
    xb = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)  # a view: no second copy
    xq = gen.queries(nq)
    t0 = time.perf_counter()
    d2, truth = flat.search(xq, K)
    out["exact_batch_s"] = round(time.perf_counter() - t0, 2)
    # How clustered the generated data is, to compare with the real embeddings (real_structure).
    pairs = np.random.default_rng([seed, 4]).integers(n, size=(2, 2000))
    out["structure"] = {
        "nn1_d2_median": round(float(np.median(d2[:, 0])), 3),
        "nn10_d2_median": round(float(np.median(d2[:, -1])), 3),
        "random_pair_d2_median": round(float(np.median(((xb[pairs[0]] - xb[pairs[1]]) ** 2).sum(1))), 3),
    }
    # Exact search is slow at a million: fewer queries timed, enough for a median.
    wall, cpu = p50_ms(lambda q: flat.search(q, K), xq, max(5, min(n_time, 2 * 10**7 // n)))
    row = {"index": "Flat (exact)", "build_s": 0.0, "memory_mb": round(n * d * 4 / 2**20, 1)}
    rows.append(row | {"p50_ms": wall, "p50_cpu_ms": cpu, "recall_at_10": 1.0})
    print(json.dumps(rows[-1]), flush=True)

    # The service's own index above `exact_below` (indexer/kinds.py): two stages of PQ codes and an exact
    # re-rank, swept over the shortlist depth. Its memory is the codes': the float vectors stay on disk.
    t0 = time.perf_counter()
    pq = PQIndex.build(xb, np.arange(n, dtype=np.int64), pq_conf, seed)
    build = time.perf_counter() - t0
    layout = {k: getattr(pq_conf, k) for k in ("m", "coarse_m", "rerank")}

    def set_shortlist(v: int) -> None:
        pq.shortlist = v

    memory = n * (layout["m"] + layout["coarse_m"]) / 2 / 2**20
    rows.extend(
        sweep(PQ_LABEL, build, memory, set_shortlist, [50, 100, 200, 400, 800, 1600, 3200], "shortlist",
              lambda q: pq.search(q, K), xq, truth, n_time, layout)
    )  # fmt: skip

    if n <= hnsw_max:
        hnsw = faiss.IndexHNSWFlat(d, 32)
        hnsw.hnsw.efConstruction = 40
        t0 = time.perf_counter()
        for start in range(0, n, CHUNK):
            hnsw.add(xb[start : start + CHUNK])
        build = time.perf_counter() - t0

        def set_ef(v: int) -> None:
            hnsw.hnsw.efSearch = v

        rows.extend(
            sweep("HNSW32-Flat", build, n * (4 * d + 2 * 32 * 8) / 2**20, set_ef, [16, 32, 64, 128, 256, 512],
                  "efSearch", lambda q: hnsw.search(q, K), xq, truth, n_time, {"M": 32, "efConstruction": 40})
        )  # fmt: skip
        del hnsw
    else:
        out["hnsw_skipped"] = f"HNSW-Flat not built at n={n} (> --hnsw-max {hnsw_max}): see BENCHMARKS.md"
    best = [r for r in rows if r["recall_at_10"] >= 0.95]
    out["fastest_at_recall_0.95"] = min(best, key=lambda r: r["p50_ms"]) if best else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index-dir", type=Path, required=True, help="a served index version (its real embeddings)")
    p.add_argument("--preset", default=Settings().preset, help="whose index conf the served layout has")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=1000, help="queries for recall (default 1000)")
    p.add_argument("--timed", type=int, default=300, help="single queries timed for the p50 (default 300)")
    p.add_argument("--per-place", type=int, default=20, help="vectors per generated place (default 20)")
    p.add_argument("--spread", type=float, default=1.0, help="photo noise relative to the place spread")
    p.add_argument("--hnsw-max", type=int, default=1_000_000, help="largest size to build HNSW-Flat for")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=report.RESULTS)
    args = p.parse_args(argv)
    if min(args.sizes) < 1000 or args.queries < 10 or args.timed < 5 or args.per_place < 1 or args.spread <= 0:
        p.error("sizes >= 1000, queries >= 10, timed >= 5, per-place >= 1, spread > 0")
    ann = report.started("bench/ann.py", argv)
    try:
        real = real_embeddings(args.index_dir)
    except RuntimeError as e:  # FAISS raises RuntimeError for a missing or unreadable file
        print(f"ann: cannot read {args.index_dir / 'index.faiss'}: {e}", file=sys.stderr)
        return 2
    pq_conf = get_pipeline(args.preset).index
    d2, _ = faiss.knn(real, real, K + 1)  # itself first
    pairs = np.random.default_rng([args.seed, 4]).integers(len(real), size=(2, 2000))
    ann |= {
        "dim": int(real.shape[1]),
        "real_structure": {
            "nn1_d2_median": round(float(np.median(d2[:, 1])), 3),
            "nn10_d2_median": round(float(np.median(d2[:, -1])), 3),
            "random_pair_d2_median": round(float(np.median(((real[pairs[0]] - real[pairs[1]]) ** 2).sum(1))), 3),
        },
        "generator": {"real_embeddings": len(real), "per_place": args.per_place, "spread": args.spread}
        | {"seed": args.seed, "normalised": True},
        "threads_for_p50": 1,
        "sizes": {},
    }
    for n in args.sizes:
        gen = Generator(real, max(1, n // args.per_place), args.spread, args.seed)
        ann["sizes"][str(n)] = run_size(gen, n, args.queries, args.timed, args.hnsw_max, args.seed, pq_conf)
    report.record("ann", ann, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
