"""Prometheus metrics (served at `GET /metrics` by app/api/routes/metrics.py) and the request middleware:
request id, one log line per request.

Metrics live in a registry of their own per app (several apps in one process do not collide).
With several uvicorn workers, `imgsearch serve` sets PROMETHEUS_MULTIPROC_DIR before the workers
start: prometheus_client then keeps every value in per-process files there, and `/metrics` sums
them over all workers, whichever worker answers the scrape.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator import metrics as instrumentator_metrics
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.logs import accept_request_id, request_fields_var, request_id_var

log = logging.getLogger("imgsearch.request")

# Stages take from well under a millisecond (search) to ~100 ms (features, verify) on the London data.
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CLIENT_GONE = 499  # the log's status of a request whose client left before any answer
# Paths polled by probes and scrapers: their successful requests are logged at DEBUG, not INFO.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class ServiceMetrics:
    """The service's own metrics; the instrumentator adds the HTTP ones to the same registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        if multiprocess_dir() is None:
            # Process metrics (CPU, memory, GC) exist only in single-process mode in prometheus_client.
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                self.registry.register(collector)
        self.stage_seconds = Histogram(
            "imgsearch_search_stage_seconds",
            "Time spent in each stage of the /search query pipeline",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.search_hits = Histogram(
            "imgsearch_search_hits",
            "Map images returned per successful /search",
            buckets=(1, 5, 10, 20, 50, 100),
            registry=self.registry,
        )
        self.index_size = Gauge(
            "imgsearch_index_size",
            "Map images in the served index (with online adds and deletes; the version is on /readyz)",
            ["preset"],
            # Every worker follows the same index; the value set last is the current one.
            multiprocess_mode="mostrecent",
            registry=self.registry,
        )
        self.changelog_corrupt = Gauge(
            "imgsearch_changelog_corrupt_lines",
            "Lines of the change log skipped as corrupt (each failed its checksum)",
            # Every worker reads the same log; the highest count is the one to alert on.
            multiprocess_mode="max",
            registry=self.registry,
        )
        self.index_loads = Counter(
            "imgsearch_index_loads",
            "Index loads at start-up, one per worker process, by outcome",
            ["outcome"],
            registry=self.registry,
        )

    def observe_stages(self, timings: Mapping[str, float]) -> None:
        for stage, seconds in timings.items():
            self.stage_seconds.labels(stage).observe(seconds)

    def index_loaded(self, preset: str, size: int) -> None:
        self.index_size.labels(preset).set(size)
        self.index_loads.labels("loaded").inc()

    def index_failed(self) -> None:
        self.index_loads.labels("failed").inc()

    def exposition(self) -> bytes:
        if multiprocess_dir() is not None:
            # A fresh registry per scrape that reads (and sums) the files of every worker.
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


async def get_metrics(request: Request) -> ServiceMetrics:
    metrics: ServiceMetrics = request.app.state.metrics  # set at start-up; starlette's State is untyped
    return metrics


MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]


class RequestContextMiddleware:
    """Gives every HTTP request an id (the client's X-Request-ID when sane, else a new one), echoes
    it in the response header, and writes one log line per request when it ends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = accept_request_id(incoming.decode("latin-1") if incoming is not None else None)
        fields: dict[str, object] = {}
        id_token, fields_token = request_id_var.set(rid), request_fields_var.set(fields)
        status: int | None = None
        gone = False  # the client went away (or was cut by a read deadline) before any answer
        t0 = time.perf_counter()

        async def receive_watching() -> Message:
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect" and status is None:
                gone = True
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        try:
            await self.app(scope, receive_watching, send_with_id)
        except Exception:
            # An unexpected error: log it with the request id, and answer in the API's error shape
            # (instead of the server's plain-text 500) when nothing has been sent yet.
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if status is not None:
                raise
            status = 500
            body = {"code": "internal_error", "detail": "internal server error"}
            await JSONResponse(body, status_code=500, headers={"X-Request-ID": rid})(scope, receive, send)
        finally:
            if gone:
                # Whatever the app answered went nowhere: logged as nginx's "client closed request".
                status = CLIENT_GONE
            duration_ms = round((time.perf_counter() - t0) * 1000, 2)
            path, method = scope["path"], scope["method"]
            level = logging.INFO
            if status is None or status >= 500:
                level = logging.ERROR
            elif path in QUIET_PATHS and status < 400:
                level = logging.DEBUG
            log.log(
                level,
                "%s %s %s %.1f ms",
                method,
                path.encode("unicode_escape").decode("ascii"),  # a decoded %0A must not start a forged line
                status,
                duration_ms,
                extra={
                    "request_id": rid,
                    "method": method,
                    "path": path,
                    "status": status,
                    "duration_ms": duration_ms,
                    **fields,
                },
            )
            request_id_var.reset(id_token)
            request_fields_var.reset(fields_token)


def install(app: FastAPI) -> ServiceMetrics:
    """Metrics, `/metrics` and the request middleware on `app` (call once, before it starts)."""
    metrics = ServiceMetrics()
    app.state.metrics = metrics
    Instrumentator(
        should_group_status_codes=False,  # 413 and 415 say different things
        should_ignore_untemplated=False,
        should_group_untemplated=True,  # unknown paths count as handler "none", not one series each
        excluded_handlers=["^/metrics$"],  # scrapes are not traffic; /metrics/precision still counts
        registry=metrics.registry,
    ).add(
        instrumentator_metrics.requests(registry=metrics.registry),
        instrumentator_metrics.latency(buckets=REQUEST_BUCKETS, registry=metrics.registry),
    ).instrument(app)
    # Added last, so outermost: its id and its timing cover everything inside, the metrics included.
    app.add_middleware(RequestContextMiddleware)
    return metrics
