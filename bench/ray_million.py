#!/usr/bin/env python3
"""A million map entries in shards behind Ray Serve, checked against the embedded engine: `ray_million`
(bench/ray_bench.py calls it), or alone:

    python bench/ray_million.py --data ../shared/datasets/london --artifacts ARTIFACTS [--size 1000000]

Builds bench/million.py's collection (the 3,291 London map images, then generated entries), published
in --shards shards: store.publish splits it by id % shards, each shard of the kind its own size calls
for (indexer/kinds.py: fast-scan PQ codes with an exact re-rank at 500,000 entries a shard). Then:

1. In this process, on one thread: a ShardServer per shard (retrieval/shards.py, what a Ray shard
   replica runs) and a head over them (LocalShards) answer the London test queries as POST /search
   does (retrieval/query.py: search_image); then each shard's search stage, ShardServer.search, is
   timed over the queries' embeddings, the shards in turns, at the depth the head asks of them
   (max(k, verify.n, expand.pool): 200 for the presets that expand) and at k=10.
2. A local Ray cluster of 2 nodes on loopback: `imgsearch serve --engine ray` (--replicas ingress
   replicas, one replica a shard: each replica loads its shard) answers the same queries through
   POST /search, one client: a warm-up pass, then a timed one.
3. Ray stopped, the embedded `imgsearch serve --workers N` on the same version, alike.

What Ray's answers must equal (`million_same_top10`): the in-process head over the same shard files,
which runs the very code and files each Ray replica runs, so any difference from it is Ray's. The
embedded service, which loads the sharded version whole, searches each shard with its own codes and
merges the answers alike (indexer/kinds.py: PartsIndex); its agreement is reported too
(`million_same_top10_embedded_service`, `embedded_service_same_top10_as_in_process`).

Reports: the build's times (generate_s, index_build_s: the whole collection's index, which publish
splits; publish_s: the split, each shard's own index, and the writes), the shards' index kinds and
sizes, `million_search_ms` (each shard's search-stage p50 in this process, shardN_p50, and in its Ray
replica during the timed pass, ray_shardN_p50: the replica's own time for the call as Serve logs it,
without the way there and back; the HTTP p50 of POST /search through Ray and through the embedded
service, and the embedded one's logged search stage), and each service's figures.
--work is removed afterwards unless --keep (~8 GB at a million).
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: nodes on 127.0.0.1

import argparse
import contextlib
import functools
import gc
import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# bench/ is sys.path[0] for these scripts
import harness
import httpx
import live_server as server
import million
import numpy as np
from london import add_arguments, analysed_queries, open_london

from common.threads import single_threaded
from retrieval.query import search_image
from retrieval.searcher import Hit, Searcher
from retrieval.shards import LocalShards, ShardServer, head_index

ROOT = Path(__file__).resolve().parents[1]
K = 10
READY_TIMEOUT_S = 900  # a million entries: generous for a cold page cache
# Ray's default object store is 30% of RAM a node; nothing large travels through it here.
OBJECT_STORE_BYTES = 512 * 2**20


class NoLondonIndex(RuntimeError):
    """The London data or its built index does not open (open_london said why on stderr)."""


class DepthsAsked(LocalShards):
    """LocalShards that note the k each search asks of the shards: the depth the head searches at."""

    def __init__(self, servers: list[ShardServer]) -> None:
        super().__init__(servers)
        self.depths: set[int] = set()

    def search(self, version: str, embedding: np.ndarray, k: int) -> list[Hit]:
        self.depths.add(k)
        return super().search(version, embedding, k)


def in_process(family: Path, shards: int, files: list[Path], embeddings: list[np.ndarray]) -> dict[str, Any]:
    """The head's answers over ShardServers in this process, and each shard's search stage, on one
    thread (as a shard replica searches: single-threaded kernels)."""
    servers = [ShardServer(family, s, shards) for s in range(shards)]
    client = DepthsAsked(servers)
    head = head_index(family, shards, client).load_now()
    version = head.version
    with single_threaded():
        answers, head_ms = [], []
        for f in files:
            timings: dict[str, float] = {}
            answers.append([h.id for h in search_image(head, f.read_bytes(), K, timings=timings).hits])
            head_ms.append(1000 * timings["search"])
        if len(client.depths) != 1:
            raise RuntimeError(f"the head asked the shards for depths {sorted(client.depths)}, not one")
        depth = client.depths.pop()
        stage: dict[str, Any] = {"k": depth}
        for k, name in ((depth, ""), (K, "_k10")):
            calls = {f"shard{s}": functools.partial(srv.search, version, k=k) for s, srv in enumerate(servers)}
            took = harness.in_turns(calls, embeddings, rounds=3, warmup=5)
            stage |= {f"{n}_p50{name}": t.ms(50) for n, t in took.items()}
    sizes = [srv.at(version).size for srv in servers]
    kinds = head.loaded.manifest["index_kinds"]
    return {
        "answers": answers,
        "version": version,
        "search_ms": stage | {"per_shard_entries": sizes, "in_process_head_p50": round(float(np.median(head_ms)), 3)},
        "index_kinds": kinds,
        "per_shard_entries": sizes,
    }


@contextlib.contextmanager
def ray_cluster(nodes: int = 2, cpus: int = 2) -> Iterator[tuple[str, list[Path]]]:
    """A local Ray cluster of `nodes` nodes on loopback (as bench/ray_bench.py's); yields its address
    and its nodes' log folders."""
    from ray.cluster_utils import Cluster

    node: dict[str, Any] = {"num_cpus": cpus, "object_store_memory": OBJECT_STORE_BYTES}
    c = Cluster(initialize_head=True, head_node_args=node | {"include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            c.add_node(**node)
        c.wait_for_nodes()
        if not c.address.startswith("127.0.0.1:"):
            raise RuntimeError(f"the Ray cluster is not on loopback: {c.address}")
        logs = {Path(n.get_logs_dir_path()) for n in [c.head_node, *c.worker_nodes]}
        yield c.address, sorted(logs)
    finally:
        c.shutdown()


# A Serve replica's access log line: "INFO <date> <time> <app>_<deployment> <replica> <request> -- <call>
# <status> <ms>ms"
_ACCESS = re.compile(r"^\S+ (\S+ \S+) \S+ \S+ \S+ -- (.+) (OK|\d{3}) ([\d.]+)ms$")


def replica_call_ms(logs: list[Path], deployment: str, call: str, n: int) -> list[float]:
    """The last n durations (ms) of `call` that the replicas of `deployment` logged (Serve's own log
    files: the driver's copy of them is deduplicated), oldest first. What a replica spends on a call:
    the method and Serve's handling of it in the replica, not the way there and back."""
    from cluster.serving import APP_NAME

    found = []
    for folder in logs:
        for f in (folder / "serve").glob(f"replica_{APP_NAME}_{deployment}_*.log"):
            for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                m = _ACCESS.match(line)
                if m is not None and m.group(2) == call and m.group(3) in ("OK", "200"):
                    found.append((m.group(1), float(m.group(4))))
    if len(found) < n:
        raise RuntimeError(f"{deployment}'s replicas logged {len(found)} calls of {call!r}, not {n}")
    return [ms for _, ms in sorted(found)[-n:]]


def _top(c: httpx.Client, url: str, data: bytes) -> list[int]:
    r = c.post(f"{url}/search", params={"k": K}, files={"file": ("q.jpg", data)})
    if r.status_code != 200:
        raise RuntimeError(f"POST /search answered {r.status_code}: {r.text[:200]}")
    return [h["id"] for h in r.json()["results"]]


def _lines(path: Path) -> int:
    with path.open(encoding="utf-8", errors="replace") as f:
        return sum(1 for _ in f)


def replica_rss_mb() -> dict[str, float]:
    """Resident memory of this process's Ray Serve replicas, by their process title."""
    out: dict[str, float] = {}
    for pid in server.process_tree(os.getpid()):
        with contextlib.suppress(OSError):
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if title.startswith("ray::ServeReplica:"):
                name = title.removeprefix("ray::ServeReplica:").split(":")[-1].split()[0].split(".")[0]
                out[f"{name}-{pid}"] = server.rss_mb(pid)
    return out


def served(
    name: str,
    env: dict[str, str],
    args: list[str],
    files: list[Path],
    workers: int,
    work: Path,
    ray_logs: list[Path] | None = None,
    shards: int = 0,
) -> dict[str, Any]:
    """`imgsearch serve *args`: every query once untimed (each replica or worker answers, the rows the
    queries re-rank are read), then once timed, one client; the answers of the timed pass. On Ray
    (`ray_logs`: the cluster's log folders), also each shard replica's time for its search calls of the
    timed pass, and the ingress replica's for POST /search."""
    log_path = work / f"{name}.log"
    ray = ray_logs is not None
    # Ray Serve takes longer to stop its replicas.
    with open(log_path, "wb") as log, server.serving(env, args, log=log, stop_timeout=60 if ray else 30) as srv:
        ready_s = server.wait_ready(srv.url, srv.proc, srv.t0, workers, timeout=READY_TIMEOUT_S)
        loaded_s = None if ray else server.wait_loaded(log_path, srv.proc, srv.t0, workers, timeout=READY_TIMEOUT_S)
        with httpx.Client(timeout=120) as c:
            warm = [_top(c, srv.url, f.read_bytes()) for f in files]
            first = _lines(log_path)
            took, answers = [], []
            for f in files:
                seconds, _, ids = harness.clock(lambda data: _top(c, srv.url, data), f.read_bytes())
                took.append(1000 * seconds)
                answers.append(ids)
        memory = replica_rss_mb() if ray else {"rss_mb": server.tree_rss_mb(srv.proc.pid)}
    out: dict[str, Any] = {
        "answers": answers,
        "ready_s": round(ready_s, 2),
        "http_p50_ms": round(float(np.median(took)), 2),
        "same_answers_warm_and_timed": f"{sum(a == b for a, b in zip(warm, answers, strict=True))}/{len(files)}",
    }
    if loaded_s is not None:
        out["all_workers_ready_s"] = round(loaded_s, 2)
        # The stages each request logged (the Ray replicas' logs have no such lines).
        stages = million.log_stages(log_path, first)
        out["stages_p50_ms"] = {s: round(float(np.median(v)), 2) for s, v in stages.items()}
    if ray_logs is not None:
        n = len(files)
        for s in range(shards):
            out[f"shard{s}_search_call_p50_ms"] = round(
                float(np.median(replica_call_ms(ray_logs, f"Shard{s}", "CALL search", n))), 2
            )
        out["ingress_post_search_p50_ms"] = round(
            float(np.median(replica_call_ms(ray_logs, "Ingress", "POST /", n))), 2
        )
    return out | ({"rss_mb_by_replica": memory} if ray else memory)


def same(a: list[list[int]], b: list[list[int]]) -> str:
    return f"{sum(x == y for x, y in zip(a, b, strict=True))}/{len(a)}"


def ray_million(
    london_data: Path,
    artifacts: Path,
    preset: str,
    size: int,
    queries: int,
    work: Path,
    keep: bool,
    *,
    shards: int = 2,
    replicas: int = 1,
    workers: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """The collection of `size` entries in `shards` shards, built in `work`, served by Ray and by the
    embedded engine in turn (module docstring); raises NoLondonIndex if the London index is not built."""
    args = argparse.Namespace(
        data=london_data,
        artifacts=artifacts,
        preset=preset,
        size=size,
        per_place=20,
        spread=1.0,
        seed=seed,
        keypoints=64,
        generated_queries=1,  # no recall figures here: the generator's queries go unused
        work=work,
    )
    opened = open_london(args, "ray_million")
    if opened is None:
        raise NoLondonIndex(f"no London index of preset {preset} in {artifacts}")
    ds, london = opened
    _, files, analysed = analysed_queries(Searcher(london), ds, "test", queries)
    embeddings = [q.embedding for q in analysed]
    n_real = len(london.images)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        data, version, xb, _, build = million.build_collection(args, london, shards)
        build["build_total_s"] = round(time.perf_counter() - t0, 1)
        print(f"collection: {json.dumps(build)}", flush=True)
        del xb, london, analysed  # the vectors' 4 GB at a million, before anything is loaded
        gc.collect()
        local = in_process(version.parent, shards, files, embeddings)
        print(f"in process: {json.dumps(local['search_ms'])}", flush=True)
        gc.collect()  # the shards' mappings, before the servers load them again
        env = os.environ | {
            "IMGSEARCH_DATA": str(data),
            "IMGSEARCH_ARTIFACTS": str(work / "artifacts"),
            "IMGSEARCH_PRESET": preset,
            "IMGSEARCH_LOG_FORMAT": "json",
        }
        runs: dict[str, dict[str, Any]] = {}
        with ray_cluster() as (address, logs):
            ray_args = ["--engine", "ray", "--address", address, "--replicas", str(replicas), "--shard-replicas", "1"]
            runs["ray"] = served("ray", env, ray_args, files, replicas, work, logs, shards)
        print(f"ray: {json.dumps({k: v for k, v in runs['ray'].items() if k != 'answers'})}", flush=True)
        runs["embedded"] = served("embedded", env, ["--workers", str(workers)], files, workers, work)
        print(f"embedded: {json.dumps({k: v for k, v in runs['embedded'].items() if k != 'answers'})}", flush=True)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    ray_answers, embedded = runs["ray"].pop("answers"), runs["embedded"].pop("answers")
    search_ms = local["search_ms"] | {
        "ray_http_p50": runs["ray"]["http_p50_ms"],
        "embedded_http_p50": runs["embedded"]["http_p50_ms"],
    }
    for s in range(shards):
        search_ms[f"ray_shard{s}_p50"] = runs["ray"][f"shard{s}_search_call_p50_ms"]
    if "search" in runs["embedded"]["stages_p50_ms"]:
        search_ms["embedded_search_stage_p50"] = runs["embedded"]["stages_p50_ms"]["search"]
    return {
        "n": size,
        "real_map_images": n_real,
        "shards": shards,
        "queries": len(files),
        "index_version": local["version"],
        "index_kinds": local["index_kinds"],
        "per_shard_entries": local["per_shard_entries"],
        **build,
        "million_same_top10": same(ray_answers, local["answers"]),
        "million_same_top10_embedded_service": same(ray_answers, embedded),
        "embedded_service_same_top10_as_in_process": same(embedded, local["answers"]),
        "million_search_ms": search_ms,
        "ray": {"replicas": replicas, "shard_replicas": 1, **runs["ray"]},
        "embedded": {"workers": workers, **runs["embedded"]},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--size", type=int, default=1_000_000, help="map entries in the collection (default 1,000,000)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--queries", type=int, default=100, help="test-split queries sent (default 100)")
    p.add_argument("--replicas", type=int, default=1, help="Ray ingress replicas (default 1)")
    p.add_argument("--workers", type=int, default=1, help="embedded workers (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench-ray-1m", help="the collection's folder")
    p.add_argument("--keep", action="store_true", help="keep --work afterwards")
    args = p.parse_args(argv)
    if args.size < 10_000 or min(args.shards, args.replicas, args.workers) < 1 or args.queries < 5:
        p.error("--size >= 10000; --shards, --replicas, --workers >= 1; --queries >= 5")
    try:
        out = ray_million(
            args.data,
            args.artifacts,
            args.preset,
            args.size,
            args.queries,
            args.work,
            args.keep,
            shards=args.shards,
            replicas=args.replicas,
            workers=args.workers,
            seed=args.seed,
        )
    except NoLondonIndex:
        return 2
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
