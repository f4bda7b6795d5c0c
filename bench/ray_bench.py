"""The Ray engine, measured on this machine against the embedded one (`make bench` runs it).

1. Indexing throughput: the Ray Data actor pool (cluster/indexing.py) embeds London map images on a
   local cluster whose head has no CPUs and whose worker nodes have one each, with 1 and then 2 worker
   nodes; and the embedded engine's per-image work in 1 and 2 processes on the same images.
2. Serving: the London index of --preset, published in 2 shards into --out-artifacts, served by
   `imgsearch serve --engine ray` (2 ingress replicas, two replicas per shard, on a head node and a
   worker node) and by the embedded `imgsearch serve` (3 workers): /search p50 and requests/s at 1 and 8
   connections (wrk, as bench/run.py), and whether both return the same hits.

Everything stays on loopback: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set before Ray is imported.
Records the `ray` section of bench/results.json and the section between the ray markers of BENCHMARKS.md.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: nodes on 127.0.0.1

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

# bench/ is sys.path[0] for these scripts
import harness
import httpx
import live_server as server
import numpy as np
import report

from common.parallel import map_files
from common.pipeline import ALL_PRESETS, Pipeline, get_pipeline
from common.settings import Settings
from dataset.layout import DatasetError, ImageSet, load_dataset
from dataset.split import split_queries
from indexer import store
from indexer.build import image_keypoints, image_vector
from model.encoder import NumpyEncoder
from model.vectorize import Vectorizer
from retrieval.live import republish
from retrieval.searcher import Searcher

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- ray:begin -->", "<!-- ray:end -->"


def publish_sharded(version: Path, family: Path, shards: int) -> Path:
    """The same index as `version`, published into `family` split into `shards` (as compact does)."""
    return republish(Searcher(store.load(version)), family, shards, {"copied_from": str(version)})


# --- indexing ----------------------------------------------------------------------------------------

_VECTORIZERS: dict[str, Vectorizer] = {}  # one per extraction process


def _embedded_one(path: str, job: tuple[Pipeline, str]) -> np.ndarray | None:
    """The embedded engine's per-image work: the aggregate vector, and the verification keypoints."""
    conf, vectorizer_file = job
    if vectorizer_file not in _VECTORIZERS:
        _VECTORIZERS[vectorizer_file] = Vectorizer.load(Path(vectorizer_file), conf.vector)
    vectorizer = _VECTORIZERS[vectorizer_file]
    data = Path(path).read_bytes()
    if conf.verify is not None:
        image_keypoints(data, conf.verify_features, vectorizer)
    return image_vector(data, conf, vectorizer)


def indexing(version: Path, data_root: Path, conf: Pipeline, n_images: int, nodes: list[int]) -> dict[str, Any]:
    """Map images per second: Ray with each number of 1-CPU worker nodes, embedded with as many processes."""
    import ray
    from ray.cluster_utils import Cluster

    from cluster.indexing import embed_with

    ds = load_dataset(data_root, check_files=False)
    ds = dataclasses.replace(ds, database=ImageSet(ds.database.paths[:n_images], ds.database.loc[:n_images]))
    out: dict[str, Any] = {"images": len(ds.database), "ray": [], "embedded": []}
    for n in nodes:
        # The head has no CPU: all the work is on the worker nodes.
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        try:
            for _ in range(n):
                c.add_node(num_cpus=1)
            c.wait_for_nodes()
            assert c.address.startswith("127.0.0.1:"), c.address
            ray.init(address=c.address, logging_level="WARNING")
            t0 = time.perf_counter()
            arrays = embed_with(conf, ds, version / "vectorizer.npz", version / "encoder.npz", actors=n)
            seconds = time.perf_counter() - t0
            assert arrays.embeddings.shape[0] == len(ds.database)
        finally:
            ray.shutdown()
            c.shutdown()
        row = {"worker_nodes": n, "seconds": round(seconds, 2), "images_per_s": round(len(ds.database) / seconds, 2)}
        out["ray"].append(row)
        print(f"ray indexing: {row}", flush=True)
    files = [str(ds.image_path(p)) for p in ds.database.paths]
    encoder = NumpyEncoder.load(version / "encoder.npz")
    for jobs in nodes:
        t0 = time.perf_counter()
        vectors = list(map_files(_embedded_one, files, (conf, str(version / "vectorizer.npz")), jobs))
        # As indexer/build.py: one matrix product for all images, after the extraction processes.
        encoder.embed(np.stack([v if v is not None else np.zeros(encoder.input_dim, np.float32) for v in vectors]))
        seconds = time.perf_counter() - t0
        row = {"processes": jobs, "seconds": round(seconds, 2), "images_per_s": round(len(ds.database) / seconds, 2)}
        out["embedded"].append(row)
        print(f"embedded indexing work: {row}", flush=True)
    return out


# --- serving -----------------------------------------------------------------------------------------


def _hits(url: str, files: list[Path]) -> list[list[tuple[int, float]]]:
    with httpx.Client(timeout=60) as c:
        out = []
        for f in files:
            r = c.post(f"{url}/search", params={"k": 10}, files={"file": ("q.jpg", f.read_bytes())})
            r.raise_for_status()
            out.append([(h["id"], h["score"]) for h in r.json()["results"]])
        return out


