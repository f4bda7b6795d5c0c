"""What the service holds between requests: the live index (its current searcher), or why there is none."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from app.core.cache import ByteLRU, TokenBucket
from common.settings import Settings
from retrieval.live import LiveIndex
from retrieval.searcher import Searcher


@dataclass
class ServiceState:
    settings: Settings
    # Follows CURRENT and the change log of the index family (retrieval/live.py); None when the data
    # folder itself is missing.
    live: LiveIndex | None = None
    not_ready_reason: str | None = "starting"
    # At most settings.search_slots searches at once in this worker (None: no limit beyond the thread pool).
    search_limiter: anyio.CapacityLimiter | None = field(init=False, default=None, repr=False)
    # Thumbnails made by this worker (a map image's ~10 KB JPEG), and how many it may make a second.
    thumbnails: ByteLRU = field(init=False, default_factory=lambda: ByteLRU(16 << 20), repr=False)
    thumbnail_rate: TokenBucket = field(init=False, repr=False)
    # The last answers of /map/points (a page load asks for the same one; a large index takes a while).
    map_points: ByteLRU = field(init=False, default_factory=lambda: ByteLRU(32 << 20), repr=False)

    def __post_init__(self) -> None:
        if self.settings.search_slots:
            self.search_limiter = anyio.CapacityLimiter(self.settings.search_slots)
        self.thumbnail_rate = TokenBucket(self.settings.thumbnails_per_s, self.settings.thumbnail_burst)

    def settled(self) -> Searcher | None:
        """The searcher without waiting, when sync() would have nothing to do (LiveIndex.settled)."""
        return None if self.live is None else self.live.settled()

    def sync(self) -> Searcher | None:
        """The searcher as of now, with versions and changes published by any process (two stat calls
        when there are none); a request should keep the one it got."""
        return None if self.live is None else self.live.sync()

    @property
    def reason(self) -> str | None:
        """Why no index is served, or (when one is) why a newer version is not."""
        return (self.live.error if self.live is not None else None) or self.not_ready_reason
