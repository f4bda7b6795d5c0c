"""The service under measurement: `imgsearch serve` on a free loopback port, waited for and stopped;
what /proc says of its processes (tree, CPU time, RSS, PSS); and wrk, the HTTP load generator."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WRK_LUA = ROOT / "bench" / "wrk_search.lua"
WRK_HINT = "wrk is not installed: apt-get install -y wrk (Debian), or run `make bench` as root"


# --- processes ------------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (uvicorn's supervisor and its worker processes)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def _status_mb(path: str, key: str) -> float:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def rss_mb(pid: int) -> float:
    return _status_mb(f"/proc/{pid}/status", "VmRSS:")


def pss_mb(pid: int) -> float:
    """Proportional set size: private memory plus a share of the pages mapped with others, so that
    the index files the workers map count once over the tree, not once per worker as in RSS."""
    return _status_mb(f"/proc/{pid}/smaps_rollup", "Pss:")


def tree_rss_mb(pid: int) -> float:
    """Resident memory of pid and all its descendants, in MB."""
    return round(sum(rss_mb(p) for p in process_tree(pid)), 1)


def stop_server(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the server (uvicorn stops its workers), SIGKILL if it has not exited in `timeout` s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- the server -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    t0: float  # perf_counter at the start

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def wait_ready(url: str, proc: subprocess.Popen, t0: float, workers: int, timeout: float = 300) -> float:
    """Seconds from start to the first /readyz = 200; then waits until several fresh connections in a
    row are ready, for servers whose replicas all start at once (Ray Serve). `imgsearch serve` starts
    its other workers once the first serves: wait_loaded, after this, waits for them."""
    ready_s, in_a_row = None, 0
    while in_a_row < 4 * workers:
        try:
            ok = httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            ok = False
        if ok and ready_s is None:
            ready_s = time.perf_counter() - t0
        in_a_row = in_a_row + 1 if ok else 0
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before it was ready")
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"the server was not ready within {timeout} s (is the index built? `make build`)")
        if not ok:
            time.sleep(0.05)
    assert ready_s is not None
    return ready_s


def wait_loaded(log_path: Path, proc: subprocess.Popen, t0: float, workers: int, timeout: float = 300) -> float:
    """Seconds from start until every worker has loaded the index: each logs "serving index" once
    (/readyz alone can be answered by the first while the others still load)."""
    while log_path.read_text(encoding="utf-8", errors="replace").count("serving index") < workers:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before every worker loaded the index")
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"not every worker loaded the index within {timeout} s")
        time.sleep(0.05)
    return time.perf_counter() - t0


@contextlib.contextmanager
def serving(
    env: Mapping[str, str],
    args: Sequence[str] = (),
    log: IO[bytes] | int = subprocess.DEVNULL,
    stop_timeout: float = 30,
) -> Iterator[Server]:
    """`imgsearch serve *args` with `env` (the caller's choice of the whole environment) on a free
    loopback port, stopped on leaving. Not waited for: wait_ready and wait_loaded time that."""
    port = free_port()
    env = dict(env) | {"IMGSEARCH_HOST": "127.0.0.1", "IMGSEARCH_PORT": str(port)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", *args], cwd=ROOT, env=env, stdout=log, stderr=log
    )
    try:
        yield Server(proc, port, t0)
    finally:
        stop_server(proc, stop_timeout)


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


# --- wrk ------------------------------------------------------------------------------------------


def wrk(url: str, image_files: Sequence[Path | str], connections: int, duration_s: int) -> dict[str, Any]:
    """One wrk run of POST /search (bench/wrk_search.lua, whose done() prints the figures as JSON)."""
    threads = min(connections, os.cpu_count() or 1)
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--timeout", "30s", "--latency"]
    cmd += ["-s", str(WRK_LUA), url, "--", *map(str, image_files)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 120, check=True).stdout
    m = re.search(r"^WRK_JSON (\{.*\})$", out, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"no summary in wrk's output:\n{out}")
    r = json.loads(m.group(1))
    s = r["socket_errors"]
    r["errors"] = r["non_2xx_3xx"] + s["connect"] + s["read"] + s["write"] + s["timeout"]
    return r


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
        return out | dict.fromkeys(("p50_ms", "p90_ms", "p99_ms", "mean_ms", "max_ms"), float("nan"))
    q = np.concatenate([np.asarray(r["quantiles_ms"], float) for r in runs])
    w = np.concatenate([np.full(len(r["quantiles_ms"]), r["requests"] / len(r["quantiles_ms"])) for r in runs])
    order = np.argsort(q, kind="stable")
    q, cdf = q[order], np.cumsum(w[order]) / w.sum()
    for name, p in (("p50_ms", 0.50), ("p90_ms", 0.90), ("p99_ms", 0.99)):
        out[name] = float(q[min(int(np.searchsorted(cdf, p - 1e-9)), len(q) - 1)])
    out["mean_ms"] = sum(r["mean_ms"] * r["requests"] for r in runs) / n
    out["max_ms"] = max(r["max_ms"] for r in runs)
    return out
