#!/usr/bin/env python3
"""A million map images served on one node: the `served_1m` section of bench/results.json (part of
`make bench`: bench/run.py runs it).

    python bench/million.py --data ../shared/datasets/london [--size 1000000] [--workers 3] [--keep]

Builds a collection of --size map entries and serves it through `imgsearch serve`:
- the 3,291 London map images as they are served (embeddings, keypoints, paths, locations), ids
  0..3290, and generated entries after them: embeddings drawn with the covariance of the real ones
  (bench/ann.py's Generator: places, and photos of each place), a generated keypoint set each
  (--keypoints keypoints: positions, orientations, descriptors and visual words drawn at random) and
  a location in London's bounding box;
- indexed by the indexer's own rule (indexer/kinds.py: above `exact_below`, fast-scan PQ codes with
  exact re-rank from the float vectors on disk), published as an index version with the London
  version's encoder, vectorizer and heads, in a data folder of its own under --work;
- then `imgsearch serve` (--workers uvicorn workers) answers the London test-split queries through
  POST /search, one client, while this script reads each request's stage timings from the server's
  JSON log lines; then the same queries again with a position prior (a simulated phone fix: the
  query's true place plus Gaussian noise of --prior-sigma per axis, seeded; radius --prior-radius),
  whose candidates come from the spatial index, not from the vector index.

Reports: search_p50_ms (the search stage of POST /search), prior_search_p50_ms and
prior_over_plain (the search stage of the prior searches, and its ratio to the plain one's, both
from this run), prior_candidates_p50 (map entries within each radius), exact_p50_ms (exact flat search of the same
vectors for the same London queries, one query and one thread, in this process, each timed just after
the server answered it, while the server is idle: a host's speed drifts within a run, so the two are
taken in the same minutes), recall_at_10 of the served index's search against that exact search (the
version the server serves, loaded here), the London queries' recall@10 (evaluation/evaluate.py's) over
either index and through POST /search, rss_mb / pss_mb of the serving tree after the queries, ready_s
(start to /readyz), and the HTTP p50. --work is removed afterwards unless --keep (its files take
~8 GB at 1M).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss

# bench/ is sys.path[0] for these scripts
import harness
import httpx
import live_server as server
import numpy as np
import report
from ann import recall_at_k
from london import add_arguments, analysed_queries, collection, open_london, recall_at

from common.settings import Settings
from common.threads import single_threaded, single_threaded_kernels
from dataset.layout import Dataset, Location
from indexer import store
from indexer.kinds import build_index
from model.verify import MapFeatures
from retrieval.searcher import Query, Searcher

ROOT = Path(__file__).resolve().parents[1]
K = 10


def generated_keypoints(real: MapFeatures, n: int, per_image: int, n_words: int, seed: int) -> MapFeatures:
    """The real map images' keypoints, then n - len(real.ids) generated sets of per_image keypoints
    (each sorted by word, as MapFeatures keeps them); ids 0..n-1, the real ones first."""
    n_real = len(real.ids)
    if not np.array_equal(real.ids, np.arange(n_real)):
        raise ValueError("the served version's keypoints are not ids 0..n-1 in order")
    m = n - n_real
    rng = np.random.default_rng([seed, 5])
    words = np.sort(rng.integers(0, n_words, size=(m, per_image), dtype=np.int32), axis=1).ravel()
    side = 341.0  # the presets' image size (max_side)
    return MapFeatures(
        ids=np.arange(n, dtype=np.int64),
        offsets=np.concatenate([real.offsets, real.offsets[-1] + per_image * np.arange(1, m + 1)]).astype(np.int64),
        xy=np.concatenate([real.xy, rng.uniform(0, side, size=(m * per_image, 2)).astype(np.float32)]),
        descriptors=np.concatenate([real.descriptors, rng.integers(0, 256, size=(m * per_image, 32), dtype=np.uint8)]),
        words=np.concatenate([real.words, words]),
        angles=np.concatenate([real.angles, rng.uniform(0, 360, size=m * per_image).astype(np.float16)]),
    )


def generated_records(real: dict[int, store.ImageRecord], n: int, seed: int) -> list[store.ImageRecord]:
    """The real map images' records, then generated ones at random places in their bounding box."""
    recs = [real[i] for i in range(len(real))]
    e = np.array([r.loc.easting for r in recs])
    no = np.array([r.loc.northing for r in recs])
    rng = np.random.default_rng([seed, 6])
    m = n - len(recs)
    east, north = rng.uniform(e.min(), e.max(), m), rng.uniform(no.min(), no.max(), m)
    heading = rng.uniform(0, 360, m)
    for j in range(m):
        i = len(real) + j
        recs.append(store.ImageRecord(i, f"database/generated/{i:07d}.jpg", Location(east[j], north[j], heading[j])))
    return recs


