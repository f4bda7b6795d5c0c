"""Timestamps in the one format every manifest, metric and log record uses, and stage timers."""

from __future__ import annotations

import time
from datetime import UTC, datetime

TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_timestamp() -> str:
    """Now, in UTC, to the second: 2026-12-01T02:52:07Z."""
    return time.strftime(TIMESTAMP_FORMAT, time.gmtime())


def version_stamp() -> str:
    """A name that sorts by creation time, to the microsecond: v20261201-025207-123456."""
    return "v" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")


class StageClock:
    """Adds the seconds since the previous lap to timings[stage] (a no-op without a dict), so one
    request's stages (decode, features, encode, search, verify) are timed where they run."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings
        self.t = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[stage] = self.timings.get(stage, 0.0) + now - self.t
            self.t = now
