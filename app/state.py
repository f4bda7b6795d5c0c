"""What the service holds between requests: the searcher, or why there is none."""

from __future__ import annotations

from dataclasses import dataclass

from app.core.config import Settings
from pipeline.searcher import Searcher


@dataclass
class ServiceState:
    settings: Settings
    searcher: Searcher | None = None
    not_ready_reason: str | None = "starting"