def write_data_folder(folder: Path, london: Path, records: list[store.ImageRecord]) -> Path:
    """A data folder in the course layout naming every map entry (the server checks it; the real
    images resolve through a link to the London folder's, the generated ones have no file)."""
    (folder / "database").mkdir(parents=True)
    (folder / "query").mkdir()
    db = {"loc": [r.loc.as_list() for r in records], "im_paths": [r.path for r in records]}
    (folder / "database" / "database.json").write_text(json.dumps(db), encoding="utf-8")
    shutil.copyfile(london / "query" / "query.json", folder / "query" / "query.json")
    (folder / "database" / "images").symlink_to((london / "database" / "images").resolve())
    return folder


def build_collection(
    args: argparse.Namespace, london: store.LoadedIndex, shards: int = 1
) -> tuple[Path, Path, np.ndarray, np.ndarray, dict[str, Any]]:
    """Data folder and published version of the collection, in `shards` shards (store.publish splits
    the index by id, each shard of the kind its own size calls for); returns (data folder, version,
    vectors, generated queries, build figures)."""
    t0 = time.perf_counter()
    xb, gen = collection(london, args.size, args.per_place, args.spread, args.seed)
    generate_s = time.perf_counter() - t0
    conf = london.pipeline
    t0 = time.perf_counter()
    index = build_index(conf.index, xb, np.arange(args.size, dtype=np.int64))
    index_s = time.perf_counter() - t0
    records = generated_records(london.images, args.size, args.seed)
    data = write_data_folder(args.work / "data", args.data, records)
    files = {n: london.directory / n for n in ("vectorizer.npz", "encoder.npz", "split.json")}
    if london.verifier is not None:
        kp = generated_keypoints(london.verifier.store, args.size, args.keypoints, london.vectorizer.n_words, args.seed)
        files["verify.npz"] = kp.save(args.work / "verify.npz")
        del kp
    skip = ("version", "count", "dim", "checksums", "shards", "index_kinds", "metrics")
    manifest = {k: v for k, v in london.manifest.items() if k not in skip} | {"conf": conf.to_json()}
    manifest |= {"data": str(data), "generated": {"size": args.size, "keypoints": args.keypoints, "seed": args.seed}}
    t0 = time.perf_counter()
    family = store.index_family(args.work / "artifacts", data, conf.name)
    version = store.publish(family, index, records, files, manifest, shards)
    publish_s = time.perf_counter() - t0
    (args.work / "verify.npz").unlink(missing_ok=True)
    figures = {"generate_s": round(generate_s, 1), "index_build_s": round(index_s, 1), "publish_s": round(publish_s, 1)}
    return data, version, xb, gen.queries(args.generated_queries), figures


def exact_and_served(
    version: Path, flat: faiss.IndexFlatL2, queries: list[Query], xg: np.ndarray, ds: Dataset, rows: list[int]
) -> dict[str, Any]:
    """Exact search of the same vectors (`flat`) against the served version's own search, in this
    process, for the London queries and for generated ones (xg: new photos of generated places,
    whose neighbours are generated entries, where the codes must tell near-alike vectors apart)."""
    served = store.load(version)
    recall = {}
    xq = np.concatenate([q.embedding for q in queries])
    for name, x in (("recall_at_10", xg), ("recall_at_10_london_queries", xq)):
        _, truth = flat.search(x, K)
        found = served.index.search(x, K)[1]
        recall[name] = round(recall_at_k(found, truth), 4)
    # What the user sees of it: the London test queries' recall@10 among all entries, from the first
    # stage alone (exact search against the served index), then after verification and expansion (the
    # whole ranking of POST /search) over either index.
    recall["london_first_stage_r10_exact"] = recall_at(truth, ds, rows)
    recall["london_first_stage_r10_served"] = recall_at(found, ds, rows)
    for name, index in (("exact", flat), ("served", served.index)):
        searcher = Searcher(dataclasses.replace(served, index=index))  # flat rows are the ids 0..n-1
        ranked = np.array([[h.id for h in searcher.rank(q, K)] for q in queries])
        recall[f"london_r10_{name}_index"] = recall_at(ranked, ds, rows)
    # One query on one thread, as `imgsearch serve` runs FAISS.
    with single_threaded():
        local = harness.time_calls(lambda q: served.index.search(q[None, :], K), xq)
    return {"index_kind": served.manifest["index_kinds"][0], "search_inproc_p50_ms": local.ms(50), **recall}


