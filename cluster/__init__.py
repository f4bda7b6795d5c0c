"""The optional Ray engine: indexing with Ray Data (indexing.py), serving with Ray Serve (serving.py)."""

from __future__ import annotations

import logging
import socket


def connect(address: str | None) -> None:
    """ray.init on the cluster at `address` (host:port of its GCS; None: RAY_ADDRESS, or a new local Ray).
    An address where nothing answers is refused at once with ConnectionError, where Ray would retry
    for minutes."""
    import ray

    if address and address.count(":") == 1 and "://" not in address:
        host, _, port = address.partition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                pass
        except (OSError, ValueError) as e:
            raise ConnectionError(f"no Ray cluster answers at {address} ({e})") from None
    ray.init(address=address, logging_level=logging.WARNING)
