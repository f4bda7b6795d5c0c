"""The Ray engine, measured on this machine against the embedded one (`make bench` runs it).

1. Indexing throughput: the Ray Data actor pool (cluster/indexing.py) embeds London map images on a
   local cluster whose head has no CPUs and whose worker nodes have one each, with 1 and then 2 worker
   nodes; and the embedded engine's per-image work in 1 and 2 processes on the same images.
2. Driver memory of `imgsearch index --engine ray`: the build of N1 and then N2 map images (London's,
   then London's again under new ids; shards written by the workers, heads fitted through the staged
   shards, published), each in a fresh driver process on the same local cluster, with the London
   model; bytes per map image = ((peak RSS - RSS before the build) at N2 - the same at N1) / (N2 - N1),
   and the same from the peaks alone.
3. Serving: the London index of --preset, published in 2 shards into --out-artifacts, served by
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
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# bench/ is sys.path[0] for these scripts
import harness
import httpx
import live_server as server
import numpy as np
import ray_faults
import ray_million
import report

from common.parallel import map_files
from common.pipeline import ALL_PRESETS, Pipeline, get_pipeline
from common.settings import Settings
from dataset.layout import Dataset, DatasetError, ImageSet, load_dataset
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


def first_map_images(ds: Dataset, n: int) -> Dataset:
    """The data set with its first n map images (the ground truth's columns cut alike, as views); past
    the last, the map images again under new ids, relevant to no query (the ground truth padded)."""
    size = len(ds.database)
    if n <= size:
        db = ImageSet(ds.database.paths[:n], ds.database.loc[:n])
        cut = {k: None if a is None else a[:, :n] for k, a in (("sim", ds.sim), ("fov", ds.fov))}
        return dataclasses.replace(ds, database=db, **cut)
    rows = np.arange(n) % size
    db = ImageSet([ds.database.paths[r] for r in rows], ds.database.loc[rows])
    pad = {
        k: None if a is None else np.concatenate([a, np.zeros((len(a), n - size), a.dtype)], axis=1)
        for k, a in (("sim", ds.sim), ("fov", ds.fov))
    }
    return dataclasses.replace(ds, database=db, **pad)


def indexing(version: Path, data_root: Path, conf: Pipeline, n_images: int, nodes: list[int]) -> dict[str, Any]:
    """Map images per second: Ray with each number of 1-CPU worker nodes (the shards' files written by
    the workers), embedded with as many processes."""
    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    from cluster.indexing import RayEngine

    ds = first_map_images(load_dataset(data_root, check_files=False), n_images)
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
            with tempfile.TemporaryDirectory(dir=ROOT / "artifacts") as staging:
                t0 = time.perf_counter()
                written = RayEngine(actors=n).write(
                    conf, ds, version / "vectorizer.npz", version / "encoder.npz", Path(staging), 2
                )
                seconds = time.perf_counter() - t0
            assert len(written.ok) == len(ds.database)
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


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def probe_driver(args: argparse.Namespace) -> int:
    """In a fresh process: `imgsearch index --engine ray`'s work for the first --probe-driver map images
    on the cluster at --address, published under --out-artifacts; prints its peak RSS as JSON."""
    import ray

    from cli.stages import index_with
    from cluster.indexing import RayEngine

    conf = get_pipeline(args.preset)
    ds = load_dataset(args.data, check_files=False)
    vectors_path, model_dir = Path(args.vectors), Path(args.model)
    sub = first_map_images(ds, args.probe_driver)
    del ds
    ray.init(address=args.address, logging_level="WARNING")
    try:
        # The data set (its ground truth grows with the map images) is in memory before the build.
        before = _status_kib("VmRSS:")
        t0 = time.perf_counter()
        out = store.data_dir(args.out_artifacts, args.data) / f"probe-{args.probe_driver}"
        version = index_with(RayEngine(actors=2), conf, sub, vectors_path, model_dir, out, 2, metrics=False)
        seconds = time.perf_counter() - t0
        # This process's own high-water mark (ru_maxrss would keep the forking parent's RSS over exec).
        peak = _status_kib("VmHWM:")
    finally:
        ray.shutdown()
    print(
        json.dumps(
            {
                "images": len(sub.database),
                "version": version.name,
                "seconds": round(seconds, 1),
                "rss_before_kib": before,
                "peak_rss_kib": peak,
            }
        )
    )
    return 0


def driver_memory(args: argparse.Namespace, sizes: list[int]) -> dict[str, Any]:
    """The Ray build's driver: peak RSS at each collection size, each a fresh process on one cluster."""
    from ray.cluster_utils import Cluster

    from cli.stages import vectors_and_model

    conf = get_pipeline(args.preset)
    out_root = store.data_dir(args.artifacts, args.data)
    vectors_path, model_dir = vectors_and_model(conf, load_dataset(args.data, check_files=False), out_root, None)
    rows = []
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        assert c.address.startswith("127.0.0.1:"), c.address
        for n in sizes:
            cmd = [sys.executable, __file__, "--probe-driver", str(n), "--address", c.address]
            cmd += ["--data", str(args.data), "--preset", args.preset, "--out-artifacts", str(args.out_artifacts)]
            cmd += ["--vectors", str(vectors_path), "--model", str(model_dir)]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=ROOT)
            if run.returncode != 0:
                raise RuntimeError(f"driver probe of {n} map images failed: {run.stderr[-3000:]}")
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(f"ray build driver: {rows[-1]}", flush=True)
    finally:
        c.shutdown()
        for n in sizes:
            shutil.rmtree(store.data_dir(args.out_artifacts, args.data) / f"probe-{n}", ignore_errors=True)
    (a, b) = rows[0], rows[-1]
    images = b["images"] - a["images"]
    raw = 1024 * (b["peak_rss_kib"] - a["peak_rss_kib"]) / images
    # Net of what the driver held before the build: the data set, whose dense ground truth (queries x
    # map images) grows with the padded collection, not with the engine.
    net = 1024 * ((b["peak_rss_kib"] - b["rss_before_kib"]) - (a["peak_rss_kib"] - a["rss_before_kib"])) / images
    return {"builds": rows, "driver_bytes_per_image": round(net), "driver_bytes_per_image_raw": round(raw)}


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
                if name == "ray":  # last: the replicas it kills are replaced, but cold
                    out["faults"] = ray_faults.replica_kills(srv.url, c.address, [f.read_bytes() for f in files[:8]])
                    print(f"ray replica kills: {out['faults']}", flush=True)
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
        import ray

        ray.shutdown()  # ray_faults asked the shards' status through this process
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
    dr = r["driver"]
    lines += [
        "",
        "The driver of `imgsearch index --engine ray` (shards written by the workers, heads fitted through "
        "the staged shards, published), each build in a fresh process on one local cluster of two 1-CPU nodes:",
        "",
        "| map images | seconds | RSS before the build (data set loaded), MiB | peak RSS, MiB |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {b['images']} | {b['seconds']} | {b['rss_before_kib'] / 1024:.0f} | {b['peak_rss_kib'] / 1024:.0f} |"
        for b in dr["builds"]
    ]
    lines += [
        "",
        "Driver bytes per map image, (peak RSS - RSS before the build) at N2 minus the same at N1, over N2 - N1: "
        f"**{r['driver_bytes_per_image']}** (peak RSS alone: {dr['driver_bytes_per_image_raw']}, which also counts "
        "the data set's ground truth, queries x map images, padded for the map images past London's).",
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
    f = sv["faults"]

    def codes(counts: dict[str, int]) -> str:
        return ", ".join(f"{n} x {'no answer' if c == '-1' else c}" for c, n in counts.items())

    lines += [
        "",
        f"Ray over embedded: p50 at 1 connection {sv['ray_over_embedded_p50_c1']} x, "
        f"requests/s at 8 connections {sv['ray_over_embedded_rps_c8']} x.",
        "",
        "Shard replicas killed (SIGKILL) under 3 searching clients: one replica of each shard in turn, "
        f"answers {codes(f['replica_kill_codes'])} (non-200: **{f['replica_kill_non200']}**); every replica "
        f"of one shard at once, answers {codes(f['shard_loss_statuses'])}, error codes "
        f"{', '.join(f['shard_loss_error_codes']) or 'none'}; "
        f"a search after the replacement answered {'200' if f['shard_loss_recovered'] else 'not 200'}.",
    ]
    if "million" in r:
        lines += ["", *million_lines(r["million"])]
    return "\n".join(lines)


def million_lines(m: dict[str, Any]) -> list[str]:
    ms = m["million_search_ms"]
    kinds = ", ".join(sorted(set(m["index_kinds"])))
    shards = range(m["shards"])
    rerun = [f"Measured apart, at commit {m['commit']}: `{m['command']}`.", ""] if "command" in m else []
    return [
        *rerun,
        f"{m['n']:,} map entries ({m['real_map_images']:,} London map images, the rest generated: bench/million.py) "
        f"in {m['shards']} shards of {kinds}, {m['per_shard_entries'][0]:,} entries each, served through Ray "
        f"(1 ingress replica, 1 replica a shard) and answering {m['queries']} London test queries:",
        "",
        "| | p50 ms |",
        "|---|---|",
        *(f"| shard {s} search stage, in process (k {ms['k']}) | {ms[f'shard{s}_p50']} |" for s in shards),
        *(f"| shard {s} search call, in its Ray replica | {ms[f'ray_shard{s}_p50']} |" for s in shards),
        f"| POST /search through Ray | {ms['ray_http_p50']} |",
        f"| POST /search, embedded service on the same version | {ms['embedded_http_p50']} |",
        "",
        f"Same top 10 through Ray as the same shards searched in process: **{m['million_same_top10']}**; as the "
        f"embedded service on the same version: {m['million_same_top10_embedded_service']} (its ready time "
        f"{m['embedded']['ready_s']} s, RSS {m['embedded']['rss_mb']} MB; Ray's ready time {m['ray']['ready_s']} s).",
    ]


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
    p.add_argument(
        "--driver-images",
        type=int,
        nargs=2,
        default=[3291, 16455],
        metavar=("N1", "N2"),
        help="the two collection sizes of the driver memory measure, past 3,291 London's map images again "
        "under new ids (default 3291 16455)",
    )
    p.add_argument("--out", type=Path, default=report.RESULTS)
    p.add_argument("--markdown", type=Path, default=report.MARKDOWN)
    p.add_argument(
        "--million-size",
        type=int,
        default=1_000_000,
        help="entries of the sharded collection served through Ray (bench/ray_million.py; 0: skip it)",
    )
    # One driver of the memory measure (driver_memory runs this script so).
    p.add_argument("--probe-driver", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--vectors", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe_driver is not None:
        return probe_driver(args)
    if min(args.shards, args.index_images, args.queries, args.duration) < 1:
        p.error("--shards, --index-images, --queries and --duration must be >= 1")
    if args.million_size and args.million_size < 10_000:
        p.error("--million-size must be 0 or >= 10000")
    n1, n2 = args.driver_images
    if not 1 <= n1 < n2:
        p.error("--driver-images N1 N2 needs 1 <= N1 < N2")
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
    r["driver"] = driver_memory(args, [n1, n2])
    r["driver_bytes_per_image"] = r["driver"]["driver_bytes_per_image"]
    env = {"IMGSEARCH_DATA": str(args.data), "IMGSEARCH_ARTIFACTS": str(args.out_artifacts)}
    r["serving"] = serving(env | {"IMGSEARCH_PRESET": settings.preset}, files, args.duration)
    faults = r["serving"]["faults"]
    r["replica_kill_non200"] = faults["replica_kill_non200"]
    r["shard_loss_statuses"] = faults["shard_loss_statuses"]
    if args.million_size:
        work = args.out_artifacts.parent / "bench-ray-1m"
        size = args.million_size
        m = ray_million.ray_million(args.data, args.artifacts, args.preset, size, args.queries, work, False)
        r["million"] = m
        r["million_same_top10"] = m["million_same_top10"]
        r["million_search_ms"] = m["million_search_ms"]
    table = markdown(report.record("ray", r, args.out)["ray"])
    report.write_markdown(BEGIN, END, table, args.markdown)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
