"""The FastAPI application: the index is loaded once, in the lifespan, never at import time.

The server imports the query path (retrieval/) and what it stands on, never the build stack: no
training, demo-data generation, evaluation or TensorFlow (tests/unit/test_layers.py checks).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from app.api.routes import health, images, metrics, search, web
from app.core import observability
from app.core.body_limit import MULTIPART_OVERHEAD, BodySizeLimitMiddleware
from app.core.security import HostCheckMiddleware
from app.errors import install_handlers
from app.openapi import install_docs, install_openapi
from app.state import ServiceState
from common.settings import Settings
from common.threads import limit_malloc_arenas, single_threaded_kernels
from dataset.layout import DatasetError
from indexer import store
from retrieval.live import LiveIndex
from retrieval.query import warm_up

log = logging.getLogger(__name__)


def live_index(settings: Settings) -> LiveIndex:
    """The live index (versions, hot swap, online changes) of the configured data folder and preset."""
    root = settings.data_root
    if not (root / "database" / "database.json").is_file():
        raise DatasetError(f"data folder {root} not found or not in the course layout")
    return LiveIndex(store.index_family(settings.artifacts, root, settings.preset))


def create_app(settings: Settings | None = None, open_live: Callable[[Settings], LiveIndex] | None = None) -> FastAPI:
    """The service. `open_live` makes its living index (default: the whole index of the configured data
    folder and preset, in this process; cluster/serving.py gives the head of a sharded one)."""
    settings = settings or Settings()
    open_live = open_live or live_index
    # Library warnings (Pillow on corrupt EXIF, ...) go through logging, so stdout stays one JSON per line.
    logging.captureWarnings(True)
    # Before the request threads exist: few malloc arenas keep a busy server's memory flat.
    limit_malloc_arenas()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServiceState(settings=settings)
        app.state.service = state
        # Per process, so in every uvicorn worker (measured faster on 2 cores, see common/threads.py).
        single_threaded_kernels()
        try:
            # Kept even when the load fails: it picks up the next version published.
            state.live = open_live(settings)
            # Count and size every version this worker swaps in later, not only the first.
            state.live.on_swap = lambda s: app.state.metrics.index_loaded(s.preset, s.size)
            # Off the event loop: a sharded index's warm-up query waits on its shards.
            searcher = await run_in_threadpool(state.live.load_now)
            await run_in_threadpool(warm_up, searcher)
            state.not_ready_reason = None
            app.state.metrics.index_loaded(searcher.preset, searcher.size)
            log.info("serving index %s (%d images)", searcher.version, searcher.size)
        except (store.IndexLoadError, DatasetError, OSError, ValueError) as e:
            # Stay up and say why on /readyz rather than serve a missing or corrupt index.
            state.not_ready_reason = str(e)
            app.state.metrics.index_failed()
            log.error("not ready: %s", e)
        yield

    app = FastAPI(
        title="imgsearch",
        summary="Visual place recognition: upload a street photo, get the map images of the same place.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served by install_docs without a CDN
        redoc_url=None,
    )
    install_handlers(app)
    install_openapi(app)
    install_docs(app)
    # Cap the body as it streams in, before Starlette spools a multipart part to disk.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    # Before anything reads the body: a request by a name not served here is answered at once.
    app.add_middleware(HostCheckMiddleware, allowed=settings.allowed_hosts)
    # After the other middleware, so it is outermost: request id, request log line, HTTP metrics.
    observability.install(app)
    for routes in (search, metrics, health, web, images):
        app.include_router(routes.router)
    return app
