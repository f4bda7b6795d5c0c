#!/usr/bin/env python3
"""Latency benchmark of the query path, in-process and over real HTTP on loopback.

    python bench/run.py --data ../shared/datasets/london [--preset P] [--queries 200]

Measures, on the held-out test queries of the served index:
- inproc_floor_ms: median time of Searcher.search (decode, features, encode, search, verify) with
  each stage's median (stages_ms);
- http_p50_ms_c1 / http_p99_ms_c1: POST /search with one client, keep-alive;
- rps_c8 / http_p99_ms_c8 / errors_c8: 8 concurrent clients (threads), and rps_c1;
- rss_mb of the server after the load, and ready_s from process start to /readyz = 200.
Writes bench/results.json and the table between the markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from app.core.config import Settings
from app.main import load_searcher
from dataset.layout import DatasetError, load_dataset
from dataset.split import load_split
from features.decode import ImageDecodeError
from features.orb import NoKeypointsError
from pipeline.presets import confs
from pipeline.runtime import single_threaded_kernels

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("decode", "features", "encode", "search", "verify")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inprocess(settings: Settings, images: list[bytes]) -> dict:
    single_threaded_kernels()  # as `imgsearch serve` runs it
    searcher = load_searcher(settings)
    for data in images[:5]:  # warm-up: first calls allocate
        with contextlib.suppress(ImageDecodeError, NoKeypointsError):
            searcher.search(data, 10)
    totals, stages = [], {s: [] for s in STAGES}
    for data in images:
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            searcher.rank(searcher.analyze(data, t), 10, t)
        except (ImageDecodeError, NoKeypointsError):
            continue
        totals.append(time.perf_counter() - t0)
        for s in STAGES:
            stages[s].append(t.get(s, 0.0))
    return {
        "inproc_floor_ms": round(1000 * float(np.median(totals)), 2),
        "stages_ms": {s: round(1000 * float(np.median(v)), 2) for s, v in stages.items()},
    }


def http_load(url: str, images: list[bytes], clients: int, requests: int) -> dict:
    lat: list[float] = []
    errors = 0

    def worker(i: int) -> tuple[list[float], int]:
        out, bad = [], 0
        with httpx.Client(timeout=60) as c:
            for j in range(i, requests, clients):
                t0 = time.perf_counter()
                r = c.post(f"{url}/search", params={"k": 10}, files={"file": ("q.jpg", images[j % len(images)])})
                out.append(time.perf_counter() - t0)
                bad += r.status_code >= 500
        return out, bad

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for out, bad in pool.map(worker, range(clients)):
            lat += out
            errors += bad
    wall = time.perf_counter() - t0
    return {
        "p50_ms": round(1000 * float(np.percentile(lat, 50)), 2),
        "p99_ms": round(1000 * float(np.percentile(lat, 99)), 2),
        "rps": round(len(lat) / wall, 2),
        "errors": errors,
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def serve_and_load(settings: Settings, images: list[bytes], requests: int) -> dict:
    port = free_port()
    env = os.environ | {
        "IMGSEARCH_DATA": str(settings.data_root),
        "IMGSEARCH_ARTIFACTS": str(settings.artifacts),
        "IMGSEARCH_PRESET": settings.preset,
        "IMGSEARCH_PORT": str(port),
    }
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.perf_counter() - t0 > 120:
                raise RuntimeError("server did not become ready")
            time.sleep(0.05)
        ready_s = time.perf_counter() - t0
        http_load(url, images[:5], 1, 5)  # warm-up
        c1 = http_load(url, images, 1, requests)
        c8 = http_load(url, images, 8, requests)
        return {
            "http_p50_ms_c1": c1["p50_ms"],
            "http_p99_ms_c1": c1["p99_ms"],
            "rps_c1": c1["rps"],
            "rps_c8": c8["rps"],
            "http_p99_ms_c8": c8["p99_ms"],
            "errors_c1": c1["errors"],
            "errors_c8": c8["errors"],
            "rss_mb": rss_mb(proc.pid),
            "ready_s": round(ready_s, 2),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def markdown(r: dict) -> str:
    rows = [
        ("preset", f"`{r['preset']}`"),
        ("queries (held-out test areas)", r["queries"]),
        ("in-process floor, median ms", r["inproc_floor_ms"]),
        *((f"  stage {s}, median ms", v) for s, v in r["stages_ms"].items()),
        ("HTTP p50 ms, 1 client", r["http_p50_ms_c1"]),
        ("HTTP p99 ms, 1 client", r["http_p99_ms_c1"]),
        ("HTTP p50 / in-process floor", round(r["http_p50_ms_c1"] / r["inproc_floor_ms"], 3)),
        ("requests/s, 1 client", r["rps_c1"]),
        ("requests/s, 8 clients", r["rps_c8"]),
        ("HTTP p99 ms, 8 clients", r["http_p99_ms_c8"]),
        ("5xx errors (1 / 8 clients)", f"{r['errors_c1']} / {r['errors_c8']}"),
        ("server RSS after load, MB", r["rss_mb"]),
        ("start to /readyz, s", r["ready_s"]),
    ]
    return "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "london")
    p.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    p.add_argument("--preset", choices=sorted(confs), default=Settings().preset)
    p.add_argument("--queries", type=int, default=200, help="held-out test queries to send (default 200)")
    p.add_argument("--requests", type=int, default=400, help="requests per HTTP load run (default 400)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.queries < 1 or args.requests < 1:
        p.error("--queries and --requests must be >= 1")
    settings = Settings(data=args.data, artifacts=args.artifacts, preset=args.preset)
    try:
        ds = load_dataset(args.data, check_files=False)
        searcher_dir = load_searcher(settings).loaded.directory
    except (DatasetError, OSError, ValueError) as e:
        print(f"bench: {e} (build the index first: imgsearch build)", file=sys.stderr)
        return 2
    rows = load_split(searcher_dir / "split.json", ds.queries.paths)["test"][: args.queries]
    images = [ds.image_path(ds.queries.paths[q]).read_bytes() for q in rows]
    result = {"preset": args.preset, "queries": len(images), "index_version": searcher_dir.name}
    result |= inprocess(settings, images)
    result |= serve_and_load(settings, images, args.requests)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    table = markdown(result)
    print(table)
    if args.markdown.exists():
        text = args.markdown.read_text(encoding="utf-8")
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            block = f"{BEGIN}\nMachine: {result['machine']}; {result['created']}.\n\n{table}\n{END}"
            args.markdown.write_text(head + block + rest.split(END, 1)[1], encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
