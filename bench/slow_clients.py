#!/usr/bin/env python3
"""The service under held connections: latency beside a thousand idle and slow clients, and how soon
the read deadlines free them.

    python bench/slow_clients.py [--data DIR] [--preset P] [--workers 1] [--held 1000] [--rounds 6]
                                 [--requests 25] [--header-timeout 10] [--body-timeout 30]

Starts `imgsearch serve` (default preset; on ../shared/datasets/london when present, else --data).

1. Held, with read deadlines long enough (600 s) that nothing is cut: in --rounds rounds, each
   measuring in turn (the order alternating, so that the host's drift falls on both alike) with no
   held connections and with --held connections opened by this process: half idle (connected,
   nothing sent), half slow (the headers of a POST /search with a Content-Length, then one body byte
   a second). Each block sends --requests GET /healthz and POST /search (a query photo of the data,
   k=10), one at a time, each on a new connection as a new client would. The held connections are
   checked open before and after each block, and the server's RSS and sockets are read.
2. Deadlines: a fresh server with --header-timeout and --body-timeout (the service's defaults unless
   given); --held connections held the same way until the server closes them, each watched.

Records the `slow_clients` section of bench/results.json and the section between the slow-clients
markers in BENCHMARKS.md.
Exit status 1 when a request failed (any answer but 200, or a transport error), a held connection
was closed or answered in phase 1, or a connection was still open at the end of phase 2; 2 for bad
arguments or an index that is not built.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import selectors
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

# bench/ is sys.path[0] for these scripts
import harness
import httpx
import live_server as server
import numpy as np
import report
from harness import ratio, summarise
from live_server import process_tree, tree_rss_mb

from common.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
LONDON = ROOT.parent / "shared" / "datasets" / "london"
BEGIN, END = "<!-- slow-clients:begin -->", "<!-- slow-clients:end -->"
SOAK_BEGIN = "<!-- soak:begin -->"
# Phase 1's deadlines: far beyond a round, so that only a fault closes a held connection.
HOLD_DEADLINE_S = 600.0
# A slow request's declared body: never finished at a byte a second, under the 10 MB upload cap.
SLOW_BODY_BYTES = 1_000_000
BOUNDARY = "slowclientsboundary"
DRIP_SLICES = 20  # the slow sockets' bytes are spread over each second, not sent in one burst
FD_HEADROOM = 64  # this process's descriptors besides the held connections


# --- pure helpers ---------------------------------------------------------------------------------


def socket_state(sock: socket.socket) -> str:
    """The connection's state: open (nothing to read), closed (EOF or reset) or answered (bytes came)."""
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return "open"
    except ConnectionError:
        return "closed"
    return "answered" if data else "closed"


def slow_headers(port: int, content_length: int) -> bytes:
    """A valid POST /search request's headers: the body follows a byte a second."""
    return (
        f"POST /search?k=10 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {content_length}\r\n\r\n"
    ).encode("ascii")


def slow_body_start() -> bytes:
    """The first bytes of the slow body: a well-formed multipart part header, then image bytes."""
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="q.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode("ascii") + b"\xff\xd8\xff"


# --- the machine and the server -------------------------------------------------------------------


def query_photo(data: Path) -> bytes:
    q = json.loads((data / "query" / "query.json").read_text())
    return (data / q["im_paths"][0]).read_bytes()


def server_sockets(pid: int) -> int:
    """Sockets the server's processes hold (the listening one, connections, pipes' socketpairs)."""
    n = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{p}/fd"):
                with contextlib.suppress(OSError):
                    n += os.readlink(fd.path).startswith("socket:")
    return n


def wait_sockets(pid: int, done: Any, timeout: float) -> int:
    """Poll the server's socket count until done(count), or timeout; returns the last count."""
    deadline = time.monotonic() + timeout
    while True:
        n = server_sockets(pid)
        if done(n) or time.monotonic() > deadline:
            return n
        time.sleep(0.2)


def server_env(data: Path, artifacts: Path, preset: str, header_s: float, body_s: float) -> dict[str, str]:
    # The service's defaults for everything else: no IMGSEARCH_* setting of the caller's shell leaks in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSEARCH_")}
    return env | {
        "IMGSEARCH_DATA": str(data),
        "IMGSEARCH_ARTIFACTS": str(artifacts),
        "IMGSEARCH_PRESET": preset,
        "IMGSEARCH_HEADER_TIMEOUT_S": f"{header_s:g}",
        "IMGSEARCH_BODY_TIMEOUT_S": f"{body_s:g}",
    }


