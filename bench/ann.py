#!/usr/bin/env python3
"""ANN benchmark: FAISS index choices on generated vectors shaped like the served embeddings.

    python bench/ann.py [--sizes 100000 1000000] [--index-dir artifacts/<data>/index-<preset>/<v>]

The vectors have the dimension of the served index (its manifest) and the covariance of its real
London map embeddings: "places" are drawn from a Gaussian with that covariance, each vector is a
place plus `--spread` times more of the same noise (another photo of the place), L2-normalised like
the encoder's output; queries are new photos of random places. Seeded, so runs are reproducible.

For each size: exact search (IndexFlatL2, which also holds the one copy of the vectors), IVF-Flat
(nlist ~ 4 sqrt(n), exact coarse quantizer), IVF-SQ8 (4x smaller), IVF-PQ (64 bytes a vector) re-ranked
exactly, a fast-scan PQ of the whole collection (4-bit codes scanned in SIMD registers, 16 or 32 bytes
a vector) re-ranked exactly, and HNSW-Flat; each with its build time (train + add), the p50 time of
one query (batch of 1, one thread, as `imgsearch serve` runs FAISS) and recall@10 against exact
search, over a sweep of its search parameter. Writes the `ann` field of bench/results.json (other
fields are kept).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from common.clock import utc_timestamp

ROOT = Path(__file__).resolve().parents[1]
K = 10
CHUNK = 65536


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
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def p50_ms(search: Callable[[np.ndarray], Any], xq: np.ndarray, n: int) -> tuple[float, float]:
    """Median wall time and median CPU time of one query (batch of 1) on one thread, as the service
    runs FAISS. The search runs in the calling thread, so its CPU time is the work itself, which other
    jobs on a shared machine stretch far less than the wall time."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        search(xq[:1])  # first call touches lazily allocated buffers
        wall, cpu = [], []
        for q in xq[:n]:
            t0, c0 = time.perf_counter(), time.thread_time()
            search(q[None, :])
            wall.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
    finally:
        faiss.omp_set_num_threads(threads)
    return round(1000 * float(np.median(wall)), 3), round(1000 * float(np.median(cpu)), 3)


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


def train_sample(xb: np.ndarray, n: int, seed: int) -> np.ndarray:
    rows = np.sort(np.random.default_rng([seed, 3]).choice(len(xb), size=min(n, len(xb)), replace=False))
    return np.ascontiguousarray(xb[rows])


