"""The FastAPI application: the index is loaded once, in the lifespan, never at import time."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api.routes import health, metrics, search
from app.core.config import Settings
from app.errors import install_handlers
from app.state import ServiceState
from dataset.layout import DatasetError
from indexer import store
from pipeline.build import index_family
from pipeline.searcher import Searcher

log = logging.getLogger(__name__)


def load_searcher(settings: Settings) -> Searcher:
    """The searcher of the current index version for the configured data folder and preset."""
    root = settings.data_root
    if not (root / "database" / "database.json").is_file():
        raise DatasetError(f"data folder {root} not found or not in the course layout")
    family = index_family(settings.artifacts, root, settings.preset)
    return Searcher(store.load(store.current_version(family)))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServiceState(settings=settings)
        app.state.service = state
        try:
            searcher = load_searcher(settings)
            searcher.warm_up()
            state.searcher = searcher
            state.not_ready_reason = None
            log.info("serving index %s (%d images)", state.searcher.loaded.version, state.searcher.size)
        except (store.IndexLoadError, DatasetError, OSError, ValueError) as e:
            # Stay up and say why on /readyz rather than serve a missing or corrupt index.
            state.not_ready_reason = str(e)
            log.error("not ready: %s", e)
        yield

    app = FastAPI(
        title="imgsearch",
        summary="Visual place recognition: upload a street photo, get the map images of the same place.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_handlers(app)
    app.include_router(search.router)
    app.include_router(metrics.router)
    app.include_router(health.router)
    return app