@contextlib.contextmanager
def started_server(env: dict[str, str], workers: int, log: IO[bytes]) -> Iterator[server.Server]:
    """`imgsearch serve --workers N` on a free port, ready; stopped on leaving."""
    with server.serving(env, ["--workers", str(workers)], log) as srv:
        server.wait_ready(srv.url, srv.proc, srv.t0, 1, timeout=600)
        yield srv


# --- held connections -----------------------------------------------------------------------------


class Held:
    """n connections to the server: the first n // 2 idle, the rest slow (headers, then a body byte a
    second from a thread while `dripping`)."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.body = port, slow_body_start()
        self.idle: list[socket.socket] = []
        self.slow: list[socket.socket] = []
        self.opened_at: dict[socket.socket, float] = {}
        self.sent = 0  # body bytes dripped
        self._stop = threading.Event()
        self._dead: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        headers = slow_headers(port, SLOW_BODY_BYTES)
        try:
            for i in range(n):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                self.opened_at[s] = time.monotonic()
                if i >= n // 2:
                    s.sendall(headers)
                    self.slow.append(s)
                else:
                    self.idle.append(s)
                s.setblocking(False)
        except OSError:
            self.close()
            raise

    @property
    def all(self) -> list[socket.socket]:
        return self.idle + self.slow

    def __enter__(self) -> Held:
        self._thread = threading.Thread(target=self._drip, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drip(self) -> None:
        pos: dict[socket.socket, int] = {}
        t0 = time.monotonic()
        tick = 0
        while not self._stop.is_set():
            part = self.slow[tick % DRIP_SLICES :: DRIP_SLICES]
            for s in part:
                if s in self._dead:
                    continue
                i = pos.get(s, 0)
                byte = self.body[i : i + 1] or b"\xff"
                try:
                    s.send(byte)
                except BlockingIOError:
                    continue  # the server stopped reading: its deadline logic decides, not us
                except OSError:
                    self._dead.add(s)  # closed by the server
                    continue
                pos[s] = i + 1
                self.sent += 1
            tick += 1
            self._stop.wait(max(0.0, t0 + tick / DRIP_SLICES - time.monotonic()))

    def states(self) -> dict[str, Counter[str]]:
        return {"idle": Counter(map(socket_state, self.idle)), "slow": Counter(map(socket_state, self.slow))}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for s in self.all:
            s.close()
        self.idle, self.slow = [], []


def watch_until_closed(held: Held, limit_s: float) -> dict[socket.socket, tuple[float | None, int]]:
    """Each held connection's close time (None: still open after limit_s) and the bytes the server
    sent it before closing."""
    sel = selectors.DefaultSelector()
    for s in held.all:
        sel.register(s, selectors.EVENT_READ)
    got: dict[socket.socket, int] = dict.fromkeys(held.all, 0)
    closed: dict[socket.socket, float | None] = dict.fromkeys(held.all)
    end = time.monotonic() + limit_s
    try:
        while sel.get_map() and time.monotonic() < end:
            for key, _ in sel.select(timeout=0.5):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionError:
                    data = b""
                if data:
                    got[s] += len(data)
                    continue
                closed[s] = time.monotonic()
                sel.unregister(s)
    finally:
        sel.close()
    return {s: (closed[s], got[s]) for s in held.all}


# --- measuring ------------------------------------------------------------------------------------


class Refused(Exception):
    """A request answered otherwise than 200 (or not at all): counted, not timed."""


def measure_block(url: str, photo: bytes, n: int) -> tuple[dict[str, list[float]], dict[str, Counter[str]]]:
    """n GET /healthz and n POST /search in turns, each on a new connection: latencies (ms) of the
    200s and every outcome's count, by request."""
    outcomes: dict[str, Counter[str]] = {"healthz": Counter(), "search": Counter()}
    # Connection: close: each request connects anew, as a new client would.
    with httpx.Client(base_url=url, timeout=60, headers={"Connection": "close"}) as c:

        def ask(name: str, send: Callable[[], httpx.Response]) -> Callable[[int], None]:
            def call(_: int) -> None:
                try:
                    status = str(send().status_code)
                except httpx.TransportError as e:
                    status = f"transport:{type(e).__name__}"
                outcomes[name][status] += 1
                if status != "200":
                    raise Refused(status)

            return call

        files = {"file": ("q.jpg", photo, "image/jpeg")}
        calls = {
            "healthz": ask("healthz", lambda: c.get("/healthz")),
            "search": ask("search", lambda: c.post("/search", files=files, params={"k": 10})),
        }
        times = harness.in_turns(calls, range(n), skip=(Refused,))
    return {name: [1000 * s for s in t.wall] for name, t in times.items()}, outcomes