def exact_ms(flat: faiss.IndexFlatL2, x: np.ndarray) -> float:
    """One exact search of one query on one thread, in ms."""
    with single_threaded():
        return 1000 * harness.clock(lambda q: flat.search(q[None, :], K), x)[0]


def log_stages(log_path: Path, start: int) -> dict[str, list[float]]:
    """Each stage's timings (ms) from the server's JSON log lines after the first `start`."""
    stages: dict[str, list[float]] = {}
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines()[start:]:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        for stage, ms in (rec.get("timings_ms") or {}).items():
            stages.setdefault(stage, []).append(float(ms))
    return stages


def prior_params(args: argparse.Namespace, ds: Dataset, rows: list[int]) -> list[dict[str, float]]:
    """A simulated phone fix per query: its true place plus Gaussian noise of --prior-sigma per axis."""
    from retrieval.locate import to_latlon

    rng = np.random.default_rng([args.seed, 34])
    out = []
    for q in rows:
        e, n = ds.queries.loc[q, :2] + rng.normal(0.0, args.prior_sigma, 2)
        lat, lon = to_latlon(float(e), float(n), Settings().utm_epsg)
        out.append({"lat": lat, "lon": lon, "radius_m": args.prior_radius})
    return out


def serve_queries(
    args: argparse.Namespace,
    data: Path,
    preset: str,
    files: list[Path],
    exact: Callable[[int], float],
    priors: list[dict[str, float]],
) -> dict[str, Any]:
    """`imgsearch serve` on the collection; the queries through POST /search, one client. After each
    answer, while the server is idle, `exact(i)` times exact search of query i in this process: the
    two are sampled in the same minutes, so a host's drift moves both alike."""
    env = os.environ | {
        "IMGSEARCH_DATA": str(data),
        "IMGSEARCH_ARTIFACTS": str(args.work / "artifacts"),
        "IMGSEARCH_PRESET": preset,
        "IMGSEARCH_WORKERS": str(args.workers),
        "IMGSEARCH_LOG_FORMAT": "json",
    }
    log_path = args.work / "server.log"
    with open(log_path, "wb") as log, server.serving(env, log=log) as srv:
        ready_s = server.wait_ready(srv.url, srv.proc, srv.t0, args.workers, timeout=900)
        # Every worker loads the collection on its own: nothing is timed before the last one serves.
        all_ready_s = server.wait_loaded(log_path, srv.proc, srv.t0, args.workers, timeout=900)
        took, answers, exact_took = [], [], []
        with httpx.Client(timeout=120) as c:
            for f in files[: 2 * args.workers]:  # every worker answers once before anything counts
                c.post(f"{srv.url}/search", params={"k": K}, files={"file": ("q.jpg", f.read_bytes())})
            first_timed = sum(1 for _ in log_path.open(encoding="utf-8", errors="replace"))
            for i, f in enumerate(files):
                seconds, _, r = harness.clock(
                    lambda data: c.post(f"{srv.url}/search", params={"k": K}, files={"file": ("q.jpg", data)}),
                    f.read_bytes(),
                )
                took.append(1000 * seconds)
                if r.status_code != 200:
                    raise RuntimeError(f"POST /search answered {r.status_code}: {r.text[:200]}")
                answers.append([h["id"] for h in r.json()["results"]])
                exact_took.append(exact(i))
            first_prior = sum(1 for _ in log_path.open(encoding="utf-8", errors="replace"))
            candidates = []
            for f, params in zip(files, priors, strict=True):
                r = c.post(f"{srv.url}/search", params={"k": K, **params}, files={"file": ("q.jpg", f.read_bytes())})
                if r.status_code != 200:
                    raise RuntimeError(f"POST /search with a prior answered {r.status_code}: {r.text[:200]}")
                candidates.append(r.json()["prior"]["candidates"])
        pids = server.process_tree(srv.proc.pid)
        rss = [server.rss_mb(p) for p in pids]
        pss = [server.pss_mb(p) for p in pids]
    stages = log_stages(log_path, first_timed)
    # The plain searches' lines come first, then the prior ones'.
    prior_stages = log_stages(log_path, first_prior)
    stages = {s: v[: len(v) - len(prior_stages.get(s, []))] for s, v in stages.items()}
    for name, got in (("", stages), ("prior ", prior_stages)):
        if len(got.get("search", [])) < len(files):
            raise RuntimeError(f"the server logged {len(got.get('search', []))} {name}search timings for {len(files)}")
    search_ms, prior_ms = float(np.median(stages["search"])), float(np.median(prior_stages["search"]))
    return {
        "workers": args.workers,
        "search_p50_ms": round(search_ms, 3),
        "prior_search_p50_ms": round(prior_ms, 3),
        "prior_over_plain": round(prior_ms / search_ms, 4),
        "prior_sigma_m": args.prior_sigma,
        "prior_radius_m": args.prior_radius,
        "prior_candidates_p50": float(np.median(candidates)),
        "prior_stages_p50_ms": {s: round(float(np.median(v)), 2) for s, v in prior_stages.items()},
        "exact_p50_ms": round(float(np.median(exact_took)), 2),
        "stages_p50_ms": {s: round(float(np.median(v)), 2) for s, v in stages.items()},
        "http_p50_ms": round(float(np.median(took)), 2),
        "answers": answers,
        "rss_mb": round(sum(rss), 1),
        "rss_mb_by_process": sorted(rss, reverse=True),
        "pss_mb": round(sum(pss), 1),
        "ready_s": round(ready_s, 2),
        "all_workers_ready_s": round(all_ready_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--size", type=int, default=1_000_000, help="map entries in the collection (default 1,000,000)")
    p.add_argument("--keypoints", type=int, default=64, help="keypoints of each generated entry (default 64)")
    p.add_argument("--workers", type=int, default=Settings().workers, help="uvicorn workers (default: the setting)")
    p.add_argument("--queries", type=int, default=100, help="test-split queries sent (default 100)")
    p.add_argument("--generated-queries", type=int, default=1000, help="generated queries for recall (default 1000)")
    p.add_argument("--per-place", type=int, default=20, help="generated entries per generated place (default 20)")
    p.add_argument("--spread", type=float, default=1.0, help="photo noise relative to the place spread")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prior-sigma", type=float, default=30.0, help="simulated fix noise per axis, m (default 30)")
    p.add_argument("--prior-radius", type=float, default=100.0, help="prior search radius, m (default 100)")
    p.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench-1m", help="where the collection is built")
    p.add_argument("--keep", action="store_true", help="keep --work afterwards")
    p.add_argument("--out", type=Path, default=report.RESULTS)
    args = p.parse_args(argv)
    small = min(args.keypoints, args.workers, args.per_place) < 1 or min(args.queries, args.generated_queries) < 5
    if args.size < 10_000 or small:
        p.error("--size >= 10000; --keypoints, --workers, --per-place >= 1; --queries, --generated-queries >= 5")
    if args.spread <= 0:
        p.error("--spread must be > 0")
    if args.prior_sigma <= 0 or not 0 < args.prior_radius <= 5000:
        p.error("--prior-sigma must be > 0 and --prior-radius in (0, 5000]")
    started = report.started("bench/million.py", argv)
    opened = open_london(args, "million")
    if opened is None:
        return 2
    ds, london = opened
    single_threaded_kernels()
    searcher = Searcher(london)
    kept, sent, xq = analysed_queries(searcher, ds, "test", args.queries)
    args.n_real = len(london.images)
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    try:
        data, version, xb, xg, out = build_collection(args, london)
        print(f"collection: {json.dumps(out)}", flush=True)
        del london, searcher
        flat = faiss.IndexFlatL2(xb.shape[1])
        flat.add(xb)  # its own copy: the 4 GB of xb are let go
        del xb
        out |= exact_and_served(version, flat, xq, xg, ds, kept)
        print(f"exact and served search: {json.dumps(out)}", flush=True)
        london_x = [q.embedding[0] for q in xq]
        priors = prior_params(args, ds, kept)
        served = serve_queries(args, data, args.preset, sent, lambda i: exact_ms(flat, london_x[i]), priors)
        # Through POST /search (verified, expanded), among all entries.
        out |= {k: v for k, v in served.items() if k != "answers"}
        answers = np.array([a + [-1] * (K - len(a)) for a in served["answers"]])
        out["london_r10_through_search"] = recall_at(answers, ds, kept)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    out = {
        "n": args.size,
        "real_map_images": args.n_real,
        "keypoints_per_generated_entry": args.keypoints,
        "queries": len(sent),
        **out,
        "search_over_exact": round(out["search_p50_ms"] / out["exact_p50_ms"], 4),
    }
    print(json.dumps(out), flush=True)
    report.record("served_1m", started | out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
