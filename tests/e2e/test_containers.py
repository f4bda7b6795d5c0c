"""The containers, built and run by a real Docker engine: `docker-compose up` on the generated demo
data and on the London data (mounted read-only), each checked over HTTP (/readyz, /search), for its
health status and its non-root user, then taken down with its volumes.

No registry is reachable here, so the images are built on a local Python 3.11 base made by
scripts/base-image.sh (debootstrap + docker import), passed as the BASE_IMAGE build argument.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from common.pipeline import DEFAULT_PRESET
from tests.conftest import ROOT, free_port, london_or_fail

BASE_IMAGE = "imgsearch-base:3.11-bookworm"
SERVE_IMAGE, INDEXER_IMAGE = "imgsearch:latest", "imgsearch-indexer:latest"
MAX_SERVE_IMAGE_BYTES = 1_000_000_000


def _missing(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {what}; .ci/run installs and starts it")
    pytest.skip(what)


def compose_bin() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        _missing("docker-compose (Debian package) is not installed")
    return str(exe)


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_compose_files_are_valid(tmp_path: Path) -> None:
    out = run([compose_bin(), "config"])
    assert out.returncode == 0, out.stderr
    conf = yaml.safe_load(out.stdout)
    indexer, api = conf["services"]["indexer"], conf["services"]["api"]
    assert (indexer["build"]["target"], api["build"]["target"]) == ("indexer", "serve")
    assert indexer["build"]["args"]["BASE_IMAGE"] == api["build"]["args"]["BASE_IMAGE"] == "python:3.11-slim"
    assert api["depends_on"]["indexer"]["condition"] == "service_completed_successfully"
    # Closed by default: published on this machine's loopback only, with an init to pass signals on.
    assert [_published(p) for p in api["ports"]] == [("127.0.0.1", "8000", "8000")]
    assert api["init"] is True and api["environment"]["IMGSEARCH_ADMIN_KEY"] == ""
    assert api["environment"]["IMGSEARCH_ALLOWED_HOSTS"] == "localhost,127.0.0.1,::1"
    opened = run([compose_bin(), "config"], env=os.environ | {"IMGSEARCH_BIND": "0.0.0.0", "IMGSEARCH_PORT": "9000"})
    ports = yaml.safe_load(opened.stdout)["services"]["api"]["ports"]
    assert [_published(p) for p in ports] == [("0.0.0.0", "9000", "8000")]
    # The data override mounts the folder read-only, and refuses to run without one.
    cmd = [compose_bin(), "-f", "docker-compose.yml", "-f", "docker-compose.data.yml", "config"]
    out = run(cmd, env=os.environ | {"DATA_DIR": str(tmp_path), "BASE_IMAGE": "local/base:1"})
    assert out.returncode == 0, out.stderr
    assert f"{tmp_path}:/data:ro" in out.stdout and "IMGSEARCH_DATA: /data" in out.stdout
    assert "BASE_IMAGE: local/base:1" in out.stdout
    env = {k: v for k, v in os.environ.items() if k != "DATA_DIR"}
    bad = run(cmd, env=env)
    assert bad.returncode != 0 and "set DATA_DIR" in bad.stderr


def _published(port: str | dict) -> tuple[str, str, str]:
    """(host address, host port, container port) of a compose port, in either syntax."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "")), str(port["published"]), str(port["target"])
    host, published, target = str(port).removesuffix("/tcp").rsplit(":", 2)
    return host, published, target


def test_images_run_the_readme_make_targets() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    used = set(re.findall(r"^RUN make (\w+)", dockerfile, flags=re.M)) | set(
        re.findall(r'"make", "(\w+)"', dockerfile + (ROOT / "docker-compose.yml").read_text())
    )
    assert used and used <= targets and {"venv", "build", "serve"} <= used
    assert re.search(r"^USER (?!root)\w+", dockerfile, flags=re.M), "the images must not run as root"
    # The build context leaves out what `make run` and the tests write (GBs).
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "artifacts", ".git"} <= set(ignored)