def warm_up(url: str, photo: bytes, pid: int, workers: int) -> None:
    """Requests until the server's RSS stops growing: a worker's first searches page in the index and
    fill its caches, and which worker a new connection lands on is the kernel's choice."""
    last = tree_rss_mb(pid)
    for _ in range(10):
        measure_block(url, photo, 3 * workers)
        now = tree_rss_mb(pid)
        if now - last < 1.0:
            return
        last = now


def n_failed(outcomes: dict[str, Counter[str]]) -> int:
    return sum(n for c in outcomes.values() for s, n in c.items() if s != "200")


def phase_held(args: argparse.Namespace, env: dict[str, str], photo: bytes, log: IO[bytes]) -> dict[str, Any]:
    with started_server(env, args.workers, log) as srv:
        port, url, proc = srv.port, srv.url, srv.proc
        warm_up(url, photo, proc.pid, args.workers)
        base = server_sockets(proc.pid)
        rss_before = tree_rss_mb(proc.pid)  # no connection has been held yet
        lat = {c: {"healthz": [], "search": []} for c in ("none", "held")}
        outcomes = {c: {"healthz": Counter(), "search": Counter()} for c in ("none", "held")}
        # "none" only after a held block: what the server keeps once the held connections are gone.
        rss: dict[str, list[float]] = {"none": [], "held": []}
        socks: dict[str, list[int]] = {"none": [], "held": []}
        checks: list[dict[str, dict[str, int]]] = []
        rounds = []
        for r in range(args.rounds):
            order = ("none", "held") if r % 2 == 0 else ("held", "none")
            row: dict[str, Any] = {"order": ",".join(order)}
            for cond in order:
                t0 = time.monotonic()
                with Held(port, args.held) if cond == "held" else contextlib.nullcontext() as held:
                    if held is not None:
                        n = wait_sockets(proc.pid, lambda k: k >= base + args.held, 60)
                        row["open_s"] = round(time.monotonic() - t0, 2)
                        time.sleep(1.0)  # the slow ones' headers and first body bytes are in
                        checks.append({k: dict(v) for k, v in held.states().items()})
                    else:
                        n = server_sockets(proc.pid)
                    socks[cond].append(n - base)
                    row[f"rss_{cond}_mb"] = tree_rss_mb(proc.pid)
                    if cond == "held" or rss["held"]:
                        rss[cond].append(row[f"rss_{cond}_mb"])
                    ms, out = measure_block(url, photo, args.requests)
                    if held is not None:
                        checks.append({k: dict(v) for k, v in held.states().items()})
                for name in ms:
                    lat[cond][name] += ms[name]
                    outcomes[cond][name] += out[name]
                    row[f"{name}_{cond}_p50_ms"] = summarise(ms[name])["p50_ms"]
                if cond == "held":
                    # The server's clean-up of the closed connections is not the next block's to pay for.
                    wait_sockets(proc.pid, lambda k: k <= base + 2, 60)
                    time.sleep(1.0)
            for name in ("healthz", "search"):
                row[f"{name}_p50_ratio"] = ratio(row[f"{name}_held_p50_ms"], row[f"{name}_none_p50_ms"])
            rounds.append(row)
            print(f"round {r + 1}/{args.rounds}: {json.dumps(row)}", flush=True)
        idle_n, slow_n = args.held // 2, args.held - args.held // 2
        open_min = {kind: min(c[kind].get("open", 0) for c in checks) for kind in ("idle", "slow")}
        latency = {}
        for name in ("healthz", "search"):
            none, withheld = summarise(lat["none"][name]), summarise(lat["held"][name])
            latency[name] = {
                "none": none,
                "held": withheld,
                "ratio_p50": ratio(withheld["p50_ms"], none["p50_ms"]),
                "ratio_p99": ratio(withheld["p99_ms"], none["p99_ms"]),
            }
        rss_held = float(np.median(rss["held"]))
        rss_after = float(np.median(rss["none"])) if rss["none"] else None
        return {
            "latency": latency,
            "outcomes": {c: {k: dict(sorted(v.items())) for k, v in o.items()} for c, o in outcomes.items()},
            "failures": {c: n_failed(o) for c, o in outcomes.items()},
            "rounds": rounds,
            "held_checks": checks,
            "held_open_min": open_min,
            "held_all_open": open_min == {"idle": idle_n, "slow": slow_n},
            "server_sockets_over_base": {c: int(np.median(v)) for c, v in socks.items()},
            # The heap the first held connections grow is not all returned when they close: held is
            # compared with before, not with the none blocks in between.
            "rss_mb": {
                "before": rss_before,
                "held": round(rss_held, 1),
                "none_after_held": None if rss_after is None else round(rss_after, 1),
                "delta": round(rss_held - rss_before, 1) + 0.0,  # + 0.0: no "-0.0" in the report
                "kb_per_connection": round(1024 * (rss_held - rss_before) / args.held, 1) + 0.0,
            },
        }


