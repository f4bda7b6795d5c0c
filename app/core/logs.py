"""Log configuration of the service: one JSON object per line (or plain text), with the request id.

The same dictConfig is applied by `imgsearch serve` and by uvicorn in every worker process, so the
server's own loggers (uvicorn.error) and ours share one format and one stream (stdout).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from contextvars import ContextVar
from typing import Any, Literal

LogFormat = Literal["json", "text"]

# The id of the request being served; run_in_threadpool copies the context, so pipeline threads see it too.
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
# Fields the handler adds to its request's log line (e.g. /search stage timings); one dict per request.
request_fields_var: ContextVar[dict[str, Any] | None] = ContextVar("request_fields", default=None)

_SANE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def accept_request_id(value: str | None) -> str:
    """The client's X-Request-ID when it is a sane token (it ends up in logs and headers), else a new one."""
    if value is not None and _SANE_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


def annotate_request(**fields: Any) -> None:
    """Add fields to the current request's log line (no-op outside a request)."""
    current = request_fields_var.get()
    if current is not None:
        current.update(fields)


class RequestIdFilter(logging.Filter):
    """Stamps every record with the current request id ("-" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get() or "-"
        # uvicorn attaches an ANSI-coloured copy of some messages; it has no place in a log line.
        record.__dict__.pop("color_message", None)
        return True


def _formatter(fmt: LogFormat) -> dict[str, Any]:
    # A new dict each time: dictConfig pops keys from what it is given.
    if fmt == "text":
        return {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"}
    return {
        "()": "pythonjsonlogger.json.JsonFormatter",
        "fmt": ["levelname", "name", "message", "process"],
        "rename_fields": {"levelname": "level", "name": "logger", "process": "pid"},
        "timestamp": "time",
    }


# The project's own packages: their INFO lines are the service's log; other libraries' INFO lines (faiss's
# loader probing its SIMD builds, Ray, TensorFlow) are start-up chatter, logged only when verbose.
OWN_LOGGERS = (
    "imgsearch",
    "app",
    "cli",
    "cluster",
    "common",
    "dataset",
    "evaluation",
    "features",
    "indexer",
    "model",
    "retrieval",
)


def log_config(fmt: LogFormat = "json", level: str = "INFO", verbose: bool = False) -> dict[str, Any]:
    """A logging.config.dictConfig for the service, also handed to uvicorn (its access log is replaced
    by the request log line of app.core.observability). `level` is that of the project's and uvicorn's
    loggers; other libraries log at WARNING and above unless `verbose`."""
    own = {name: {"level": level} for name in OWN_LOGGERS}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": f"{__name__}.RequestIdFilter"}},
        "formatters": {"service": _formatter(fmt)},
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
                "formatter": "service",
                "filters": ["request_id"],
            }
        },
        "loggers": {
            # uvicorn's loggers propagate to the root handler instead of keeping their own.
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            **own,
        },
        "root": {"handlers": ["stdout"], "level": level if verbose else "WARNING"},
    }


def route_stderr_to_log() -> None:
    """Make file descriptor 2 a pipe whose lines are logged (logger "stderr", WARNING), so the output
    stays one JSON object per line. C libraries write there directly, past Python's logging: libpng
    and libjpeg complain about every truncated upload. Worker processes inherit the descriptor, so
    one call in `imgsearch serve` covers them all. The log handler writes to stdout, never back here."""
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    log = logging.getLogger("stderr")

    def pump() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            for line in pipe:
                text = line.decode(errors="replace").rstrip()
                if text:
                    log.warning(text)

    threading.Thread(target=pump, name="stderr-to-log", daemon=True).start()