def serving(env: dict[str, str], files: list[Path], duration: int) -> dict[str, Any]:
    """The sharded index behind Ray Serve and behind the embedded server, in turn, same queries."""
    from ray.cluster_utils import Cluster

    out: dict[str, Any] = {}
    reference = None
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        c.add_node(num_cpus=2)
        c.wait_for_nodes()
        assert c.address.startswith("127.0.0.1:"), c.address
        runs = [
            ("ray", ["--engine", "ray", "--address", c.address, "--replicas", "2"], 2),
            ("embedded", ["--workers", "3"], 3),
        ]
        for name, args, workers in runs:
            # Ray Serve takes longer to stop its replicas.
            with server.serving(os.environ | env, args, stop_timeout=60 if name == "ray" else 30) as srv:
                ready_s = server.wait_ready(srv.url, srv.proc, srv.t0, workers)
                hits = _hits(srv.url, files[:20])  # also the warm-up of every replica
                c1 = server.wrk(srv.url, files, 1, duration)
                c8 = server.wrk(srv.url, files, 8, duration)
            if reference is None:
                reference = hits
            same = [h == r for h, r in zip(hits, reference, strict=True)]
            out[name] = {
                "ready_s": round(ready_s, 2),
                "http_p50_ms_c1": round(c1["p50_ms"], 2),
                "rps_c1": round(c1["rps"], 2),
                "http_p50_ms_c8": round(c8["p50_ms"], 2),
                "rps_c8": round(c8["rps"], 2),
                "errors": c1["errors"] + c8["errors"],
                "same_hits_as_ray": f"{sum(same)}/{len(same)}",
            }
            print(f"{name} serving: {out[name]}", flush=True)
    finally:
        c.shutdown()
    out["ray_over_embedded_p50_c1"] = harness.ratio(out["ray"]["http_p50_ms_c1"], out["embedded"]["http_p50_ms_c1"], 2)
    out["ray_over_embedded_rps_c8"] = harness.ratio(out["ray"]["rps_c8"], out["embedded"]["rps_c8"], 2)
    return out


# --- report ------------------------------------------------------------------------------------------


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    ix, sv = r["indexing"], r["serving"]
    lines = [
        f"Machine: {report.describe(m)}; {r['created']}, commit {r.get('commit')}.",
        f"Command: `{r['command']}` (index version {r['index_version']}, {r['shards']} shards).",
        "",
        f"Indexing {ix['images']} London map images ({r['preset']}): features, embedding, verification "
        "keypoints, timed from the start of the job (Ray: the actors start and load the model) to the last image.",
        "",
        "| engine | workers | seconds | images/s |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| Ray Data | {x['worker_nodes']} worker node(s) of 1 CPU | {x['seconds']} | {x['images_per_s']} |"
        for x in ix["ray"]
    ]
    lines += [
        f"| embedded | {x['processes']} process(es) | {x['seconds']} | {x['images_per_s']} |" for x in ix["embedded"]
    ]
    lines += [
        "",
        f"Serving the same index, {r['queries']} test queries (wrk, {r['duration']} s per run):",
        "",
        "| service | ready s | p50 ms, 1 conn | req/s, 1 conn | p50 ms, 8 conn | req/s, 8 conn | errors | same hits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "ray": "Ray Serve: 2 ingress replicas, 2 shards of 2 replicas, 2 nodes",
        "embedded": "embedded: 3 uvicorn workers",
    }
    for k, label in names.items():
        x = sv[k]
        lines.append(
            f"| {label} | {x['ready_s']} | {x['http_p50_ms_c1']} | {x['rps_c1']} | {x['http_p50_ms_c8']} | "
            f"{x['rps_c8']} | {x['errors']} | {x['same_hits_as_ray']} |"
        )
    lines += [
        "",
        f"Ray over embedded: p50 at 1 connection {sv['ray_over_embedded_p50_c1']} x, "
        f"requests/s at 8 connections {sv['ray_over_embedded_rps_c8']} x.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "london")
    p.add_argument("--artifacts", type=Path, default=Settings().artifacts, help="where the embedded index was built")
    p.add_argument("--out-artifacts", type=Path, default=ROOT / "artifacts" / "bench-ray", help="the sharded copy")
    p.add_argument("--preset", choices=sorted(ALL_PRESETS), default=Settings().preset)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--index-images", type=int, default=600, help="map images to index per run (default 600)")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--duration", type=int, default=15, help="seconds of each wrk run")
    p.add_argument("--out", type=Path, default=report.RESULTS)
    p.add_argument("--markdown", type=Path, default=report.MARKDOWN)
    args = p.parse_args(argv)
    if min(args.shards, args.index_images, args.queries, args.duration) < 1:
        p.error("--shards, --index-images, --queries and --duration must be >= 1")
    settings = Settings(data=args.data, artifacts=args.artifacts, preset=args.preset)
    try:
        ds = load_dataset(args.data, check_files=False)
        version = store.current_version(store.index_family(args.artifacts, args.data, args.preset))
    except (DatasetError, OSError, store.IndexLoadError) as e:
        print(f"bench: {e} (build the index first: imgsearch build)", file=sys.stderr)
        return 2
    family = store.index_family(args.out_artifacts, args.data, args.preset)
    sharded = publish_sharded(version, family, args.shards)
    rows = split_queries(ds.queries.loc, store.load(version).pipeline.split)["test"][: args.queries]
    files = [ds.image_path(ds.queries.paths[q]) for q in rows]
    r: dict[str, Any] = {
        "preset": args.preset,
        "index_version": sharded.name,
        "shards": args.shards,
        "queries": len(files),
        "duration": args.duration,
    } | report.started("bench/ray_bench.py", argv)
    r["indexing"] = indexing(version, args.data, get_pipeline(args.preset), args.index_images, [1, 2])
    env = {"IMGSEARCH_DATA": str(args.data), "IMGSEARCH_ARTIFACTS": str(args.out_artifacts)}
    r["serving"] = serving(env | {"IMGSEARCH_PRESET": settings.preset}, files, args.duration)
    table = markdown(report.record("ray", r, args.out)["ray"])
    report.write_markdown(BEGIN, END, table, args.markdown)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