def phase_deadlines(args: argparse.Namespace, env: dict[str, str], log: IO[bytes]) -> dict[str, Any]:
    with started_server(env, args.workers, log) as srv:
        port, proc = srv.port, srv.proc
        t0 = time.monotonic()
        # Well past the later deadline: a connection still open then is a fault, not a slow close.
        limit = 2 * max(args.header_timeout, args.body_timeout) + 30
        with Held(port, args.held) as held:
            open_s = time.monotonic() - t0
            seen = watch_until_closed(held, limit)
            sent = held.sent
            kinds = {"idle": held.idle, "slow": held.slow}
            out: dict[str, Any] = {"open_s": round(open_s, 2), "limit_s": limit, "slow_body_bytes_sent": sent}
            for kind, group in kinds.items():
                closed = [seen[s][0] for s in group if seen[s][0] is not None]
                life = [c - held.opened_at[s] for s in group if (c := seen[s][0]) is not None]
                out[kind] = {
                    "held": len(group),
                    "closed": len(closed),
                    "answered": sum(1 for s in group if seen[s][1] > 0),
                    "last_closed_s": round(max(closed) - t0, 2) if closed else None,
                    "lifetime_p50_s": round(float(np.median(life)), 2) if life else None,
                    "lifetime_max_s": round(max(life), 2) if life else None,
                }
        out["all_closed"] = all(out[k]["closed"] == out[k]["held"] for k in kinds)
        with contextlib.suppress(httpx.TransportError):
            r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
            out["server_alive"] = proc.poll() is None and r.status_code == 200
        out.setdefault("server_alive", False)
        return out


# --- the report -----------------------------------------------------------------------------------


def load(avg: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in avg)


def _cell(s: dict[str, Any]) -> str:
    return f"{s['p50_ms']} / {s['p99_ms']} / {s['max_ms']}"


