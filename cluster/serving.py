"""Serving on a Ray cluster (`imgsearch serve --engine ray`, or `serve deploy` of `app_builder`).

    HTTP -> Ray Serve proxy -> Ingress replicas (the FastAPI app of app/main.py, the head of the index:
            id map, vectorizer, encoder; autoscaled)
         -> Shard deployments, one per index shard (its vectors and verification keypoints), each
            with `shard_replicas` replicas

The ingress is the same app as the embedded service (every route, error code and header); only its
living index differs: the head of a sharded index (retrieval/shards.py), whose searches fan out to the
shards through RayShards. Serve sends each shard call to a replica of that shard; a call that fails
(its replica died) or is slow is sent again, to whichever replica Serve picks, until the search's one
deadline: with two replicas a lost one costs no failed search. A shard with no replica that answers in
time makes the search a clean 503 `not_ready`, never another 5xx.

`GET /metrics` sums every ingress replica, whichever answers the scrape: the replicas keep their
Prometheus values in per-process files (prometheus_client's multiprocess mode, as the embedded
service's workers do) in one folder of the shared artifacts (`serve-metrics/`, emptied at each
deployment), each file named by host and process so that replicas on two nodes never share one.

Versions and online changes travel through the index family's files (shared storage on a real
cluster): every replica follows them on its own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, cast

import numpy as np
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from app.main import create_app
from cluster import connect
from common.settings import Settings
from common.threads import single_threaded_kernels
from features.orb import OrbFeatures
from indexer import store
from model.verify import Evidence
from retrieval.live import LiveIndex, NotReadyError
from retrieval.searcher import Hit
from retrieval.shards import Answer, ShardCalls, ShardServer, head_index, merge_hits

log = logging.getLogger(__name__)

APP_NAME = "imgsearch"
# All of one search's shard calls, retries included, end within this; past it the search is a 503.
SEARCH_DEADLINE_S = 10.0
# One attempt of a shard call waits at most this long before it is sent again (a slow or lost replica).
ATTEMPT_S = 3.0
SHARD_REPLICAS = 2
METRICS_DIR = "serve-metrics"  # the ingress replicas' Prometheus files, under the data's artifacts
_search_ends: ContextVar[float | None] = ContextVar("search_ends", default=None)
# What `imgsearch serve --engine ray` passes to the ingress replicas (Settings fields).
SETTINGS_FIELDS = ("data", "artifacts", "preset", "max_upload_mb", "utm_epsg", "log_format", "host", "allowed_hosts")


class RayShards(ShardCalls):
    """The head's view of the shard deployments: calls them all at once, waits (sending a failed or
    slow call again, to the replica Serve picks, until the search's deadline), merges."""

    def __init__(
        self, handles: list[DeploymentHandle[Any]], deadline_s: float = SEARCH_DEADLINE_S, attempt_s: float = ATTEMPT_S
    ) -> None:
        self.handles = handles
        self.deadline_s = deadline_s
        self.attempt_s = attempt_s

    @contextmanager
    def deadline(self) -> Iterator[None]:
        token = _search_ends.set(time.monotonic() + self.deadline_s)
        try:
            yield
        finally:
            _search_ends.reset(token)

    @property
    def count(self) -> int:
        return len(self.handles)

    def search(self, version: str, embedding: np.ndarray, k: int) -> list[Hit]:
        pending = [self.call(s, "search", version, embedding, k) for s in range(self.count)]
        return merge_hits([answer() for answer in pending], k)

    def call(self, shard: int, method: str, *args: Any) -> Answer:
        # Outside a search (no deadline set) a call has the deadline of a search of its own.
        ends = _search_ends.get() or time.monotonic() + self.deadline_s

        def send() -> DeploymentResponse[Any] | DeploymentResponseGenerator[Any]:
            return cast(DeploymentResponse[Any], getattr(self.handles[shard], method).remote(*args))

        response = send()
        return lambda: self._wait(shard, response, send, ends)

    def _wait(
        self,
        shard: int,
        response: DeploymentResponse[Any] | DeploymentResponseGenerator[Any],
        send: Callable[[], DeploymentResponse[Any] | DeploymentResponseGenerator[Any]],
        ends: float,
    ) -> Any:
        pause = 0.05
        while True:
            left = ends - time.monotonic()
            try:
                return response.result(timeout_s=max(0.001, min(left, self.attempt_s)))
            except RayTaskError as e:
                if isinstance(e.cause, NotReadyError):  # the shard is up but does not hold the version yet
                    raise NotReadyError(str(e.cause)) from None
                raise
            except (RayError, RayServeException, TimeoutError) as e:
                if ends - time.monotonic() <= 0.05:
                    raise NotReadyError(
                        f"index shard {shard} did not answer in time ({type(e).__name__}); retry shortly"
                    ) from None
                log.info("shard %d call failed (%s); sending it again", shard, type(e).__name__)
                # A dead replica fails at once: a short, growing pause while Serve routes around it.
                time.sleep(min(pause, max(0.0, ends - time.monotonic())))
                pause = min(2 * pause, 0.5)
                response = send()


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=8)
class Shard:
    """One index shard: its vectors and keypoints, following the family's versions and change log."""

    def __init__(self, family: str, shard: int, shards: int) -> None:
        single_threaded_kernels()
        self.server = ShardServer(Path(family), shard, shards)

    def search(self, version: str, embedding: np.ndarray, k: int) -> list[Hit]:
        return self.server.search(version, embedding, k)

    def inliers(self, version: str, q: OrbFeatures, words: np.ndarray, ids: list[int]) -> np.ndarray:
        return self.server.inliers(version, q, words, ids)

    def evidence(self, version: str, q: OrbFeatures, words: np.ndarray, ids: list[int]) -> list[Evidence]:
        return self.server.evidence(version, q, words, ids)

    def distances(self, version: str, embedding: np.ndarray, ids: list[int]) -> np.ndarray:
        return self.server.distances(version, embedding, ids)

    def status(self) -> dict[str, object]:
        return self.server.status()


