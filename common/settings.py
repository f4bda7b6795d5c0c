"""Every setting of the service and the command line, from IMGSEARCH_* environment variables, validated
once at start-up; command-line flags are passed in as arguments, over the environment."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.pipeline import ALL_PRESETS, DEFAULT_PRESET, PRESETS

MIN_ADMIN_KEY_LEN = 16


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMGSEARCH_", extra="ignore")

    data: Path | None = Field(
        default=None, description="Data folder in the course layout; unset: the generated demo data."
    )
    artifacts: Path = Field(default=Path("artifacts"), description="Where models and indexes are written.")
    preset: str = Field(default=DEFAULT_PRESET, description="Pipeline preset.")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    admin_key: SecretStr | None = Field(
        default=None,
        description="When set, admin endpoints need X-API-Key; unset, they answer only on a loopback-only service.",
    )
    # Names a browser may reach the service by (the Host header); others are refused, so a page on
    # another site cannot reach a service on loopback through a name it rebinds to 127.0.0.1.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default=["localhost", "127.0.0.1", "::1"],
        description="Comma-separated host names (or *.domain, or * for any) the Host header may name.",
    )
    max_upload_mb: float = Field(default=10.0, gt=0, le=100)
    utm_epsg: int = Field(
        default=32630, ge=32601, le=32760, description="UTM zone of the map locations (32630: 30N, London)"
    )
    # 3 measured best on 2 cores (bench/run.py, BENCHMARKS.md): req/s at 8 connections 1.17 / 1.63 / 1.75 x
    # those at 1 connection with 1 / 2 / 3 workers; the workers share the memory-mapped encoder and keypoints.
    workers: int = Field(default=3, ge=1, le=64, description="uvicorn worker processes of `imgsearch serve`.")
    # One search at a time per worker, the others wait their turn: the workers' threads then do not
    # contend for the GIL and the caches, and 3 workers keep 2 cores busy (bench/run.py; the throughput at
    # 8 connections against 1, with and without the limit, is in BENCHMARKS.md).
    search_slots: int = Field(
        default=1, ge=0, le=64, description="searches one worker runs at once (0: as many as requests come)."
    )
    # Read deadlines of app/core/server.py: without them a connection that sends nothing, half a
    # request or a byte a second holds a worker's descriptor forever.
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="seconds from connecting (or a next request's first byte) to its headers."
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="seconds from the headers to the end of the body, plus the rate allowance."
    )
    body_min_rate_kb_s: float = Field(
        default=64.0, gt=0, description="KiB/s of body that earn more time: each KiB adds 1/rate s to the deadline."
    )
    # Over 1,000 held connections per worker still leave room for real requests; more are answered 503.
    max_connections: int = Field(
        default=2048, gt=0, description="connections one worker serves at once (uvicorn's limit_concurrency)."
    )
    # A page of 100 results fits in the burst; a client walking every id gets 429s, not a decode each.
    thumbnails_per_s: float = Field(
        default=25.0, gt=0, le=10_000, description="thumbnails one worker makes a second (cached ones are free)."
    )
    thumbnail_burst: int = Field(default=200, ge=1, le=100_000, description="thumbnails made at once past the rate.")
    log_format: Literal["json", "text"] = Field(
        default="json", description="Service logs: one JSON object per line, or plain text."
    )

    @field_validator("data", mode="before")
    @classmethod
    def _empty_data_is_demo(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in ALL_PRESETS:
            raise ValueError(
                f"unknown preset {v!r}; choose one of: {', '.join(PRESETS)} (all: imgsearch presets --all)"
            )
        return v

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _host_list(cls, v: object) -> object:
        if isinstance(v, str):
            v = [h for h in (part.strip() for part in v.split(",")) if h]
        if isinstance(v, list):
            if not v:
                raise ValueError("name at least one host (or * for any)")
            return [str(h).lower().strip("[]") for h in v]
        return v

    @field_validator("admin_key")
    @classmethod
    def _strong_key_or_none(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None or not v.get_secret_value():
            return None
        key = v.get_secret_value()
        # A guessable key is worse than none: it looks protected. Refuse to start with one.
        if len(key) < MIN_ADMIN_KEY_LEN or len(set(key)) < 8:
            raise ValueError(f"too weak: use at least {MIN_ADMIN_KEY_LEN} characters with at least 8 different ones")
        return v

    @property
    def loopback_only(self) -> bool:
        """Whether the service listens on a loopback address alone (unreachable from other machines)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False  # a name: whatever it resolves to, it may be more than loopback

    @property
    def demo_data(self) -> Path:
        return self.artifacts / "demo-data"

    @property
    def data_root(self) -> Path:
        return self.data if self.data is not None else self.demo_data

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