# --- a real engine -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> None:
    if shutil.which("docker") is None or run(["docker", "info"], timeout=60).returncode != 0:
        _missing("no Docker engine is running (apt-get install docker.io; dockerd)")
    if run(["docker", "image", "inspect", BASE_IMAGE], timeout=60).returncode != 0:
        out = run(["bash", str(ROOT / "scripts" / "base-image.sh"), BASE_IMAGE], timeout=900)
        assert out.returncode == 0, out.stdout + out.stderr


def image_id(tag: str) -> str:
    out = run(["docker", "image", "inspect", "-f", "{{.Id}}", tag], timeout=60)
    return out.stdout.strip() if out.returncode == 0 else ""


def build(*services: str, env: dict[str, str] | None = None) -> None:
    """`docker-compose build`, then the images it replaced removed: a rebuild leaves the previous image
    untagged, and every run would otherwise leave GBs of them on the engine's disk."""
    before = {tag: image_id(tag) for tag in (SERVE_IMAGE, INDEXER_IMAGE)}
    env = os.environ | (env or {}) | {"BASE_IMAGE": BASE_IMAGE}
    out = run([compose_bin(), "build", *services], env=env, timeout=2400)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    for tag, old in before.items():
        if old and image_id(tag) != old:
            run(["docker", "image", "rm", old], timeout=120)  # refused (and kept) while a container uses it


@pytest.fixture(scope="module")
def images(engine: None) -> None:
    build()


def test_serving_image_is_lean(images: None) -> None:
    size = int(run(["docker", "image", "inspect", "-f", "{{.Size}}", SERVE_IMAGE]).stdout)
    assert size < MAX_SERVE_IMAGE_BYTES, f"serving image is {size / 1e9:.2f} GB"
    probe = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m)])"
    mods = ["tensorflow", "keras", "matplotlib", "pytest", "playwright", "ruff", "hypothesis", "schemathesis"]
    out = run(["docker", "run", "--rm", SERVE_IMAGE, ".venv/bin/python", "-c", probe, *mods])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"the serving image carries {out.stdout.strip()}"
    # The default pipeline trains in numpy: the indexer has no TensorFlow unless built for `paper`.
    out = run(["docker", "run", "--rm", INDEXER_IMAGE, ".venv/bin/python", "-c", probe, "tensorflow", "pytest"])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