@serve.ingress()
class Ingress:
    """The FastAPI app of the embedded service over the head of the sharded index."""

    def __init__(self, settings: dict[str, Any], admin_key: str | None, shards: list[DeploymentHandle[Any]]) -> None:
        self.settings = Settings(**settings, admin_key=admin_key)
        self.shards = shards
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Files named by pid alone would collide between nodes; set before the app makes its metrics.
            from prometheus_client import values

            host = socket.gethostname()
            per_process = values.MultiProcessValue  # untyped in prometheus_client
            values.ValueClass = per_process(lambda: f"{host}-{os.getpid()}")  # type: ignore[no-untyped-call]

    def __serve_build_asgi_app__(self) -> Any:
        client = RayShards(self.shards)
        n = len(self.shards)

        def open_live(s: Settings) -> LiveIndex:
            return head_index(store.index_family(s.artifacts, s.data_root, s.preset), n, client)

        return WithoutRequestIdHeader(create_app(self.settings, open_live))


class WithoutRequestIdHeader:
    """Drops the app's X-Request-ID response header: Serve's proxy adds its own, with the same id (the
    app takes the id it is given, app/core/observability.py), and one header is what the embedded
    service sends. Lifespan and every other message pass through unchanged."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_without(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_without)


def _shard_count(settings: Settings) -> int:
    """How many shards the family's current version has (the deployments are made for it)."""
    family = store.index_family(settings.artifacts, settings.data_root, settings.preset)
    version = store.current_version(family)
    try:
        return int(json.loads((version / "manifest.json").read_text(encoding="utf-8")).get("shards", 1))
    except (OSError, ValueError) as e:
        raise store.IndexLoadError(f"{version}: unreadable manifest ({e})") from e


def application(
    settings: Settings, replicas: int | None = None, max_replicas: int = 4, shard_replicas: int = SHARD_REPLICAS
) -> serve.Application:
    """The Serve application for `settings`: one deployment per shard of the current version with
    `shard_replicas` replicas each, and the ingress, `replicas` of it or (None) autoscaled from 1 to
    `max_replicas` on ongoing requests."""
    shards = _shard_count(settings)
    family = store.index_family(settings.artifacts, settings.data_root, settings.preset).resolve()
    # @serve.deployment made Shard a Deployment (mypy keeps a decorated class's own type)
    shard_deployment = cast(serve.Deployment, Shard)
    bound = [
        shard_deployment.options(name=f"Shard{i}", num_replicas=shard_replicas).bind(str(family), i, shards)
        for i in range(shards)
    ]
    values = {f: getattr(settings, f) for f in SETTINGS_FIELDS}
    values = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
    values["artifacts"] = str(Path(values["artifacts"]).resolve())
    if values["data"] is not None:
        values["data"] = str(Path(values["data"]).resolve())
    key = settings.admin_key.get_secret_value() if settings.admin_key is not None else None
    scaling: dict[str, Any] = (
        {"num_replicas": replicas}
        if replicas is not None
        else {"autoscaling_config": {"min_replicas": 1, "max_replicas": max_replicas, "target_ongoing_requests": 2}}
    )
    # A fresh folder: one left from an earlier deployment would add its counts.
    metrics_dir = store.data_dir(Path(values["artifacts"]), settings.data_root) / METRICS_DIR
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    options = {"num_cpus": 0.5, "runtime_env": {"env_vars": {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}}}
    ingress = serve.deployment(name="Ingress", ray_actor_options=options, **scaling)(Ingress)
    return ingress.bind(values, key, bound)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For `serve run` / `serve deploy` configs: `import_path: cluster.serving:app_builder`, with `args`
    naming Settings fields (data, artifacts, preset, ...) over the IMGSEARCH_* environment, plus
    `replicas` (fixed ingress replicas) or `max_replicas` (autoscaled), and `shard_replicas`."""
    args = dict(args)
    replicas = args.pop("replicas", None)
    max_replicas = int(args.pop("max_replicas", 4))
    shard_replicas = int(args.pop("shard_replicas", SHARD_REPLICAS))
    return application(Settings(**args), None if replicas is None else int(replicas), max_replicas, shard_replicas)


def run(
    settings: Settings,
    address: str | None,
    replicas: int | None,
    ready: Callable[[str], None] = print,
    shard_replicas: int = SHARD_REPLICAS,
) -> None:
    """Deploy on the Ray cluster at `address` (None: RAY_ADDRESS, or a new local Ray), serve HTTP on
    settings.host:port until SIGINT/SIGTERM, then take the application down."""
    import ray

    app = application(settings, replicas, shard_replicas=shard_replicas)  # checks the index exists first
    connect(address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        ready(f"serving on http://{settings.host}:{settings.port} (Ray Serve application {APP_NAME!r})")
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
