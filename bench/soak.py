#!/usr/bin/env python3
"""Soak test: many concurrent requests mixing valid and hostile uploads against a real server.

    python bench/soak.py [--data DIR] [--preset P] [--requests 50000] [--clients 32]

Starts `imgsearch serve` (default preset; on ../shared/datasets/london when present, else --data),
warms it up with the same mix and concurrency, then sends --requests POST /search from --clients
threads: valid query photos and invalid uploads (random bytes, truncated JPEG, over the size cap,
GIF/HTML/SVG labelled as images, PSD and EPS headers, a progressive JPEG with thousands of scans,
empty, missing or duplicated field, bad k). Records the status counts, the number of 5xx and
transport errors (both must be 0), the RSS of the server's processes after warm-up and at the end
(the whole tree's and each worker's growth must stay under 5%), and p50/p99 latency. Records the
`soak` section of bench/results.json and the section between the soak markers in BENCHMARKS.md.
Exit status 1 when a criterion fails.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# bench/ is sys.path[0] for these scripts
import harness
import httpx
import live_server as server
import report
from live_server import process_tree, rss_mb, tree_rss_mb

from common.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
LONDON = ROOT.parent / "shared" / "datasets" / "london"
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
MAX_RSS_GROWTH = 0.05


def query_photos(data: Path, n: int) -> list[bytes]:
    q = json.loads((data / "query" / "query.json").read_text())
    paths = q["im_paths"]
    step = max(1, len(paths) // n)
    return [(data / p).read_bytes() for p in paths[::step][:n]]


def gif_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    frames = [Image.new("L", (64, 48), v) for v in (40, 200)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


Request = tuple[str, dict[str, Any]]  # (kind, httpx.post keyword arguments)


def scan_bomb(photo: bytes) -> bytes:
    """The photo as a progressive JPEG whose smallest scan repeats 3,000 times (libjpeg-turbo's
    LJT-01-003: cheap to send, minutes to decode without a scan budget)."""
    from PIL import Image

    sys.path.insert(0, str(ROOT))  # tests/images.py makes it for the tests as well
    from tests.imagegen import many_scans

    return many_scans(Image.open(io.BytesIO(photo)).convert("RGB"), 3000)


def make_request(rng: random.Random, photos: list[bytes], over_cap: int, bomb: bytes) -> Request:
    """One request of the mix: 60% valid photos, 40% spread over the invalid kinds."""
    photo = rng.choice(photos)
    r = rng.random()
    if r < 0.60:
        return "valid", {"files": {"file": ("q.jpg", photo)}, "params": {"k": rng.choice([1, 10, 50])}}
    kinds: list[Request] = [
        ("random_bytes", {"files": {"file": ("x.jpg", rng.randbytes(rng.randint(1, 200_000)), "image/jpeg")}}),
        ("truncated_jpeg", {"files": {"file": ("cut.jpg", photo[: rng.randint(1, len(photo) - 1)])}}),
        ("mutated_jpeg", {"files": {"file": ("m.jpg", mutate(photo, rng))}}),
        ("over_size_cap", {"files": {"file": ("big.jpg", b"\xff" * over_cap)}}),
        ("gif", {"files": {"file": ("a.png", gif_bytes(), "image/png")}}),
        ("html_as_png", {"files": {"file": ("x.png", b"<html><body>hi</body></html>", "image/png")}}),
        ("svg_as_png", {"files": {"file": ("x.png", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/png")}}),
        ("empty", {"files": {"file": ("e.jpg", b"")}}),
        ("missing_field", {"data": {"photo": "x"}}),
        ("duplicate_field", {"files": [("file", ("a.jpg", photo)), ("file", ("b.jpg", photo))]}),
        ("bad_k", {"files": {"file": ("q.jpg", photo)}, "params": {"k": rng.choice([0, 101, "x"])}}),
        ("psd_as_jpg", {"files": {"file": ("x.jpg", b"8BPS\x00\x01" + rng.randbytes(4000), "image/jpeg")}}),
        ("eps_as_jpg", {"files": {"file": ("x.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n" + rng.randbytes(2000))}}),
        ("scan_bomb", {"files": {"file": ("p.jpg", bomb)}}),
    ]
    # The over-cap upload is 10+ MB: keep it rare so the run measures the service, not loopback copies.
    weights = [10, 10, 10, 1, 5, 5, 5, 5, 5, 5, 5, 3, 3, 3]
    return rng.choices(kinds, weights)[0]


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 20)):
        b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


def run_load(url: str, reqs: list[Request], clients: int) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {}
    lat_all: list[float] = []
    lat_valid: list[float] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            for j in range(i, len(reqs), clients):
                kind, kw = reqs[j]
                t0 = time.perf_counter()
                try:
                    status = str(c.post("/search", **kw).status_code)
                except httpx.TransportError as e:
                    status = f"transport:{type(e).__name__}"
                dt = time.perf_counter() - t0
                with lock:
                    statuses[status] += 1
                    by_kind.setdefault(kind, Counter())[status] += 1
                    lat_all.append(dt)
                    if kind == "valid":
                        lat_valid.append(dt)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - t0

    every, valid = (harness.summarise((1000 * t for t in v), digits=1) for v in (lat_all, lat_valid))
    return {
        "requests": len(reqs),
        "wall_s": round(wall, 1),
        "rps": round(len(reqs) / wall, 2),
        "statuses": dict(sorted(statuses.items())),
        "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
        "n_5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
        "n_transport_errors": sum(n for s, n in statuses.items() if s.startswith("transport")),
        "p50_ms": every["p50_ms"],
        "p99_ms": every["p99_ms"],
        "valid_p50_ms": valid["p50_ms"],
        "valid_p99_ms": valid["p99_ms"],
    }


def _rss_at(samples: list[tuple[float, float]], fraction: float) -> float:
    """RSS at `fraction` of the load's duration."""
    t_end = samples[-1][0]
    return next(r for t, r in samples if t >= fraction * t_end)