class Stack:
    """One `docker-compose up -d` under a project name of its own; `down -v` removes it and its volumes."""

    def __init__(self, name: str, files: list[str], env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [compose_bin(), "-p", name] + [a for f in files for a in ("-f", f)]
        self.env = os.environ | env | {"BASE_IMAGE": BASE_IMAGE, "IMGSEARCH_PORT": str(self.port)}

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return run([*self.cmd, *args], env=self.env, timeout=timeout)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def inspect(self, service: str) -> dict:
        return json.loads(run(["docker", "inspect", self.container(service)]).stdout)[0]

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "60").stdout

    def wait(self, cond: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not within {timeout:.0f} s; logs:\n{self.logs()}")
            time.sleep(2)


@pytest.fixture()
def stack(images: None) -> Iterator[Callable[..., Stack]]:
    started: list[Stack] = []

    def start(files: list[str], env: dict[str, str], timeout: float) -> Stack:
        s = Stack(f"imgsearch-test-{os.getpid()}-{len(started)}", files, env)
        started.append(s)
        out = s.compose("up", "-d", timeout=timeout)
        assert out.returncode == 0, out.stdout + out.stderr
        # up -d returns once the api started, i.e. after the one-shot indexer exited 0.
        indexer = s.inspect("indexer")["State"]
        assert indexer["Status"] == "exited" and indexer["ExitCode"] == 0, s.logs()
        s.wait(lambda: s.inspect("api")["State"]["Health"]["Status"] == "healthy", "api healthy", 180)
        return s

    yield start
    for s in started:
        s.compose("down", "-v", "--remove-orphans", timeout=300)
        assert s.compose("ps", "-q").stdout.strip() == ""


def check_api(s: Stack, query: bytes, preset: str, size: int | None = None) -> dict:
    ready = httpx.get(s.url + "/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["preset"] == preset and (size is None or ready.json()["size"] == size)
    r = httpx.post(s.url + "/search", params={"k": 5}, files={"file": ("q.jpg", query)}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 5 and body["preset"] == preset
    api = s.inspect("api")
    assert api["Config"]["User"] == "app"
    uid = run(["docker", "exec", s.container("api"), "id", "-u"]).stdout.strip()
    assert uid not in ("", "0"), f"the api runs as uid {uid!r}"
    return api


def test_compose_up_serves_the_demo_data(stack) -> None:
    s = stack(["docker-compose.yml"], {}, timeout=1800)
    # A query photo of the generated street, from the volume the indexer wrote.
    dest = Path(os.environ.get("TMPDIR", "/tmp")) / f"imgsearch-demo-q-{os.getpid()}.jpg"
    out = run(["docker", "cp", f"{s.container('api')}:/artifacts/demo-data/query/images/q_0002.jpg", str(dest)])
    assert out.returncode == 0, out.stderr
    query = dest.read_bytes()
    dest.unlink()
    check_api(s, query, DEFAULT_PRESET)
    # Published on loopback only, and with no admin key nothing that changes data answers.
    bindings = s.inspect("api")["HostConfig"]["PortBindings"]["8000/tcp"]
    assert [b["HostIp"] for b in bindings] == ["127.0.0.1"]
    form = {"easting": "1", "northing": "1", "heading": "0"}
    for r in (
        httpx.post(s.url + "/images", files={"file": ("q.jpg", query)}, data=form),
        httpx.delete(s.url + "/images/0"),
        httpx.post(s.url + "/index/rollback"),
    ):
        assert r.status_code == 403 and r.json()["code"] == "admin_locked", r.text
    assert httpx.get(s.url + "/readyz").json()["last_change"] == 0


def status(url: str) -> int | None:
    """The status of GET url, None while nothing answers (a container starting: the port resets)."""
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return None


def test_a_container_not_ready_for_too_long_is_restarted(stack) -> None:
    s = stack(["docker-compose.yml"], {"IMGSEARCH_HEALTH_RESTART_S": "20"}, timeout=1800)
    api = s.container("api")
    index = "$(ls -d /artifacts/*/index-*/v*)/index.faiss"
    hide = run(["docker", "exec", api, "sh", "-c", f"mv {index} /artifacts/hidden.faiss"])
    assert hide.returncode == 0, hide.stderr
    assert run(["docker", "restart", api]).returncode == 0  # it starts again without a loadable index
    s.wait(lambda: status(s.url + "/readyz") == 503, "not ready", 120)
    restarts = s.inspect("api")["RestartCount"]
    # The health check stops it after 20 s not ready; the restart policy starts it again.
    s.wait(lambda: s.inspect("api")["RestartCount"] > restarts, "a restart", 180)
    # Mended (the container may be between two starts: try until it runs), it is healthy again.
    mend = ["docker", "exec", api, "sh", "-c", f"mv /artifacts/hidden.faiss {index}"]
    s.wait(lambda: run(mend).returncode == 0, "the index put back", 120)
    s.wait(lambda: s.inspect("api")["State"]["Health"]["Status"] == "healthy", "healthy again", 240)


def test_compose_up_serves_london_read_only(stack) -> None:
    london = london_or_fail()
    # The README's commands for `paper`, which trains with Keras: an indexer built with TensorFlow first.
    env = {"DATA_DIR": str(london), "IMGSEARCH_PRESET": "paper", "INDEXER_EXTRAS": "train"}
    build("indexer", env=env)
    probe = "import importlib.util as u; print(bool(u.find_spec('tensorflow')))"
    assert run(["docker", "run", "--rm", INDEXER_IMAGE, ".venv/bin/python", "-c", probe]).stdout.strip() == "True"
    s = stack(["docker-compose.yml", "docker-compose.data.yml"], env, timeout=2400)
    query = json.loads((london / "query" / "query.json").read_text())["im_paths"][0]
    api = check_api(s, (london / query).read_bytes(), "paper", size=3291)
    data_mounts = [m for m in api["Mounts"] if m["Destination"] == "/data"]
    assert len(data_mounts) == 1 and data_mounts[0]["RW"] is False
    denied = run(["docker", "exec", s.container("api"), "touch", "/data/written-by-the-container"])
    assert denied.returncode != 0 and not (london / "written-by-the-container").exists()
