"""Read deadlines and the connection cap over real sockets on loopback (app/core/server.py): a
connection that sends nothing, half a request or a byte a second is closed; a slow but steady upload is
served; 1,000 held connections leave a worker answering; bad settings stop `imgsearch serve`."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, Server, free_port

# Small deadlines so the tests stay short; the minimum rate is low enough for a steady upload of the
# tiny data's query photo (~30 KB) spread over a few seconds, far above a byte a second.
HEADER_S, BODY_S, MIN_RATE_KB_S = 2.0, 3.0, 4.0
# The crowd test needs time to open its 1,000 connections and measure before the first deadline.
CROWD_HEADER_S, CROWD_BODY_S = 5.0, 6.0
MARGIN_S = 3.0  # how late a close may come on a busy host
CROWD = 1000


def settings_env(data: Path, artifacts: Path, header_s: float, body_s: float) -> dict[str, str]:
    return {
        "IMGSEARCH_DATA": str(data),
        "IMGSEARCH_ARTIFACTS": str(artifacts),
        "IMGSEARCH_PRESET": "paper",
        "IMGSEARCH_HEADER_TIMEOUT_S": str(header_s),
        "IMGSEARCH_BODY_TIMEOUT_S": str(body_s),
        "IMGSEARCH_BODY_MIN_RATE_KB_S": str(MIN_RATE_KB_S),
    }


@pytest.fixture(scope="module")
def srv(tiny_data: Path, tiny_artifacts: Path, start_server) -> Server:
    return start_server(settings_env(tiny_data, tiny_artifacts, HEADER_S, BODY_S))


def query_jpeg(tiny_data: Path) -> bytes:
    """A real query photo of the tiny data, as the JPEG file a client would upload."""
    q = json.loads((tiny_data / "query" / "query.json").read_text())
    return (tiny_data / q["im_paths"][0]).read_bytes()


def multipart(photo: bytes, boundary: str = "bnd") -> bytes:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + photo + f"\r\n--{boundary}--\r\n".encode()


def search_head(length: int, boundary: str = "bnd") -> bytes:
    return (
        f"POST /search?k=5 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    ).encode()


def until_closed(s: socket.socket, timeout: float) -> tuple[float, bytes]:
    """Seconds until the server closes `s` (end of stream or a reset), and what it sent before."""
    t0 = time.monotonic()
    out = b""
    s.settimeout(timeout)
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"still open after {timeout} s; received {out[:200]!r}")
    return time.monotonic() - t0, out


def is_closed(s: socket.socket) -> bool:
    """Whether the server has closed `s` (non-blocking), without waiting; what it sent is discarded."""
    try:
        while s.recv(65536):
            pass
        return True
    except BlockingIOError:
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_idle_connection_is_closed_silently_at_the_header_deadline(srv: Server) -> None:
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        took, out = until_closed(s, HEADER_S + MARGIN_S)
    assert out == b""
    assert took >= HEADER_S - 0.3, f"closed after {took:.2f} s, before the {HEADER_S} s header deadline"


@pytest.mark.parametrize("partial", [b"GET /hea", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */"])
def test_half_a_request_gets_408_and_is_closed(srv: Server, partial: bytes) -> None:
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(partial)
        took, out = until_closed(s, HEADER_S + MARGIN_S)
    assert took >= HEADER_S - 0.3
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), out[:200]
    assert b"connection: close" in head.lower()
    answer = json.loads(body)
    assert answer["code"] == "request_timeout" and "headers" in answer["detail"]


def test_next_request_on_a_kept_alive_connection_has_its_own_header_deadline(srv: Server) -> None:
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        s.settimeout(5)
        first = b""
        while b'"ok"}' not in first:  # the whole answer, headers and body (they may come apart)
            chunk = s.recv(65536)
            assert chunk, first
            first += chunk
        assert first.startswith(b"HTTP/1.1 200 ")
        time.sleep(1)  # within uvicorn's keep-alive timeout (5 s)
        s.sendall(b"GET /heal")
        took, out = until_closed(s, HEADER_S + MARGIN_S)
    assert out.startswith(b"HTTP/1.1 408 ") and took >= HEADER_S - 0.3


def test_byte_a_second_body_is_cut_after_the_body_deadline(srv: Server, tiny_data: Path) -> None:
    body = multipart(query_jpeg(tiny_data))
    out = b""
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(search_head(len(body)))
        t0 = time.monotonic()
        s.settimeout(1.0)  # also the pace: a byte, then a second of listening
        for i in range(len(body)):
            if time.monotonic() - t0 > BODY_S + MARGIN_S:
                pytest.fail(f"still open {BODY_S + MARGIN_S} s after the headers, at a byte a second")
            try:
                s.send(body[i : i + 1])
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                break
            if not chunk:
                break
            out += chunk
        took = time.monotonic() - t0
    assert out == b"", out[:200]  # cut, not answered
    assert took >= BODY_S - 0.3, f"cut after {took:.2f} s, before the {BODY_S} s body deadline"
    # The cut is logged as the body phase's; and the request's log line says the client is gone
    # (nginx's 499), not what the app answered nobody. Both lines may reach the output after the close.
    deadline = time.monotonic() + 10
    while not (
        "phase body" in srv.output()
        and any('"status": 499' in line and "/search" in line for line in srv.output().splitlines())
    ):
        assert time.monotonic() < deadline, srv.output()[-2000:]
        time.sleep(0.2)


def test_slow_steady_upload_above_the_minimum_rate_is_answered(srv: Server, tiny_data: Path) -> None:
    body = multipart(query_jpeg(tiny_data))
    spread = BODY_S + 2  # longer than the body deadline alone: it passes on its rate
    assert len(body) / spread > MIN_RATE_KB_S * 1024 * 1.2  # the pace stays above the minimum rate
    pieces = 20
    step = -(-len(body) // pieces)
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        t0 = time.monotonic()
        s.sendall(search_head(len(body)))
        for i in range(0, len(body), step):
            s.sendall(body[i : i + step])
            time.sleep(spread / pieces)
        sent = time.monotonic() - t0
        _, out = until_closed(s, 30)
    assert sent > BODY_S + 1
    head, _, payload = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), out[:300]
    assert json.loads(payload)["results"]


def _raise_own_open_files_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the open-files hard limit {hard} is below the {need} this test needs")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def test_a_thousand_held_connections_leave_the_worker_answering(
    tiny_data: Path, tiny_artifacts: Path, start_server
) -> None:
    srv = start_server(settings_env(tiny_data, tiny_artifacts, CROWD_HEADER_S, CROWD_BODY_S))
    _raise_own_open_files_limit(CROWD + 256)
    photo = query_jpeg(tiny_data)
    body = multipart(photo)
    idle: list[socket.socket] = []
    slow: list[socket.socket] = []
    stop = threading.Event()

    def dribble() -> None:  # one more body byte a second on every slow connection
        sent = 1
        while not stop.wait(1.0):
            for s in slow:
                with contextlib.suppress(OSError):  # closed by the server: what the test waits for
                    s.send(body[sent : sent + 1])
            sent += 1

    dribbler = threading.Thread(target=dribble, daemon=True)
    try:
        first = time.monotonic()
        for i in range(CROWD):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            if i % 2:
                s.sendall(search_head(len(body)) + body[:1])
                slow.append(s)
            else:
                idle.append(s)
            s.setblocking(False)
        opened = time.monotonic()
        dribbler.start()
        health = httpx.get(srv.url + "/healthz", timeout=1)
        assert health.status_code == 200
        found = httpx.post(srv.url + "/search", params={"k": 5}, files={"file": ("q.jpg", photo)}, timeout=2)
        assert found.status_code == 200, found.text
        assert found.json()["results"]
        # Measured under load: every held connection was still open.
        assert time.monotonic() - first < CROWD_HEADER_S - 0.5, "too slow to measure before the first deadline"
        held = idle + slow
        assert sum(not is_closed(s) for s in held) == CROWD
        give_up = opened + CROWD_BODY_S + MARGIN_S + 2
        while (open_ := sum(not is_closed(s) for s in held)) and time.monotonic() < give_up:
            time.sleep(0.25)
        assert open_ == 0, f"{open_} of {CROWD} held connections still open after the deadlines"
        assert httpx.get(srv.url + "/healthz", timeout=1).status_code == 200
    finally:
        stop.set()
        for s in idle + slow:
            s.close()
    assert srv.output().count("phase body") >= len(slow)


class _Limited:
    """`imgsearch serve` (no data: it stays up, not ready) started under the given open-files limits,
    its output drained by a thread (an unread pipe would block the server)."""

    def __init__(self, tmp_path: Path, soft: int, hard: int) -> None:
        env = os.environ | {
            "IMGSEARCH_DATA": str(tmp_path / "nowhere"),
            "IMGSEARCH_ARTIFACTS": str(tmp_path),
            "IMGSEARCH_PORT": str(free_port()),
            "IMGSEARCH_WORKERS": "1",
            "IMGSEARCH_LOG_FORMAT": "text",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
        )
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, marker: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if any(marker in line for line in self.lines):
                return "".join(self.lines)
            time.sleep(0.1)
        pytest.fail(f"no {marker!r} in the output of serve:\n{''.join(self.lines)[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _soft_open_files(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-files line in /proc limits")


def test_serve_raises_its_open_files_limit_for_the_cap(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2048 + 256  # the default cap and the headroom of app/core/server.py
    srv = _Limited(tmp_path, 256, hard)
    try:
        srv.wait_for("Uvicorn running on")
        want = need if hard == resource.RLIM_INFINITY else min(need, hard)
        assert _soft_open_files(srv.proc.pid) == want
    finally:
        srv.stop()


def test_serve_warns_when_the_hard_limit_is_below_the_cap(tmp_path: Path) -> None:
    srv = _Limited(tmp_path, 512, 1024)
    try:
        out = srv.wait_for("open-files hard limit")
        assert "IMGSEARCH_MAX_CONNECTIONS=2048" in out
        srv.wait_for("Uvicorn running on")
        assert _soft_open_files(srv.proc.pid) == 1024
    finally:
        srv.stop()