def markdown(res: dict[str, Any]) -> str:
    kinds = "\n".join(f"| {k} | {', '.join(f'{s}: {n}' for s, n in v.items())} |" for k, v in res["by_kind"].items())
    workers = ", ".join(f"{a} → {b} MB" for a, b in res["worker_rss_mb"]) + (
        f" (largest growth {res['worker_rss_growth_max_pct']:+.1f}%; workers replaced: {res['workers_replaced']})"
    )
    rss = (
        f"{res['rss_start_mb']} MB → {res['rss_end_mb']} MB ({res['rss_growth_pct']:+.1f}%,"
        f" peak {res['rss_peak_mb']} MB; second half of the load {res['rss_growth_second_half_pct']:+.1f}%)"
    )
    return f"""## Soak (`make soak`)

{res["requests"]} POST /search from {res["clients"]} concurrent clients against `imgsearch serve`
(preset `{res["preset"]}`, data `{res["data"]}`, {res["workers"]} uvicorn worker(s), {report.describe(res["machine"])}),
mixing valid query photos (60%) and invalid uploads; written by `bench/soak.py` on {res["created"]}
(commit {res["commit"]}).

| | |
|---|---|
| wall time / throughput | {res["wall_s"]} s / {res["rps"]} requests/s |
| 5xx responses | **{res["n_5xx"]}** |
| transport errors (resets, timeouts) | {res["n_transport_errors"]} |
| server RSS after warm-up → end | {rss} |
| each child process's RSS after warm-up → end (the workers, and multiprocessing's resource tracker) | {workers} |
| latency, all requests p50 / p99 | {res["p50_ms"]} / {res["p99_ms"]} ms |
| latency, valid photos p50 / p99 | {res["valid_p50_ms"]} / {res["valid_p99_ms"]} ms |
| server alive at the end | {res["server_alive"]} |
| verdict | {"pass" if res["passed"] else "FAIL"} |

Latency here is mostly queueing: {res["clients"]} clients keep {res["machine"]["cores"]} cores saturated, so a request
waits behind the others; the unloaded latency is in the benchmark above.

Statuses by kind of request:

| kind | statuses |
|---|---|
{kinds}"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="data folder (default: London if present)")
    p.add_argument("--artifacts", type=Path, default=Path(os.environ.get("IMGSEARCH_ARTIFACTS", ROOT / "artifacts")))
    p.add_argument("--preset", default=None, help="default: the service's default preset")
    p.add_argument("--requests", type=int, default=50_000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--warmup", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=report.RESULTS)
    p.add_argument("--markdown", type=Path, default=report.MARKDOWN)
    args = p.parse_args(argv)

    from common.pipeline import DEFAULT_PRESET

    data = args.data or (LONDON if (LONDON / "database" / "database.json").is_file() else None)
    if data is None:
        p.error(f"no --data given and the London data is missing at {LONDON}")
    preset = args.preset or DEFAULT_PRESET
    started = report.started("bench/soak.py", argv)
    env = os.environ | {"IMGSEARCH_DATA": str(data), "IMGSEARCH_ARTIFACTS": str(args.artifacts)}
    env |= {"IMGSEARCH_PRESET": preset}
    env.pop("IMGSEARCH_MAX_UPLOAD_MB", None)  # the default 10 MB cap: the over-cap uploads below rely on it
    # The server's request log (about 7 MB for 20,000 requests) goes to the temp folder, not the repo.
    with (
        open(Path(tempfile.gettempdir()) / "imgsearch-soak-server.log", "wb") as log,
        server.serving(env, log=log) as srv,
    ):
        proc, url = srv.proc, srv.url
        server.wait_ready(url, proc, srv.t0, 1, timeout=600)
        rng = random.Random(args.seed)
        photos = query_photos(data, 200)
        over_cap = 10 * 1024 * 1024 + 100 * 1024
        bomb = scan_bomb(photos[0])
        warm = [make_request(rng, photos, over_cap, bomb) for _ in range(args.warmup)]
        reqs = [make_request(rng, photos, over_cap, bomb) for _ in range(args.requests)]
        print(f"warm-up: {len(warm)} requests, {args.clients} clients", flush=True)
        run_load(url, warm, args.clients)
        rss_start = tree_rss_mb(proc.pid)
        workers_start = {pid: rss_mb(pid) for pid in process_tree(proc.pid) if pid != proc.pid}
        samples = [(0.0, rss_start)]  # (seconds into the load, RSS MB)
        stop = threading.Event()
        t_load = time.monotonic()

        def sample() -> None:
            while not stop.wait(2.0):
                samples.append((time.monotonic() - t_load, tree_rss_mb(proc.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        print(f"load: {len(reqs)} requests, {args.clients} clients; RSS {rss_start:.1f} MB", flush=True)
        res = run_load(url, reqs, args.clients)
        stop.set()
        sampler.join()
        alive = proc.poll() is None and httpx.get(url + "/healthz", timeout=5).status_code == 200
        rss_end = tree_rss_mb(proc.pid) if proc.poll() is None else float("nan")
        # Each worker that lived through the load (one restarted by its supervisor would start afresh).
        workers_end = {pid: rss_mb(pid) for pid in process_tree(proc.pid) if pid in workers_start}
    growth = (rss_end - rss_start) / rss_start
    worker_growth = {pid: workers_end[pid] / workers_start[pid] - 1 for pid in workers_end}
    worst_worker = max(worker_growth.values(), default=float("nan"))
    res |= {
        "clients": args.clients,
        "workers": Settings().workers,  # what the server started with: the same environment
        "preset": preset,
        "data": data.name,
        "rss_start_mb": round(rss_start, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_peak_mb": round(max(r for _, r in samples), 1),
        "rss_growth_pct": round(100 * growth, 2),
        # Growth over the second half of the load only: a plateau (allocator arenas filled during
        # the first half) shows ~0 here, a leak keeps growing at the same rate.
        "rss_growth_second_half_pct": round(100 * (rss_end / _rss_at(samples, 0.5) - 1), 2),
        "rss_samples_mb": [[round(t), round(r, 1)] for t, r in samples[:: max(1, len(samples) // 40)]],
        "worker_rss_mb": [[round(workers_start[p], 1), round(workers_end[p], 1)] for p in sorted(workers_end)],
        "worker_rss_growth_max_pct": round(100 * worst_worker, 2),
        "workers_replaced": len(workers_start) - len(workers_end),
        "server_alive": alive,
        "criteria": {
            "n_5xx": "== 0",
            "n_transport_errors": "== 0",
            "rss_growth": f"< {MAX_RSS_GROWTH:.0%}",
            "worker_rss_growth": f"< {MAX_RSS_GROWTH:.0%} each",
        },
    }
    res["passed"] = bool(
        alive
        and res["n_5xx"] == 0
        and res["n_transport_errors"] == 0
        and growth < MAX_RSS_GROWTH
        and worst_worker < MAX_RSS_GROWTH
        and res["workers_replaced"] == 0
    )
    res = report.record("soak", started | res, args.out)["soak"]
    report.write_markdown(BEGIN, END, markdown(res), args.markdown)
    print(json.dumps(res, indent=2))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
