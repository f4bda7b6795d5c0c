"""Observability over real HTTP on loopback: Prometheus /metrics (also summed over several workers),
request ids, JSON request log lines on the server's stdout, /readyz."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN_KEY, ROOT, Server, free_port

HEX_ID = re.compile(r"[0-9a-f]{32}")
PIPELINE_STAGES = {"decode", "features", "encode", "search"}  # the paper preset has no verify stage

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def query_image(data: Path, i: int = 0) -> bytes:
    q = json.loads((data / "query" / "query.json").read_text())
    return (data / q["im_paths"][i]).read_bytes()


def scrape(url: str) -> Samples:
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def json_lines(srv: Server) -> list[dict]:
    out = []
    for line in srv.output().splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def wait_for_log(srv: Server, request_id: str, timeout: float = 5) -> dict:
    """The request log line of `request_id` (written as the response ends, so maybe just after it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rec in json_lines(srv):
            if rec.get("request_id") == request_id and rec.get("logger") == "imgsearch.request":
                return rec
        time.sleep(0.05)
    raise AssertionError(f"no request log line for {request_id}:\n{srv.output()[-3000:]}")


def test_metrics_expose_stage_histograms_after_search(server: Server, tiny_data: Path) -> None:
    before = scrape(server.url)
    r = httpx.post(server.url + "/search", params={"k": 4}, files={"file": ("q.jpg", query_image(tiny_data))})
    assert r.status_code == 200, r.text
    after = scrape(server.url)
    for stage in PIPELINE_STAGES:
        name = "imgsearch_search_stage_seconds_count"
        assert value(after, name, stage=stage) == value(before, name, stage=stage) + 1, stage
        assert value(after, "imgsearch_search_stage_seconds_sum", stage=stage) > value(
            before, "imgsearch_search_stage_seconds_sum", stage=stage
        )
    assert value(after, "imgsearch_search_stage_seconds_count", stage="verify") == 0
    assert value(after, "imgsearch_search_hits_sum") == value(before, "imgsearch_search_hits_sum") + 4
    # Requests by handler, method and exact status; latency with the same labels.
    labels = {"handler": "/search", "method": "POST", "status": "200"}
    assert value(after, "http_requests_total", **labels) == value(before, "http_requests_total", **labels) + 1
    n = "http_request_duration_seconds_count"
    assert value(after, n, **labels) == value(before, n, **labels) + 1
    # Scrapes are not traffic: /metrics is not instrumented.
    assert not any(dict(lbl).get("handler") == "/metrics" for _, lbl in after)


def test_error_status_is_counted_exactly(server: Server) -> None:
    labels = {"handler": "/search", "method": "POST", "status": "400"}
    before = value(scrape(server.url), "http_requests_total", **labels)
    r = httpx.post(server.url + "/search", files={"file": ("q.jpg", b"not an image at all")})
    assert r.status_code == 400
    assert value(scrape(server.url), "http_requests_total", **labels) == before + 1


def test_index_size_gauge_matches_readyz(server: Server, tiny_data: Path, tiny_artifacts: Path) -> None:
    from indexer import store
    from indexer.store import index_family

    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200
    body = ready.json()
    current = store.current_version(index_family(tiny_artifacts, tiny_data, "paper"))
    manifest = json.loads((current / "manifest.json").read_text())
    assert body["status"] == "ready" and body["reason"] is None and body["preset"] == "paper"
    assert body["index_version"] == current.name and body["size"] == manifest["count"]
    samples = scrape(server.url)
    assert value(samples, "imgsearch_index_size", preset="paper") == manifest["count"]
    assert value(samples, "imgsearch_index_loads_total", outcome="loaded") == 1


def test_metrics_and_precision_do_not_shadow_each_other(server: Server) -> None:
    assert "imgsearch_search_stage_seconds" in httpx.get(server.url + "/metrics").text
    unauth = httpx.get(server.url + "/metrics/precision")
    assert unauth.status_code == 401 and unauth.json()["code"] == "unauthorized"
    ok = httpx.get(server.url + "/metrics/precision", headers={"X-API-Key": ADMIN_KEY})
    assert ok.status_code == 200 and "precision" in ok.json()
    # /metrics/precision is traffic like any other endpoint; only /metrics itself is left out.
    samples = scrape(server.url)
    assert value(samples, "http_requests_total", handler="/metrics/precision", method="GET", status="200") >= 1
    assert value(samples, "http_requests_total", handler="/metrics/precision", method="GET", status="401") >= 1
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert "/metrics" in paths and "/metrics/precision" in paths


def test_request_id_echoed_and_in_json_log_line(server: Server, tiny_data: Path) -> None:
    rid = "obs-test.search_1"
    r = httpx.post(
        server.url + "/search",
        params={"k": 3},
        files={"file": ("q.jpg", query_image(tiny_data, 1))},
        headers={"X-Request-ID": rid},
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    rec = wait_for_log(server, rid)
    assert rec["level"] == "INFO" and rec["method"] == "POST" and rec["path"] == "/search"
    assert rec["status"] == 200 and rec["hits"] == 3
    assert 0 < rec["duration_ms"] < 60_000
    assert set(rec["timings_ms"]) == PIPELINE_STAGES
    assert all(v >= 0 for v in rec["timings_ms"].values())
    # The stages ran inside the request: together they cannot take longer than it did.
    assert sum(rec["timings_ms"].values()) <= rec["duration_ms"]
    assert {"time", "message", "pid"} <= set(rec)
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", rec["time"])


@pytest.mark.parametrize("sent", [None, "", "has space", "x" * 65, "semi;colon", "ünïcode"])
def test_unsafe_or_missing_request_id_is_replaced(server: Server, sent: str | None) -> None:
    headers = {} if sent is None else {b"X-Request-ID": sent.encode()}  # raw UTF-8 bytes for the non-ASCII one
    r = httpx.get(server.url + "/healthz", headers=headers)
    assert r.status_code == 200
    assert HEX_ID.fullmatch(r.headers["x-request-id"]) and r.headers["x-request-id"] != sent


def test_request_id_of_64_chars_is_kept(server: Server) -> None:
    rid = "A-z_0.9" * 9 + "x"
    assert len(rid) == 64
    assert httpx.get(server.url + "/healthz", headers={"X-Request-ID": rid}).headers["x-request-id"] == rid


def test_error_body_unchanged_and_request_id_in_header_and_log(server: Server) -> None:
    rid = "obs-test-error-1"
    r = httpx.post(server.url + "/search", files={"file": ("q.jpg", b"\x00" * 50)}, headers={"X-Request-ID": rid})
    assert r.status_code == 400 and set(r.json()) == {"code", "detail"}
    assert r.headers["x-request-id"] == rid
    rec = wait_for_log(server, rid)
    assert rec["status"] == 400 and rec["path"] == "/search" and "hits" not in rec
    r = httpx.get(server.url + "/no/such/route", headers={"X-Request-ID": "obs-test-404"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "obs-test-404"
    assert wait_for_log(server, "obs-test-404")["status"] == 404
    # A percent-encoded newline in the path is escaped in the message (no forged line in text logs).
    httpx.get(server.url + "/x%0Afake", headers={"X-Request-ID": "obs-test-nl"})
    rec = wait_for_log(server, "obs-test-nl")
    assert rec["path"] == "/x\nfake" and "\n" not in rec["message"] and "/x\\nfake" in rec["message"]


def test_server_logs_are_one_json_object_per_line(server: Server) -> None:
    httpx.get(server.url + "/healthz")
    lines = [line for line in server.output().splitlines() if line.strip()]
    assert lines
    bad = [line for line in lines if not line.startswith("{")]
    assert not bad, bad[:5]
    records = json_lines(server)
    assert len(records) == len(lines)
    assert all({"time", "level", "logger", "message", "request_id"} <= set(rec) for rec in records)
    # uvicorn's own lines share the format; its access log is replaced by ours.
    assert any(rec["logger"] == "uvicorn.error" for rec in records)
    assert not any(rec["logger"] == "uvicorn.access" for rec in records)


def serve_workers(
    start_server, tiny_data: Path, tiny_artifacts: Path, n: int, wait_path: str
) -> tuple[Server, list[dict]]:
    """A server of n workers on the tiny artifacts, once each has logged (with its own pid) that it
    serves the index; and those log records."""
    env = {
        "IMGSEARCH_DATA": str(tiny_data),
        "IMGSEARCH_ARTIFACTS": str(tiny_artifacts),
        "IMGSEARCH_PRESET": "paper",
        "IMGSEARCH_WORKERS": str(n),
    }
    srv = start_server(env, wait_path=wait_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        served = [r for r in json_lines(srv) if r["message"].startswith("serving index")]
        if len({r["pid"] for r in served}) == n:
            return srv, served
        time.sleep(0.2)
    raise AssertionError(f"not every worker loaded the index:\n{srv.output()[-3000:]}")


def test_first_worker_serves_before_the_others_start(tiny_data: Path, tiny_artifacts: Path, start_server) -> None:
    # cli/supervisor.py: on a host with fewer cores than workers, the first answer does not wait for
    # every worker to load; the others start once the first serves.
    srv, served = serve_workers(start_server, tiny_data, tiny_artifacts, 3, "/readyz")
    records = json_lines(srv)
    first = next(i for i, r in enumerate(records) if r["message"].startswith("serving index"))
    later = {r["pid"] for r in served} - {records[first]["pid"]}
    # Nothing of the other two workers (not even uvicorn's "Started server process") precedes it.
    assert all(r["pid"] not in later for r in records[:first]), srv.output()[-3000:]
    said = [r for r in records if r["message"].startswith("first worker serving after")]
    assert [r["pid"] for r in said] == [srv.proc.pid]  # the supervisor's line
    assert httpx.get(srv.url + "/readyz").status_code == 200
    srv.stop()
    assert srv.proc.returncode == 0


def test_two_workers_metrics_add_up(tiny_data: Path, tiny_artifacts: Path, start_server) -> None:
    srv, _ = serve_workers(start_server, tiny_data, tiny_artifacts, 2, "/healthz")
    n_ready, n_search = 12, 4
    for _ in range(n_ready):
        # One connection per request, so the workers share them.
        assert httpx.get(srv.url + "/readyz").status_code == 200
    img = query_image(tiny_data)
    for _ in range(n_search):
        assert httpx.post(srv.url + "/search", files={"file": ("q.jpg", img)}).status_code == 200
    size = httpx.get(srv.url + "/readyz").json()["size"]
    # Whichever worker answers a scrape reports the totals of both.
    for _ in range(6):
        s = scrape(srv.url)
        assert value(s, "imgsearch_index_loads_total", outcome="loaded") == 2
        assert value(s, "http_requests_total", handler="/readyz", method="GET", status="200") == n_ready + 1
        assert value(s, "http_requests_total", handler="/search", method="POST", status="200") == n_search
        for stage in PIPELINE_STAGES:
            assert value(s, "imgsearch_search_stage_seconds_count", stage=stage) == n_search
        assert value(s, "imgsearch_index_size", preset="paper") == size
    # The per-process files live in a fresh folder that the serve command removes when it stops.
    folder = next(
        r["message"].rsplit(" ", 1)[1] for r in json_lines(srv) if "prometheus multiprocess folder" in r["message"]
    )
    assert Path(folder).is_dir()
    srv.stop()
    assert srv.proc.returncode == 0
    assert not Path(folder).exists()


@pytest.mark.parametrize(
    ("var", "bad"),
    [
        ("IMGSEARCH_WORKERS", "0"),
        ("IMGSEARCH_WORKERS", "two"),
        ("IMGSEARCH_LOG_FORMAT", "xml"),
        ("IMGSEARCH_HEADER_TIMEOUT_S", "0"),
        ("IMGSEARCH_HEADER_TIMEOUT_S", "soon"),
        ("IMGSEARCH_BODY_TIMEOUT_S", "-1"),
        ("IMGSEARCH_BODY_MIN_RATE_KB_S", "0"),
        ("IMGSEARCH_MAX_CONNECTIONS", "0"),
        ("IMGSEARCH_ALLOWED_HOSTS", " , "),
        ("IMGSEARCH_THUMBNAILS_PER_S", "0"),
        ("IMGSEARCH_THUMBNAIL_BURST", "many"),
    ],
)
def test_invalid_serve_settings_exit_2(var: str, bad: str) -> None:
    import os

    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "serve"],
        cwd=ROOT,
        env=os.environ | {var: bad, "IMGSEARCH_PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and var in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_text_log_format_carries_request_id() -> None:
    from app.core.logs import RequestIdFilter, log_config, request_id_var

    # The configured formatter and filter on a private handler: dictConfig itself would close
    # every handler of the process, pytest's included.
    handler = logging.StreamHandler(stream := io.StringIO())
    handler.setFormatter(logging.Formatter(log_config("text")["formatters"]["service"]["format"]))
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("imgsearch.test-text")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        token = request_id_var.set("rid-text-1")
        logger.warning("hello %s", "there")
        request_id_var.reset(token)
        logger.warning("outside a request")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("WARNING imgsearch.test-text [rid-text-1] hello there"), lines
    assert lines[1].endswith("[-] outside a request"), lines


@pytest.fixture
def failing_app_url() -> Iterator[str]:
    """A real server on loopback for an app whose route fails unexpectedly."""
    from app.api.routes import metrics
    from app.core import observability

    app = FastAPI()
    observability.install(app)
    app.include_router(metrics.router)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("unexpected")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_unhandled_error_is_json_500_with_request_id(failing_app_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="imgsearch.request"):
        r = httpx.get(failing_app_url + "/boom", headers={"X-Request-ID": "boom-1"})
    assert r.status_code == 500 and r.json() == {"code": "internal_error", "detail": "internal server error"}
    assert r.headers["x-request-id"] == "boom-1"
    deadline = time.monotonic() + 5
    while not any(getattr(rec, "status", None) == 500 for rec in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.05)
    traceback_rec = next(rec for rec in caplog.records if rec.exc_info)
    assert "unexpected" in str(traceback_rec.exc_info[1])
    line = next(rec for rec in caplog.records if getattr(rec, "status", None) == 500)
    assert line.request_id == "boom-1" and line.levelno == logging.ERROR
    # And the counter saw it as a 500 of that handler.
    samples = scrape(failing_app_url)
    assert value(samples, "http_requests_total", handler="/boom", method="GET", status="500") == 1


def test_stage_metrics_unit() -> None:
    from app.core.observability import ServiceMetrics

    m = ServiceMetrics()
    m.observe_stages({"decode": 0.002, "verify": 0.07})
    text = m.exposition().decode()
    assert 'imgsearch_search_stage_seconds_count{stage="decode"} 1.0' in text
    assert 'imgsearch_search_stage_seconds_bucket{le="0.075",stage="verify"} 1.0' in text
    assert 'imgsearch_search_stage_seconds_bucket{le="0.05",stage="verify"} 0.0' in text
