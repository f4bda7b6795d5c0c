#!/usr/bin/env python3
"""The benchmark suite (issue 4): query latency in-process and over HTTP, throughput under load,
index build speed-up with cores, and FAISS index choices at 100k / 1M vectors.

    python bench/run.py --data ../shared/datasets/london [--server-workers 1 2 3] [--skip-ann]

Measures, on the held-out test queries of the served index:
- inproc_floor_ms: median time of the query pipeline (decode, features, encode, search, verify) in
  this process, with each stage's median (stages_ms);
- http_p50_ms_c1 / http_p99_ms_c1 / rps_c1, rps_c8 / http_p99_ms_c8 and errors: POST /search over
  loopback, driven by wrk (Debian package `wrk`, script bench/wrk_search.lua) with 1 and 8
  connections, for each number of uvicorn workers in --server-workers (the headline figures are the
  configured default's, IMGSEARCH_WORKERS), each against the in-process floor measured again just
  before that server starts (inproc_floor_ms_before: the host's speed drifts over the run);
- rss_mb and pss_mb of the server (all its processes) after the load, and ready_s from start to /readyz = 200;
- index_build_s / index_build_speedup: bench/index_build.py with every core, and with one worker
  pinned to one core;
- ann: bench/ann.py (generated vectors of the encoder's dimension);
- served_1m: bench/million.py (a million map entries served through POST /search).
Writes bench/results.json and the table between the markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

# bench/london.py, bench/procstat.py: bench/ is sys.path[0] for these scripts
import london
import numpy as np
from procstat import cpu_seconds, process_tree, pss_mb, rss_mb, stop_server

from app.core.config import Settings
from common.clock import utc_timestamp
from common.presets import confs
from common.threads import single_threaded_kernels
from dataset.layout import DatasetError, load_dataset
from dataset.split import load_split
from features.decode import ImageDecodeError
from features.orb import NoKeypointsError
from indexer import store
from retrieval.query import STAGES, search_image, warm_up
from retrieval.searcher import Searcher

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
WRK_HINT = "wrk is not installed: apt-get install -y wrk (Debian), or run `make bench` as root"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_searcher(settings: Settings) -> Searcher:
    """The served index version, loaded as the service loads it (without importing the app)."""
    family = store.index_family(settings.artifacts, settings.data_root, settings.preset)
    return Searcher(store.load(store.current_version(family)))


def machine() -> dict[str, Any]:
    model, cpu = "unknown", {}
    # Hosts of one model name differ (exact search of 1M vectors took 437 ms on one "AMD EPYC" and 180
    # on another): the family, model number, clock and cache tell them apart.
    keys = {
        "model name": "model",
        "cpu family": "family",
        "model": "model_number",
        "cpu MHz": "mhz",
        "cache size": "cache",
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in keys and keys[key.strip()] not in cpu:
                cpu[keys[key.strip()]] = value.strip()
            if not line.strip():  # the first processor's block is enough
                break
    model = cpu.pop("model", model)
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": model,
        "cpu_details": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
    }


# --- in-process -----------------------------------------------------------------------------------


def inprocess(settings: Settings, images: list[bytes]) -> dict[str, Any]:
    single_threaded_kernels()  # as every `imgsearch serve` worker runs it
    searcher = load_searcher(settings)
    warm_up(searcher)  # as the service does before it is ready
    for data in images[:5]:  # and a few real queries: first calls allocate
        with contextlib.suppress(ImageDecodeError, NoKeypointsError):
            search_image(searcher, data, 10)
    totals, cpu, stages = [], [], {s: [] for s in STAGES}
    for data in images:
        t: dict[str, float] = {}
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            search_image(searcher, data, 10, timings=t)
        except (ImageDecodeError, NoKeypointsError):
            continue
        totals.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)  # single-threaded kernels: all the work is in this thread
        for s in STAGES:
            stages[s].append(t.get(s, 0.0))
    return {
        "inproc_floor_ms": round(1000 * float(np.median(totals)), 2),
        "inproc_floor_cpu_ms": round(1000 * float(np.median(cpu)), 2),
        "stages_ms": {s: round(1000 * float(np.median(v)), 2) for s, v in stages.items()},
    }


def floor_versus(settings: Settings, baseline: str, images: list[bytes]) -> dict[str, Any]:
    """The in-process floor of the preset against another preset's, one query of each in turn over
    the same images (machines and minutes differ, so only a ratio within one run means anything)."""
    single_threaded_kernels()
    pair = {name: load_searcher(settings.model_copy(update={"preset": name})) for name in (settings.preset, baseline)}
    for s in pair.values():
        warm_up(s)
    totals: dict[str, list[float]] = {name: [] for name in pair}
    for data in images:
        for name, s in pair.items():
            t0 = time.perf_counter()
            try:
                search_image(s, data, 10)
            except (ImageDecodeError, NoKeypointsError):
                continue
            totals[name].append(time.perf_counter() - t0)
    ms = {name: round(1000 * float(np.median(v)), 2) for name, v in totals.items()}
    return {
        "baseline": baseline,
        "baseline_ms": ms[baseline],
        "preset_ms": ms[settings.preset],
        "ratio": round(ms[settings.preset] / ms[baseline], 3),
    }


# --- HTTP -------------------------------------------------------------------------------------------


def wrk(url: str, image_files: list[Path], connections: int, duration_s: int) -> dict[str, Any]:
    """One wrk run; its Lua done() prints the figures as JSON."""
    threads = min(connections, os.cpu_count() or 1)
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--timeout", "30s", "--latency"]
    cmd += ["-s", str(BENCH / "wrk_search.lua"), url, "--", *map(str, image_files)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 120, check=True).stdout
    m = re.search(r"^WRK_JSON (\{.*\})$", out, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"no summary in wrk's output:\n{out}")
    r = json.loads(m.group(1))
    s = r["socket_errors"]
    r["errors"] = r["non_2xx_3xx"] + s["connect"] + s["read"] + s["write"] + s["timeout"]
    return r


def wait_ready(url: str, proc: subprocess.Popen, t0: float, server_workers: int, timeout: float = 300) -> float:
    """Seconds from start to the first /readyz = 200; then waits until several fresh connections in a
    row are ready, for servers whose replicas all start at once (bench/ray_bench.py). `imgsearch serve`
    starts its other workers once the first serves: wait_loaded, after this, waits for them."""
    ready_s, in_a_row = None, 0
    while in_a_row < 4 * server_workers:
        try:
            ok = httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            ok = False
        if ok and ready_s is None:
            ready_s = time.perf_counter() - t0
        in_a_row = in_a_row + 1 if ok else 0
        if proc.poll() is not None or time.perf_counter() - t0 > timeout:
            raise RuntimeError("server did not become ready")
        if not ok:
            time.sleep(0.05)
    assert ready_s is not None
    return ready_s


def wait_loaded(log_path: Path, proc: subprocess.Popen, t0: float, server_workers: int, timeout: float = 300) -> float:
    """Seconds from start until every worker has loaded the index: each logs "serving index" once
    (`imgsearch serve` starts the others once the first serves, so /readyz alone can be answered by
    the first while the others still load)."""
    while log_path.read_text(encoding="utf-8", errors="replace").count("serving index") < server_workers:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before every worker loaded the index")
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"not every worker loaded the index within {timeout} s")
        time.sleep(0.05)
    return time.perf_counter() - t0


PHASES = 2  # runs of each connection count in serve_and_load, taking turns


def wait_idle(pids: list[int], window_s: float = 0.25, timeout_s: float = 30) -> None:
    """Until these processes use less than a tenth of a core over window_s (the requests a load
    generator left behind are done); RuntimeError if they never do within timeout_s."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        before = cpu_seconds(pids)
        time.sleep(window_s)
        if cpu_seconds(pids) - before < 0.1 * window_s:
            return
    raise RuntimeError(f"the server was still busy {timeout_s} s after the load stopped")


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary of several wrk runs at the same connection count: counts summed, rps over the
    summed duration, latency percentiles from the runs' half-percent quantiles, each weighted by its
    run's requests (exact for one run; for several, to the half percent)."""
    if not runs:
        raise ValueError("no wrk runs to merge")
    n = sum(r["requests"] for r in runs)
    out: dict[str, Any] = {
        "requests": n,
        "duration_s": sum(r["duration_s"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "statuses": dict(sum((Counter(r["statuses"]) for r in runs), Counter())),
    }
    out["rps"] = n / out["duration_s"] if out["duration_s"] > 0 else 0.0
    if n == 0:
        nan = float("nan")
        return out | {"p50_ms": nan, "p90_ms": nan, "p99_ms": nan, "mean_ms": nan, "max_ms": nan}
    q = np.concatenate([np.asarray(r["quantiles_ms"], float) for r in runs])
    w = np.concatenate([np.full(len(r["quantiles_ms"]), r["requests"] / len(r["quantiles_ms"])) for r in runs])
    order = np.argsort(q, kind="stable")
    q, cdf = q[order], np.cumsum(w[order]) / w.sum()
    for name, p in (("p50_ms", 0.50), ("p90_ms", 0.90), ("p99_ms", 0.99)):
        out[name] = float(q[min(int(np.searchsorted(cdf, p - 1e-9)), len(q) - 1)])
    out["mean_ms"] = sum(r["mean_ms"] * r["requests"] for r in runs) / n
    out["max_ms"] = max(r["max_ms"] for r in runs)
    return out


def serve_and_load(settings: Settings, image_files: list[Path], server_workers: int, duration_s: int) -> dict[str, Any]:
    port = free_port()
    env = os.environ | {
        "IMGSEARCH_DATA": str(settings.data_root),
        "IMGSEARCH_ARTIFACTS": str(settings.artifacts),
        "IMGSEARCH_PRESET": settings.preset,
        "IMGSEARCH_PORT": str(port),
        "IMGSEARCH_WORKERS": str(server_workers),
        "IMGSEARCH_LOG_FORMAT": "json",
    }
    log = tempfile.NamedTemporaryFile(prefix="imgsearch-bench-", suffix=".log")  # noqa: SIM115 (closed below)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve"], cwd=ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        ready_s = wait_ready(url, proc, t0, server_workers)
        all_ready_s = wait_loaded(Path(log.name), proc, t0, server_workers)
        # Warm-up, checked: every worker answers real searches before anything is timed.
        with httpx.Client(timeout=60) as c:
            for f in image_files[: 4 * server_workers]:
                r = c.post(f"{url}/search", params={"k": 10}, files={"file": ("q.jpg", f.read_bytes())})
                if r.status_code != 200 or not r.json()["results"]:
                    raise RuntimeError(f"warm-up search failed: {r.status_code} {r.text[:200]}")
        pids = process_tree(proc.pid)
        # The host's speed drifts over minutes: 1 and 8 connections take turns (PHASES runs each,
        # duration_s in all), so that their ratio compares the same stretch of time.
        runs: dict[int, list[dict[str, Any]]] = {1: [], 8: []}
        cpu = {1: 0.0, 8: 0.0}
        for _ in range(PHASES):
            for connections in runs:
                # wrk stops with requests still in the server: their work must not count in the next run.
                wait_idle(pids)
                before = cpu_seconds(pids)
                runs[connections].append(wrk(url, image_files, connections, max(1, round(duration_s / PHASES))))
                cpu[connections] += cpu_seconds(pids) - before
        wait_idle(pids)
        c1, c8 = merge_runs(runs[1]), merge_runs(runs[8])
        pids = process_tree(proc.pid)
        rss = {p: rss_mb(p) for p in pids}
        pss = {p: pss_mb(p) for p in pids}
        return {
            "server_workers": server_workers,
            "http_p50_ms_c1": round(c1["p50_ms"], 2),
            "http_p99_ms_c1": round(c1["p99_ms"], 2),
            "rps_c1": round(c1["rps"], 2),
            # Server CPU per request (all its processes): what HTTP costs on top of the in-process
            # CPU time, even when other jobs stretch the wall times.
            "server_cpu_ms_per_request_c1": round(1000 * cpu[1] / max(c1["requests"], 1), 2),
            "server_cpu_ms_per_request_c8": round(1000 * cpu[8] / max(c8["requests"], 1), 2),
            "http_p50_ms_c8": round(c8["p50_ms"], 2),
            "http_p99_ms_c8": round(c8["p99_ms"], 2),
            "rps_c8": round(c8["rps"], 2),
            "requests_c1": c1["requests"],
            "requests_c8": c8["requests"],
            "errors_c1": c1["errors"],
            "errors_c8": c8["errors"],
            "statuses_c1": c1["statuses"],
            "statuses_c8": c8["statuses"],
            "rss_mb": round(sum(rss.values()), 1),
            "rss_mb_by_process": sorted(rss.values(), reverse=True),
            # Pages the workers share (memory-mapped encoder and keypoints) count once here.
            "pss_mb": round(sum(pss.values()), 1),
            "ready_s": round(ready_s, 2),
            "all_workers_ready_s": round(all_ready_s, 2),
        }
    finally:
        stop_server(proc)
        log.close()


# --- index build and ANN (subprocesses) --------------------------------------------------------------


def index_build(args: argparse.Namespace) -> dict[str, Any]:
    """All cores (one extraction process per core), then one process pinned to one core."""
    cores = os.cpu_count() or 1
    runs = {}
    for jobs, cpus in ((cores, None), (1, {min(os.sched_getaffinity(0))})):
        cmd = [sys.executable, str(BENCH / "index_build.py"), "--data", str(args.data)]
        cmd += ["--artifacts", str(args.artifacts), "--preset", args.preset, "--jobs", str(jobs)]
        # Pinned before exec, so BLAS, OpenMP and OpenCV size their thread pools for one core.
        pin = (lambda c=cpus: os.sched_setaffinity(0, c)) if cpus else None
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, preexec_fn=pin).stdout
        m = re.search(r"^INDEX_BUILD_JSON (\{.*\})$", out, re.MULTILINE)
        if m is None:
            raise RuntimeError(f"no result from index_build.py:\n{out}")
        runs["all_cores" if cpus is None else "one_core"] = json.loads(m.group(1))
        print(f"index build, {jobs} process(es): {runs['all_cores' if cpus is None else 'one_core']}", flush=True)
    return {
        "index_build_s": runs["all_cores"]["total_s"],
        "index_build_one_core_s": runs["one_core"]["total_s"],
        "index_build_speedup": round(runs["one_core"]["total_s"] / runs["all_cores"]["total_s"], 3),
        "index_build_runs": runs,
    }


def served_1m(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH / "million.py"), "--data", str(args.data), "--artifacts", str(args.artifacts)]
    cmd += ["--preset", args.preset, "--size", str(args.served_size), "--out", str(args.out)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads(args.out.read_text(encoding="utf-8"))["served_1m"]


def ann(args: argparse.Namespace, index_dir: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH / "ann.py"), "--index-dir", str(index_dir), "--out", str(args.out)]
    cmd += ["--sizes", *map(str, args.ann_sizes)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads(args.out.read_text(encoding="utf-8"))["ann"]


# --- report ------------------------------------------------------------------------------------------


def http_floor(r: dict[str, Any]) -> float:
    """The in-process floor that HTTP p50 is compared with: the one measured just before the server
    (runs before that field existed: the floor at the start)."""
    return float(r.get("inproc_floor_ms_before", r["inproc_floor_ms"]))


def targets(r: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    out: list[tuple[str, str, bool | None]] = []
    if "floor_vs_baseline" in r:
        f = r["floor_vs_baseline"]
        text = f"{f['ratio']:.3f} x ({f['preset_ms']} ms against {f['baseline_ms']} ms, queries in turn)"
        out.append((f"inproc floor <= 1.3 x `{f['baseline']}` (issue 12)", text, f["ratio"] <= 1.3))
    if "http_p50_ms_c1" in r:
        ratio = r["http_p50_ms_c1"] / http_floor(r)
        text = f"{ratio:.3f} x"
        if r.get("inproc_floor_cpu_ms") and r.get("server_cpu_ms_per_request_c1"):
            text += f" (CPU per request: {r['server_cpu_ms_per_request_c1'] / r['inproc_floor_cpu_ms']:.3f} x)"
        out.append(("http_p50_ms_c1 <= 1.25 x inproc_floor_ms", text, ratio <= 1.25))
        gain = r["rps_c8"] / r["rps_c1"]
        errors = r["errors_c1"] + r["errors_c8"]
        out.append(("rps_c8 >= 1.7 x rps_c1, no errors", f"{gain:.2f} x, {errors} errors", gain >= 1.7 and errors == 0))
    if "index_build_speedup" in r:
        sp = r["index_build_speedup"]
        out.append(("index_build_speedup >= 1.6", f"{sp:.2f}", sp >= 1.6))
    out += lean_targets(r)
    big = r.get("ann", {}).get("sizes", {}).get("1000000")
    if big is not None:
        best = big.get("fastest_at_recall_0.95")
        text = "none" if best is None else f"{index_label(best)}: {best['p50_ms']} ms, recall {best['recall_at_10']}"
        out.append(("1M vectors: p50 <= 2 ms at recall@10 >= 0.95", text, best is not None and best["p50_ms"] <= 2))
    return out


def lean_targets(r: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """Issue 14's targets: ratios within this run."""
    out: list[tuple[str, str, bool | None]] = []
    features = r.get("stages_ms", {}).get("features")
    if features:
        ratio = r["inproc_floor_ms"] / features
        text = f"{ratio:.2f} x ({r['inproc_floor_ms']} / {features} ms)"
        out.append(("inproc floor <= 2.5 x the features stage (issue 14)", text, ratio <= 2.5))
    if "http_p50_ms_c1" in r:
        ratio = r["http_p50_ms_c1"] / http_floor(r)
        text = f"{ratio:.3f} x ({r['http_p50_ms_c1']} / {http_floor(r)} ms, the floor just before the server)"
        out.append(("http_p50_ms_c1 <= 1.1 x inproc floor (issue 14)", text, ratio <= 1.1))
        gain, errors = r["rps_c8"] / r["rps_c1"], r["errors_c1"] + r["errors_c8"]
        text = f"{gain:.2f} x, {errors} errors ({r['server_workers']} workers)"
        out.append(("rps_c8 >= 1.85 x rps_c1, no errors (issue 14)", text, gain >= 1.85 and errors == 0))
        text = f"{r['rss_mb']:.0f} MB RSS ({r['server_workers']} workers; PSS {r.get('pss_mb', '–')} MB)"
        out.append(("RSS of the serving tree <= 1.0 GB (issue 14)", text, r["rss_mb"] <= 1024))
        out.append(("ready_s <= 3 s (issue 14)", f"{r['ready_s']} s", r["ready_s"] <= 3))
    big = r.get("served_1m")
    if big:
        ratio = big["search_p50_ms"] / big["exact_p50_ms"]
        text = (
            f"search stage {big['search_p50_ms']} ms / exact {big['exact_p50_ms']} ms = 1/{1 / ratio:.0f}, "
            f"recall@10 {big['recall_at_10']} (London queries: {big['recall_at_10_london_queries']})"
        )
        ok = ratio <= 0.01 and big["recall_at_10"] >= 0.95
        out.append((f"{big['n']:,} served: search <= 1/100 exact at recall@10 >= 0.95 (issue 14)", text, ok))
        text = f"{big['rss_mb']:.0f} MB ({big['workers']} workers), ready in {big['ready_s']} s"
        out.append((f"{big['n']:,} served: RSS <= 6 GB (issue 14)", text, big["rss_mb"] <= 6144))
    return out


def index_label(row: dict[str, Any]) -> str:
    params = ", ".join(f"{k} {row[k]}" for k in ("nlist", "nprobe", "k_factor", "M", "efSearch") if k in row)
    return f"{row['index']} ({params})" if params else row["index"]


def markdown(r: dict[str, Any]) -> str:
    lines = ["| measure | value |", "|---|---|"]
    rows: list[tuple[str, Any]] = [
        ("preset", f"`{r['preset']}`"),
        ("queries (held-out test areas)", r["queries"]),
        ("inproc_floor_ms (median)", r["inproc_floor_ms"]),
        ("in-process CPU ms per query (median)", r.get("inproc_floor_cpu_ms", "–")),
        *((f"stages_ms.{s} (median)", v) for s, v in r["stages_ms"].items()),
    ]
    if "floor_vs_baseline" in r:
        f = r["floor_vs_baseline"]
        rows += [
            (f"floor of `{f['baseline']}`, queries in turn (median ms)", f["baseline_ms"]),
            (f"floor of `{r['preset']}`, same run (median ms)", f["preset_ms"]),
            ("floor ratio (preset / baseline)", f["ratio"]),
        ]
    if "http_p50_ms_c1" in r:
        rows += [
            ("uvicorn workers (IMGSEARCH_WORKERS)", r["server_workers"]),
            ("http_p50_ms_c1", r["http_p50_ms_c1"]),
            ("http_p99_ms_c1", r["http_p99_ms_c1"]),
            ("in-process floor just before the server (median ms)", http_floor(r)),
            ("HTTP p50 / that floor", round(r["http_p50_ms_c1"] / http_floor(r), 3)),
            ("server CPU ms per request, 1 connection", r.get("server_cpu_ms_per_request_c1", "–")),
            ("rps_c1", r["rps_c1"]),
            ("rps_c8", r["rps_c8"]),
            ("rps_c8 / rps_c1", round(r["rps_c8"] / r["rps_c1"], 2)),
            ("http_p99_ms_c8", r["http_p99_ms_c8"]),
            ("errors, non-2xx or socket (1 / 8 connections)", f"{r['errors_c1']} / {r['errors_c8']}"),
            ("rss_mb (all server processes, after the load)", r["rss_mb"]),
            ("pss_mb (the same, shared pages counted once)", r.get("pss_mb", "–")),
            ("ready_s (start to /readyz)", r["ready_s"]),
            ("every worker loaded, s from start", r.get("all_workers_ready_s", "–")),
        ]
    if "index_build_s" in r:
        rows += [
            (f"index_build_s ({r['index_build_runs']['all_cores']['images']} map images)", r["index_build_s"]),
            ("index build, one core, s", r["index_build_one_core_s"]),
            ("index_build_speedup", r["index_build_speedup"]),
        ]
    lines += [f"| {a} | {b} |" for a, b in rows]
    if len(r.get("http_by_workers", [])) > 1:
        lines += [
            "",
            "By uvicorn workers (same run):",
            "",
            "| workers | floor ms just before | p50 ms c1 | p99 ms c1 | rps c1 | rps c8 | rps c8/c1 | p99 ms c8 "
            "| errors | server CPU ms/req c1, c8 | RSS MB (each) | PSS MB | ready s (first / every worker) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for h in r["http_by_workers"]:
            per = " + ".join(f"{v:.0f}" for v in h["rss_mb_by_process"])
            lines.append(
                f"| {h['server_workers']} | {h.get('inproc_floor_ms_before', '–')} | {h['http_p50_ms_c1']} | "
                f"{h['http_p99_ms_c1']} | {h['rps_c1']} | "
                f"{h['rps_c8']} | {h['rps_c8'] / h['rps_c1']:.2f} | {h['http_p99_ms_c8']} | "
                f"{h['errors_c1'] + h['errors_c8']} | {h['server_cpu_ms_per_request_c1']}, "
                f"{h['server_cpu_ms_per_request_c8']} | {h['rss_mb']} ({per}) | {h.get('pss_mb', '–')} | "
                f"{h['ready_s']} / {h.get('all_workers_ready_s', '–')} |"
            )
    for n, size in r.get("ann", {}).get("sizes", {}).items():
        lines += [
            "",
            f"ANN, {int(n):,} generated vectors of {r['ann']['dim']} dims ({size['queries']} queries; "
            f"p50 = one query, one thread):",
            "",
            "| index | parameters | build s | memory MB | p50 ms | p50 CPU ms | recall@10 |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in size["indexes"]:
            params = ", ".join(
                f"{k} {row[k]}" for k in ("nlist", "nprobe", "k_factor", "M", "efConstruction", "efSearch") if k in row
            )
            lines.append(
                f"| {row['index']} | {params or '–'} | {row['build_s']} | {row['memory_mb']} | {row['p50_ms']} | "
                f"{row.get('p50_cpu_ms', '–')} | {row['recall_at_10']} |"
            )
        if "hnsw_skipped" in size:
            lines += ["", size["hnsw_skipped"]]
    big = r.get("served_1m")
    if big:
        lines += [
            "",
            f"Served collection of {big['n']:,} map entries ({big['real_map_images']:,} London, the rest generated; "
            f"bench/million.py), {big['queries']} London test queries through POST /search, {big['workers']} workers:",
            "",
            "| measure | value |",
            "|---|---|",
            f"| index kind (indexer/kinds.py) | {big['index_kind']} |",
            f"| search_p50_ms (search stage, server log) | {big['search_p50_ms']} |",
            f"| exact_p50_ms (flat search of the same vectors, each just after the server answered the query) | "
            f"{big['exact_p50_ms']} |",
            f"| search / exact | {big['search_over_exact']} |",
            f"| recall_at_10 against exact (generated queries) | {big['recall_at_10']} |",
            f"| recall@10 against exact (London queries) | {big['recall_at_10_london_queries']} |",
            f"| London first-stage R@10, exact / served | {big['london_first_stage_r10_exact']} / "
            f"{big['london_first_stage_r10_served']} |",
            f"| London R@10 verified and expanded, exact / served index (in-process) | "
            f"{big['london_r10_exact_index']} / {big['london_r10_served_index']} |",
            f"| London R@10 through POST /search | {big['london_r10_through_search']} |",
            f"| stages p50 ms (server log) | {big['stages_p50_ms']} |",
            f"| HTTP p50 ms (one client) | {big['http_p50_ms']} |",
            f"| rss_mb / pss_mb (serving tree) | {big['rss_mb']} / {big['pss_mb']} |",
            f"| ready_s (first worker / every worker) | {big['ready_s']} / {big.get('all_workers_ready_s', '–')} |",
            f"| generate / index build / publish s | {big['generate_s']} / {big['index_build_s']} / "
            f"{big['publish_s']} |",
        ]
    lines += ["", "Targets (issues 4, 12, 14):", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'met' if ok else 'missed'} |" for t, m, ok in targets(r)]
    return "\n".join(lines)


def write_markdown(path: Path, r: dict[str, Any]) -> str:
    table = markdown(r)
    m = r["machine"]
    head = (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Python {m['python']}; load average "
        f"{m['load_avg_start'][0]} at the start, {m['load_avg_end'][0]} at the end; {r['created']}.\n"
        f"Command: `{r['command']}`"
    )
    if path.exists():
        text = path.read_text(encoding="utf-8")
        if BEGIN in text and END in text:
            pre, rest = text.split(BEGIN, 1)
            path.write_text(f"{pre}{BEGIN}\n{head}\n\n{table}\n{END}{rest.split(END, 1)[1]}", encoding="utf-8")
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    london.add_arguments(p)
    p.add_argument("--queries", type=int, default=200, help="held-out test queries to send (default 200)")
    p.add_argument("--duration", type=int, default=20, help="seconds of each wrk run (default 20)")
    p.add_argument(
        "--server-workers", type=int, nargs="+", default=None, help="uvicorn workers to compare (default: the setting)"
    )
    p.add_argument(
        "--floor-baseline",
        choices=sorted(confs),
        default=None,
        help="also time this preset's floor, query by query in turn with --preset (its index must be built)",
    )
    p.add_argument("--skip-http", action="store_true")
    p.add_argument("--skip-index-build", action="store_true")
    p.add_argument("--skip-ann", action="store_true")
    p.add_argument("--ann-sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--skip-served-1m", action="store_true", help="do not serve the generated 1M collection")
    p.add_argument("--served-size", type=int, default=1_000_000, help="entries of that collection (bench/million.py)")
    p.add_argument(
        "--report-only", action="store_true", help="rewrite BENCHMARKS.md from --out (e.g. after bench/ann.py)"
    )
    p.add_argument("--out", type=Path, default=BENCH / "results.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.report_only:
        try:
            result = json.loads(args.out.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            print(f"bench: cannot read {args.out}: {e}", file=sys.stderr)
            return 2
        # The headline follows the configured default, if that run is in the table.
        result |= next((h for h in result.get("http_by_workers", []) if h["server_workers"] == Settings().workers), {})
        result["targets"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in targets(result)]
        args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(write_markdown(args.markdown, result))
        return 0
    default_workers = Settings().workers
    server_workers = sorted(set(args.server_workers or []) | {default_workers})
    if args.queries < 1 or args.duration < 1 or min(server_workers) < 1:
        p.error("--queries, --duration and --server-workers must be >= 1")
    if not args.skip_http and shutil.which("wrk") is None:
        print(f"bench: {WRK_HINT}", file=sys.stderr)
        return 2
    settings = Settings(data=args.data, artifacts=args.artifacts, preset=args.preset)
    try:
        ds = load_dataset(args.data, check_files=False)
        searcher_dir = load_searcher(settings).loaded.directory
    except (DatasetError, OSError, ValueError) as e:
        print(f"bench: {e} (build the index first: imgsearch build)", file=sys.stderr)
        return 2
    rows = load_split(searcher_dir / "split.json", ds.queries.paths)["test"][: args.queries]
    files = [ds.image_path(ds.queries.paths[q]) for q in rows]
    result: dict[str, Any] = {"preset": args.preset, "queries": len(files), "index_version": searcher_dir.name}
    result["machine"] = machine()
    result["command"] = shlex.join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    result |= inprocess(settings, [f.read_bytes() for f in files])
    print(f"in-process: {result['inproc_floor_ms']} ms {result['stages_ms']}", flush=True)
    if args.floor_baseline:
        result["floor_vs_baseline"] = floor_versus(settings, args.floor_baseline, [f.read_bytes() for f in files])
        print(f"floor against {args.floor_baseline}: {json.dumps(result['floor_vs_baseline'])}", flush=True)
    if not args.skip_http:
        by_workers = []
        images = [f.read_bytes() for f in files]
        for n in server_workers:
            # The floor again just before each server: a host's speed drifts over the minutes between
            # the first floor and the last server (33 -> 45 ms on one AMD host, BENCHMARKS.md, issue
            # 14's tenth step), and HTTP p50 / floor is to compare the same stretch of time.
            before = inprocess(settings, images)["inproc_floor_ms"]
            by_workers.append(serve_and_load(settings, files, n, args.duration) | {"inproc_floor_ms_before": before})
            print(f"HTTP: {json.dumps(by_workers[-1])}", flush=True)
        result |= next(h for h in by_workers if h["server_workers"] == default_workers)
        result["http_by_workers"] = by_workers
    if not args.skip_index_build:
        result |= index_build(args)
    if not args.skip_ann:
        result["ann"] = ann(args, searcher_dir)
    elif args.out.exists():  # keep the last ANN figures (slow to remeasure) when skipped
        with contextlib.suppress(ValueError, KeyError):
            result["ann"] = json.loads(args.out.read_text(encoding="utf-8"))["ann"]
    if not args.skip_served_1m:
        # After the ANN run, which rewrites args.out: million.py adds its field to the same file.
        args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
        result["served_1m"] = served_1m(args)
    result["machine"]["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    result["created"] = utc_timestamp()
    result["targets"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in targets(result)]
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(write_markdown(args.markdown, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