def run_size(gen: Generator, n: int, nq: int, n_time: int, hnsw_max: int, seed: int) -> dict[str, Any]:
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
    wall, cpu = p50_ms(lambda q: flat.search(q, K), xq, max(5, min(n_time, 2 * 10**7 // n)))
    rows.append(
        {
            "index": "Flat (exact)",
            "build_s": 0.0,
            "memory_mb": round(n * d * 4 / 2**20, 1),
            "p50_ms": wall,
            "p50_cpu_ms": cpu,
            "recall_at_10": 1.0,
        }
    )
    print(json.dumps(rows[-1]), flush=True)

    # One coarse quantizer (k-means centroids, searched exactly) shared by the IVF indexes; its training
    # time is part of each one's build time. Not an HNSW over the centroids: on these vectors its
    # graph misses some of each query's nearest centroids, which capped IVF-Flat's recall@10 at 0.986
    # even with every list probed (20k vectors); exact search of 4,000 centroids costs ~0.4 ms.
    nlist = round(4 * math.sqrt(n))
    sample = train_sample(xb, 40 * nlist, seed)  # FAISS asks for >= 39 per centroid
    t0 = time.perf_counter()
    km = faiss.Kmeans(d, nlist, niter=10, seed=seed, max_points_per_centroid=10**9)
    km.train(sample)
    quantizer = faiss.IndexFlatL2(d)
    quantizer.add(km.centroids)
    coarse_s = time.perf_counter() - t0
    out["nlist"], out["coarse_train_s"] = nlist, round(coarse_s, 2)
    probes = [1, 2, 4, 8, 16, 32, 64, 128, 256]

    def ivf(name: str, index: faiss.IndexIVF, bytes_per_vector: float, extra: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        if not index.is_trained:
            index.train(sample)
        for start in range(0, n, CHUNK):
            index.add(xb[start : start + CHUNK])
        build = coarse_s + time.perf_counter() - t0

        def set_nprobe(v: int) -> None:
            index.nprobe = v

        rows.extend(
            sweep(
                name,
                build,
                n * bytes_per_vector / 2**20,
                set_nprobe,
                probes,
                "nprobe",
                lambda q: index.search(q, K),
                xq,
                truth,
                n_time,
                {"nlist": nlist, **extra},
            )
        )

    index = faiss.IndexIVFFlat(quantizer, d, nlist)
    ivf("IVF-Flat", index, 4 * d, {})
    del index
    index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit)
    ivf("IVF-SQ8", index, d, {})
    del index

    # IVF-PQ, 64 bytes a vector, alone and with its top k_factor * 10 re-ranked exactly against the
    # flat copy (which a deployment would keep on disk or memory-mapped).
    pq = faiss.IndexIVFPQ(quantizer, d, nlist, 64, 8)
    t0 = time.perf_counter()
    pq.train(sample)
    for start in range(0, n, CHUNK):
        pq.add(xb[start : start + CHUNK])
    pq_build = coarse_s + time.perf_counter() - t0
    for k_factor in (1, 10, 50):
        refine = faiss.IndexRefine(pq, flat)
        refine.k_factor = k_factor

        def set_nprobe_pq(v: int, pq: faiss.IndexIVFPQ = pq) -> None:
            pq.nprobe = v

        rows.extend(
            sweep(
                "IVF-PQ64" + (f" + exact re-rank of top {k_factor * K}" if k_factor > 1 else ""),
                pq_build,
                n * 64 / 2**20,
                set_nprobe_pq,
                probes,
                "nprobe",
                lambda q, r=refine: r.search(q, K),
                xq,
                truth,
                n_time,
                {"nlist": nlist, "k_factor": k_factor},
            )
        )
    del pq

    # Fast-scan PQ over the whole collection: 4-bit codes, so the distance tables fit in SIMD registers
    # (1M codes of 32 bytes in ~1.6 ms on one core); no coarse partition, so no true neighbour is lost
    # to an unprobed cell. Its top k_factor * 10 are re-ranked exactly against the flat copy.
    for m in (32, 64):
        fs = faiss.IndexPQFastScan(d, m, 4)
        t0 = time.perf_counter()
        fs.train(train_sample(xb, 100_000, seed))
        for start in range(0, n, CHUNK):
            fs.add(xb[start : start + CHUNK])
        fs_build = time.perf_counter() - t0
        refine = faiss.IndexRefine(fs, flat)

        def set_k_factor(v: int, r: faiss.IndexRefine = refine) -> None:
            r.k_factor = v

        rows.extend(
            sweep(
                f"PQ{m}x4 fast-scan + exact re-rank",
                fs_build,
                n * m / 2 / 2**20,
                set_k_factor,
                [1, 2, 5, 10, 20],
                "k_factor",
                lambda q, r=refine: r.search(q, K),
                xq,
                truth,
                n_time,
                {"M": m},
            )
        )
        del refine, fs

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
            sweep(
                "HNSW32-Flat",
                build,
                n * (4 * d + 2 * 32 * 8) / 2**20,
                set_ef,
                [16, 32, 64, 128, 256, 512],
                "efSearch",
                lambda q: hnsw.search(q, K),
                xq,
                truth,
                n_time,
                {"M": 32, "efConstruction": 40},
            )
        )
        del hnsw
    else:
        out["hnsw_skipped"] = f"HNSW-Flat not built at n={n} (> --hnsw-max {hnsw_max}): see BENCHMARKS.md"
    best = [r for r in rows if r["recall_at_10"] >= 0.95]
    out["fastest_at_recall_0.95"] = min(best, key=lambda r: r["p50_ms"]) if best else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index-dir", type=Path, required=True, help="a served index version (its real embeddings)")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=1000, help="queries for recall (default 1000)")
    p.add_argument("--timed", type=int, default=300, help="single queries timed for the p50 (default 300)")
    p.add_argument("--per-place", type=int, default=20, help="vectors per generated place (default 20)")
    p.add_argument("--spread", type=float, default=1.0, help="photo noise relative to the place spread")
    p.add_argument("--hnsw-max", type=int, default=1_000_000, help="largest size to build HNSW-Flat for")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    args = p.parse_args(argv)
    if min(args.sizes) < 1000 or args.queries < 10 or args.timed < 5 or args.per_place < 1 or args.spread <= 0:
        p.error("sizes >= 1000, queries >= 10, timed >= 5, per-place >= 1, spread > 0")
    try:
        real = real_embeddings(args.index_dir)
    except RuntimeError as e:  # FAISS raises RuntimeError for a missing or unreadable file
        print(f"ann: cannot read {args.index_dir / 'index.faiss'}: {e}", file=sys.stderr)
        return 2
    d2, _ = faiss.knn(real, real, K + 1)  # itself first
    pairs = np.random.default_rng([args.seed, 4]).integers(len(real), size=(2, 2000))
    ann: dict[str, Any] = {
        "dim": int(real.shape[1]),
        "real_structure": {
            "nn1_d2_median": round(float(np.median(d2[:, 1])), 3),
            "nn10_d2_median": round(float(np.median(d2[:, -1])), 3),
            "random_pair_d2_median": round(float(np.median(((real[pairs[0]] - real[pairs[1]]) ** 2).sum(1))), 3),
        },
        "generator": {
            "real_embeddings": len(real),
            "per_place": args.per_place,
            "spread": args.spread,
            "seed": args.seed,
            "normalised": True,
        },
        "threads_for_p50": 1,
        "sizes": {},
    }
    for n in args.sizes:
        gen = Generator(real, max(1, n // args.per_place), args.spread, args.seed)
        ann["sizes"][str(n)] = run_size(gen, n, args.queries, args.timed, args.hnsw_max, args.seed)
    ann["created"] = utc_timestamp()
    ann["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    results = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else {}
    results["ann"] = ann
    args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
