"""Serving on a Ray cluster (`imgsearch serve --engine ray`, or `serve deploy` of `app_builder`).

    HTTP -> Ray Serve proxy -> Ingress replicas (the FastAPI app of app/main.py, the head of the index:
            id map, vectorizer, encoder; autoscaled)
         -> Shard deployments, one per index shard (its vectors and verification keypoints)

The ingress is the same app as the embedded service (every route, error code and header); only its
living index differs: the head of a sharded index (retrieval/shards.py), whose searches fan out to the
shards through RayShards. A shard that cannot answer (its replica died and is being replaced) makes the
search a clean 503 `not_ready`, never another 5xx. Versions and online changes travel through the index
family's files (shared storage on a real cluster): every replica follows them on its own.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable
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
# A shard answer slower than this (its replica gone and not yet replaced, say) fails the search with 503.
SHARD_TIMEOUT_S = 10.0
# What `imgsearch serve --engine ray` passes to the ingress replicas (Settings fields).
SETTINGS_FIELDS = ("data", "artifacts", "preset", "max_upload_mb", "utm_epsg", "log_format", "host", "allowed_hosts")


class RayShards(ShardCalls):
    """The head's view of the shard deployments: calls them all at once, waits, merges."""

    def __init__(self, handles: list[DeploymentHandle[Any]], timeout_s: float = SHARD_TIMEOUT_S) -> None:
        self.handles = handles
        self.timeout_s = timeout_s

    def _wait(self, shard: int, response: DeploymentResponse[Any] | DeploymentResponseGenerator[Any]) -> Any:
        try:
            return response.result(timeout_s=self.timeout_s)
        except RayTaskError as e:
            if isinstance(e.cause, NotReadyError):  # the shard is up but does not hold the version yet
                raise NotReadyError(str(e.cause)) from None
            raise
        except (RayError, RayServeException, TimeoutError) as e:
            raise NotReadyError(f"index shard {shard} is unavailable ({type(e).__name__}); retry shortly") from None

    @property
    def count(self) -> int:
        return len(self.handles)

    def search(self, version: str, embedding: np.ndarray, k: int) -> list[Hit]:
        pending = [h.search.remote(version, embedding, k) for h in self.handles]
        return merge_hits([self._wait(s, r) for s, r in enumerate(pending)], k)

    def call(self, shard: int, method: str, *args: Any) -> Answer:
        response = getattr(self.handles[shard], method).remote(*args)
        return lambda: self._wait(shard, response)


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


def application(settings: Settings, replicas: int | None = None, max_replicas: int = 4) -> serve.Application:
    """The Serve application for `settings`: one deployment per shard of the current version, and the
    ingress, `replicas` of it or (None) autoscaled from 1 to `max_replicas` on ongoing requests."""
    shards = _shard_count(settings)
    family = store.index_family(settings.artifacts, settings.data_root, settings.preset).resolve()
    # @serve.deployment made Shard a Deployment (mypy keeps a decorated class's own type)
    shard_deployment = cast(serve.Deployment, Shard)
    bound = [shard_deployment.options(name=f"Shard{i}").bind(str(family), i, shards) for i in range(shards)]
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
    ingress = serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.5}, **scaling)(Ingress)
    return ingress.bind(values, key, bound)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For `serve run` / `serve deploy` configs: `import_path: cluster.serving:app_builder`, with `args`
    naming Settings fields (data, artifacts, preset, ...) over the IMGSEARCH_* environment, plus
    `replicas` (fixed ingress replicas) or `max_replicas` (autoscaled)."""
    args = dict(args)
    replicas = args.pop("replicas", None)
    max_replicas = int(args.pop("max_replicas", 4))
    return application(Settings(**args), None if replicas is None else int(replicas), max_replicas)


def run(settings: Settings, address: str | None, replicas: int | None, ready: Callable[[str], None] = print) -> None:
    """Deploy on the Ray cluster at `address` (None: RAY_ADDRESS, or a new local Ray), serve HTTP on
    settings.host:port until SIGINT/SIGTERM, then take the application down."""
    import ray

    app = application(settings, replicas)  # checks the index exists before touching the cluster
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
