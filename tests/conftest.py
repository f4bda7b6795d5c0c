"""Shared fixtures: real data folders, real artifacts, a real server on loopback.

Tests are filed by kind, and each folder's tests carry its marker (registered in pyproject.toml):
tests/unit (no server: functions, files, in-process), tests/service (real processes: the server over
HTTP on loopback, the command line), tests/e2e (the London data, a real browser, real containers).
`make test-unit` runs the first alone; `make test` runs everything.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest

# Ray (tests/e2e/test_ray.py) reads this when it is imported: its nodes, drivers and Serve proxies then
# take 127.0.0.1 as their address instead of the machine's network address, so test traffic stays on
# loopback. Set before any test module is imported; inherited by the CLI processes the tests start.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

ROOT = Path(__file__).resolve().parents[1]
LONDON = ROOT.parent / "shared" / "datasets" / "london"
KINDS = ("unit", "service", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = item.path.parent.name
        if kind not in KINDS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/unit, tests/service or tests/e2e")
        item.add_marker(getattr(pytest.mark, kind))


def london_or_fail() -> Path:
    """The shared London data; in CI its absence is a failure, elsewhere a visible skip."""
    if (LONDON / "database" / "database.json").is_file():
        return LONDON
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but the London data is missing at {LONDON}")
    pytest.skip(f"London data not found at {LONDON}")


@pytest.fixture(scope="session")
def london() -> Path:
    return london_or_fail()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dataset import synthetic

    return synthetic.main(tmp_path_factory.mktemp("data") / "tiny", synthetic.confs["tiny"])


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Artifacts (features, model, index) of the paper preset built on the tiny synthetic data."""
    from cli.stages import build_all

    artifacts = tmp_path_factory.mktemp("artifacts")
    build_all(tiny_data, artifacts, "paper", jobs=1)
    return artifacts


# Ports for the servers tests start: from 20000 (above Ray's worker ports, 10002-19999) up to the kernel's
# ephemeral range, where sockets bound to port 0 and outgoing connections take theirs (a Ray cluster holds
# hundreds; one took a test server's port between the pick and the bind). Never the same port twice.
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    candidates = [p for p in range(20000, _ephemeral_low()) if p not in _handed_out]
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port on 127.0.0.1 between 20000 and the ephemeral range")


class Server:
    def __init__(
        self, env: dict[str, str], args: tuple[str, ...] = (), host: str = "127.0.0.1", wrap: tuple[str, ...] = ()
    ) -> None:
        # `host` is where it listens (0.0.0.0: beyond loopback, as in a container); tests reach it on
        # loopback whatever it is. `wrap`: a command that runs the server's (its last arguments).
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # One uvicorn worker unless a test asks for more: tests look at one process's state and output.
        full_env = (
            os.environ | {"IMGSEARCH_WORKERS": "1"} | env | {"IMGSEARCH_HOST": host, "IMGSEARCH_PORT": str(self.port)}
        )
        self.proc = subprocess.Popen(
            [*wrap, sys.executable, "-m", "cli.main", "serve", *args],
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        # Drain the server's output as it comes: an unread pipe fills up and blocks the server's logging.
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace"))

    def output(self) -> str:
        """Everything the server printed so far (stdout and stderr)."""
        return "".join(self.lines)

    def wait(self, path: str = "/healthz", timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + path, timeout=1).status_code < 500:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not up on {self.url} after {timeout}s")

    def stop(self, timeout: float = 10) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def start_server() -> Iterator:
    servers: list[Server] = []

    def start(
        env: dict[str, str], wait_path: str = "/healthz", args: tuple[str, ...] = (), timeout: float = 60
    ) -> Server:
        srv = Server(env, args)
        servers.append(srv)
        srv.wait(wait_path, timeout)
        return srv

    yield start
    for srv in servers:
        srv.stop()


ADMIN_KEY = "test-admin-key-0123456789abcdef"
ADMIN = {"X-API-Key": ADMIN_KEY}  # the headers of an admin call
LOC = {"easting": "700010.5", "northing": "5710003.25", "heading": "42.5"}  # the form of an add


@pytest.fixture(scope="session")
def server(tiny_data: Path, tiny_artifacts: Path, start_server) -> Server:
    return start_server(
        {
            "IMGSEARCH_DATA": str(tiny_data),
            "IMGSEARCH_ARTIFACTS": str(tiny_artifacts),
            "IMGSEARCH_PRESET": "paper",
            "IMGSEARCH_ADMIN_KEY": ADMIN_KEY,
        }
    )


@pytest.fixture()
def artifacts(tiny_artifacts: Path, tmp_path: Path) -> Path:
    """A copy of the tiny artifacts of this test's own, to change (the session's stay as built)."""
    import shutil

    return Path(shutil.copytree(tiny_artifacts, tmp_path / "artifacts"))


@pytest.fixture()
def family(artifacts: Path, tiny_data: Path) -> Path:
    """The index family of the copied artifacts: versions, CURRENT, the change log."""
    from indexer.store import index_family

    return index_family(artifacts, tiny_data, "paper")


@pytest.fixture()
def serve(tiny_data: Path, artifacts: Path) -> Iterator:
    """Start servers on this test's artifacts (paper preset, the admin key set unless admin_key=""),
    waiting for `wait`; other settings as keyword arguments (allowed_hosts="*" -> IMGSEARCH_ALLOWED_HOSTS).
    All are stopped at the end."""
    servers: list[Server] = []

    def start(workers: int = 1, wait: str = "/readyz", host: str = "127.0.0.1", **settings: str) -> Server:
        env = {
            "IMGSEARCH_DATA": str(tiny_data),
            "IMGSEARCH_ARTIFACTS": str(artifacts),
            "IMGSEARCH_PRESET": "paper",
            "IMGSEARCH_ADMIN_KEY": ADMIN_KEY,
            "IMGSEARCH_WORKERS": str(workers),
        }
        srv = Server(env | {f"IMGSEARCH_{k.upper()}": v for k, v in settings.items()}, host=host)
        servers.append(srv)
        srv.wait(wait)
        return srv

    yield start
    for srv in servers:
        if srv.proc.poll() is None:
            srv.stop()


N_QUERIES, N_DISTRACTORS = 120, 300


@pytest.fixture(scope="session")
def london_subset(london: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A course-layout folder with some London queries, their relevant map images and distractors."""
    from dataset.layout import load_dataset

    ds = load_dataset(london, check_files=False)
    rng = np.random.default_rng(0)
    with_rel = np.flatnonzero(ds.sim.any(axis=1))
    q = np.sort(rng.choice(with_rel, N_QUERIES, replace=False))
    rel = np.flatnonzero(ds.sim[q].any(axis=0))
    others = rng.choice(np.setdiff1d(np.arange(len(ds.database)), rel), N_DISTRACTORS, replace=False)
    d = np.sort(np.concatenate([rel, others]))
    root = tmp_path_factory.mktemp("london") / "london-subset"
    for side, rows, images in (("database", d, ds.database), ("query", q, ds.queries)):
        (root / side).mkdir(parents=True)
        (root / side / "images").symlink_to(london / side / "images")
        payload = {"im_paths": [images.paths[i] for i in rows], "loc": images.loc[rows].tolist()}
        (root / side / f"{side}.json").write_text(json.dumps(payload))
    with h5py.File(root / "london_gt.h5", "w") as f:
        f["sim"] = ds.sim[np.ix_(q, d)].astype(np.uint8)
        f["fov"] = ds.fov[np.ix_(q, d)].astype(np.float16)
    return root
