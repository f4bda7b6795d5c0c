"""Shard replicas of a Ray Serve deployment of imgsearch killed under searching clients: what the
clients got. Used by bench/ray_bench.py (the `ray` section's replica_kill_non200 and
shard_loss_statuses) and by tests/e2e/test_ray.py, which asserts on the same figures.

1. One replica of each shard killed in turn (SIGKILL to its process), each time waiting until Serve
   has replaced it: every search should still answer 200 (the head sends the call again, to the
   other replica).
2. Every replica of one shard killed: searches may get a clean 503 `not_ready` until Serve has
   replaced them, never another status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import Counter
from typing import Any

import httpx

APP = "imgsearch"


def search(url: str, data: bytes, k: int = 10, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/search", params={"k": k}, files={"file": ("q.jpg", data)}, timeout=timeout)


class Load:
    """Clients searching in a loop until stopped; every status code is kept (-1: no answer)."""

    def __init__(self, url: str, queries: list[bytes], clients: int = 3) -> None:
        self.url, self.queries = url, queries
        self.codes: Counter[int] = Counter()
        self.bodies: list[dict[str, Any]] = []
        self.versions: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        n = i
        while not self._stop.is_set():
            try:
                r = search(self.url, self.queries[n % len(self.queries)], timeout=30)
            except httpx.TransportError:
                self.codes[-1] += 1
                continue
            self.codes[r.status_code] += 1
            body = r.json()
            if r.status_code == 200:
                self.versions.append(body["index_version"])
            else:
                self.bodies.append(body)
            n += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def shard_status(address: str, shard: int) -> dict[str, Any]:
    """ShardServer.status() of one replica of the shard (the one Serve picks)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, logging_level="WARNING")
    handle = serve.get_deployment_handle(f"Shard{shard}", app_name=APP)
    status: dict[str, Any] = handle.status.remote().result(timeout_s=30)
    return status


def shard_pids(address: str, shard: int, replicas: int = 2, asks: int = 60) -> list[int]:
    """The processes of the shard's replicas that answer: its status asked until `replicas` of them
    have answered (Serve spreads the calls) or `asks` calls were made. (Ray's state API, which would
    list them, needs the dashboard.)"""
    seen: set[int] = set()
    for _ in range(asks):
        try:
            seen.add(int(shard_status(address, shard)["pid"]))
        except Exception:  # any handle error: a replica is being replaced
            time.sleep(0.2)
        if len(seen) >= replicas:
            break
    return sorted(seen)


def replaced(address: str, shard: int, killed: set[int], replicas: int = 2, timeout: float = 120) -> list[int]:
    """The shard's replicas once Serve has replaced the `killed` ones; RuntimeError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = shard_pids(address, shard, replicas)
        if len(pids) == replicas and not killed & set(pids):
            return pids
        time.sleep(1)
    raise RuntimeError(f"shard {shard}'s replicas were not replaced within {timeout} s")


def replica_kills(url: str, address: str, queries: list[bytes], shards: int = 2, replicas: int = 2) -> dict[str, Any]:
    """Both experiments against the service at `url` (the Ray cluster at `address`), 3 clients each."""
    pids = {s: shard_pids(address, s, replicas) for s in range(shards)}
    if any(len(p) != replicas for p in pids.values()):
        raise RuntimeError(f"not {replicas} replicas of each shard answer: {pids}")
    with Load(url, queries) as one:
        for shard in range(shards):
            time.sleep(2)
            os.kill(pids[shard][0], signal.SIGKILL)
            replaced(address, shard, {pids[shard][0]}, replicas)
        time.sleep(2)
    lost = shard_pids(address, shards - 1, replicas)
    with Load(url, queries) as every:
        time.sleep(2)
        for pid in lost:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        replaced(address, shards - 1, set(lost), replicas)
        time.sleep(3)  # searches on the new replicas
    after = search(url, queries[0])
    return {
        "replica_kill_codes": {str(k): v for k, v in sorted(one.codes.items())},
        "replica_kill_non200": sum(v for k, v in one.codes.items() if k != 200),
        "replica_kill_bodies": one.bodies[:3],
        "shard_loss_statuses": {str(k): v for k, v in sorted(every.codes.items())},
        "shard_loss_error_codes": sorted({str(b.get("code")) for b in every.bodies}),
        "shard_loss_recovered": after.status_code == 200,
        "shard_version_after": shard_status(address, shards - 1)["version"],
    }