def markdown(res: dict[str, Any]) -> str:
    h, d = res["held_phase"], res["deadline_phase"]
    rows = []
    for name, label in (("healthz", "GET /healthz"), ("search", "POST /search (k=10)")):
        lt = h["latency"][name]
        rows.append(
            f"| {label} | {lt['none']['n']} / {lt['held']['n']} | {_cell(lt['none'])} | {_cell(lt['held'])} |"
            f" {lt['ratio_p50']} | {lt['ratio_p99']} |"
        )
    ratios = {
        name: [r[f"{name}_p50_ratio"] for r in h["rounds"] if r[f"{name}_p50_ratio"] is not None]
        for name in ("healthz", "search")
    }
    spread = "; ".join(f"{n} {min(v)}–{max(v)}" for n, v in ratios.items() if v)
    checks = len(h["held_checks"])
    om = h["held_open_min"]
    rss = h["rss_mb"]
    fails = h["failures"]
    still_open = f"idle {om['idle']} / {res['idle']}, slow {om['slow']} / {res['slow']}"
    sockets = h["server_sockets_over_base"]
    rss_cell = f"{rss['before']} → {rss['held']} MB ({rss['delta']:+} MB, {rss['kb_per_connection']} KB a connection)"
    if rss["none_after_held"] is not None:
        rss_cell += f"; {rss['none_after_held']} MB in the blocks after they closed"
    outcomes = "; ".join(
        f"{c} {name}: " + ", ".join(f"{s}: {n}" for s, n in o.items())
        for c, by in h["outcomes"].items()
        for name, o in by.items()
    )

    def closed(kind: str, deadline: str) -> str:
        k = d[kind]
        return (
            f"| {kind} ({k['held']}) | {deadline} | {k['closed']} | {k['last_closed_s']} |"
            f" {k['lifetime_p50_s']} / {k['lifetime_max_s']} | {k['answered']} |"
        )

    m = res["machine"]
    return f"""## Slow clients (`make bench-slow-clients`)

`imgsearch serve` (preset `{res["preset"]}`, data `{res["data"]}`, {res["workers"]} uvicorn worker(s)) with
{res["held"]} connections held open by one client: {res["idle"]} idle (connected, nothing sent) and
{res["slow"]} slow (the headers of a POST /search, then one body byte a second). Written by
`bench/slow_clients.py` on {res["created"]} (commit {res["commit"]}).

- Command: `{res["command"]}`
- Machine: {report.describe(m)}; load average {load(m["load_avg_start"])} at the start,
  {load(m["load_avg_end"])} at the end (other jobs share it: compare the ratios, not the times)

**Latency with and without them.** Read deadlines of {HOLD_DEADLINE_S:g} s, so nothing is cut;
{res["rounds"]} rounds, each measuring both (alternating which goes first) with {res["requests"]}
requests of each kind one at a time, each on a new connection. Ratios are held / none of one run.

| request | n (none / held) | none p50 / p99 / max ms | held p50 / p99 / max ms | p50 ratio | p99 ratio |
|---|---|---|---|---|---|
{chr(10).join(rows)}

| | |
|---|---|
| failed requests (not 200, or a transport error) | none: **{fails["none"]}**, held: **{fails["held"]}** |
| outcomes | {outcomes} |
| held connections open at each of {checks} checks (fewest) | {still_open} |
| server sockets over its base (median) | none {sockets["none"]}, held {sockets["held"]} |
| server RSS, before any held → held (median) | {rss_cell} |
| p50 ratio per round | {spread} |

**Time to free them with the deadlines** `IMGSEARCH_HEADER_TIMEOUT_S={d["header_timeout_s"]:g}`,
`IMGSEARCH_BODY_TIMEOUT_S={d["body_timeout_s"]:g}` (a fresh server): seconds from opening the first
connection ({d["open_s"]} s to open all) until the server had closed the last of each kind.

| connections | deadline | closed | last closed after (s) | lifetime p50 / max (s) | answered before closing |
|---|---|---|---|---|---|
{closed("idle", f"headers, {d['header_timeout_s']:g} s")}
{closed("slow", f"body, {d['body_timeout_s']:g} s")}

All closed: {d["all_closed"]}; server healthy afterwards: {d["server_alive"]}; verdict:
{"pass" if res["passed"] else "FAIL"}."""


# --- main -----------------------------------------------------------------------------------------


def raise_nofile(need: int) -> int | None:
    """Raise this process's soft RLIMIT_NOFILE to `need`; returns the hard limit when it is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        return hard
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return None


@contextlib.contextmanager
def server_log(name: str) -> Iterator[IO[bytes]]:
    # A few hundred warnings about cut connections: the temp folder, not the repo.
    with open(Path(tempfile.gettempdir()) / f"imgsearch-slow-clients-{name}.log", "wb") as f:
        yield f


def main(argv: list[str] | None = None) -> int:
    from common.pipeline import ALL_PRESETS, DEFAULT_PRESET

    defaults = Settings.model_fields
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="data folder (default: London if present)")
    p.add_argument("--artifacts", type=Path, default=Path(os.environ.get("IMGSEARCH_ARTIFACTS", ROOT / "artifacts")))
    p.add_argument("--preset", default=None, help="default: the service's default preset")
    p.add_argument("--workers", type=int, default=1, help="uvicorn workers (default 1)")
    p.add_argument("--held", type=int, default=1000, help="connections held open, half idle, half slow")
    p.add_argument("--rounds", type=int, default=6, help="rounds of phase 1, each measuring both conditions")
    p.add_argument("--requests", type=int, default=25, help="requests of each kind per condition per round")
    p.add_argument("--header-timeout", type=float, default=defaults["header_timeout_s"].default)
    p.add_argument("--body-timeout", type=float, default=defaults["body_timeout_s"].default)
    p.add_argument("--out", type=Path, default=report.RESULTS)
    p.add_argument("--markdown", type=Path, default=report.MARKDOWN)
    args = p.parse_args(argv)

    if not 1 <= args.workers <= 64:
        p.error("--workers must be between 1 and 64")
    if args.held < 2:
        p.error("--held must be at least 2 (half idle, half slow)")
    if args.rounds < 1 or args.requests < 1:
        p.error("--rounds and --requests must be positive")
    if not (0 < args.header_timeout <= 3600 and 0 < args.body_timeout <= 3600):
        p.error("--header-timeout and --body-timeout must be in (0, 3600] seconds")
    for flag, path in (("--out", args.out), ("--markdown", args.markdown)):
        if not path.parent.is_dir():  # found out before the run, not after it
            p.error(f"{flag} {path}: no folder {path.parent}")
    preset = args.preset or DEFAULT_PRESET
    if preset not in ALL_PRESETS:
        p.error(f"unknown --preset {preset!r}")
    data = args.data or (LONDON if (LONDON / "database" / "database.json").is_file() else None)
    if data is None:
        p.error(f"no --data given and the London data is missing at {LONDON}")
    if not ((data / "database" / "database.json").is_file() and (data / "query" / "query.json").is_file()):
        p.error(f"--data {data}: not a data folder (database/database.json and query/query.json)")
    if (hard := raise_nofile(args.held + FD_HEADROOM)) is not None:
        p.error(f"--held {args.held} needs {args.held + FD_HEADROOM} open files; the hard limit is {hard}")

    from indexer import store

    if not store.read_pointer(store.index_family(args.artifacts, data, preset)):
        print(
            f"slow_clients: no index of preset {preset} for {data} in {args.artifacts}; build it first:\n"
            f"  IMGSEARCH_DATA={data} IMGSEARCH_ARTIFACTS={args.artifacts} IMGSEARCH_PRESET={preset} make build",
            file=sys.stderr,
        )
        return 2

    photo = query_photo(data)
    started = report.started("bench/slow_clients.py", argv)
    with server_log("held") as log:
        env = server_env(data, args.artifacts, preset, HOLD_DEADLINE_S, HOLD_DEADLINE_S)
        print(f"phase 1: {args.held} held connections, {args.rounds} rounds; server log {log.name}", flush=True)
        held = phase_held(args, env, photo, log)
    with server_log("deadlines") as log:
        env = server_env(data, args.artifacts, preset, args.header_timeout, args.body_timeout)
        limits = f"{args.header_timeout:g} / {args.body_timeout:g} s"
        print(f"phase 2: header / body deadlines {limits}; server log {log.name}", flush=True)
        deadline = phase_deadlines(args, env, log)
    deadline |= {"header_timeout_s": args.header_timeout, "body_timeout_s": args.body_timeout}
    res: dict[str, Any] = started | {
        "preset": preset,
        "data": data.name,
        "workers": args.workers,
        "held": args.held,
        "idle": args.held // 2,
        "slow": args.held - args.held // 2,
        "rounds": args.rounds,
        "requests": args.requests,
        "held_phase": held,
        "deadline_phase": deadline,
    }
    res["passed"] = bool(
        held["failures"]["none"] == 0
        and held["failures"]["held"] == 0
        and held["held_all_open"]
        and deadline["all_closed"]
        and deadline["server_alive"]
    )
    res = report.record("slow_clients", res, args.out)["slow_clients"]
    report.write_markdown(BEGIN, END, markdown(res), args.markdown, before=SOAK_BEGIN)
    print(json.dumps({k: v for k, v in res.items() if k != "held_phase"} | {"latency": held["latency"]}, indent=2))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
