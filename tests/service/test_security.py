"""Who may reach and change the service, over real HTTP on loopback: admin endpoints closed without a
key beyond loopback, refused to other sites' pages, the Host allow-list, no CORS; idempotent adds;
a rollback and a recovery with no index loaded.

Every test works on its own copy of the tiny artifacts (the session fixture is shared)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from indexer import store
from tests.conftest import ADMIN, ADMIN_KEY, LOC, Server


def image(data: Path, i: int) -> bytes:
    q = json.loads((data / "query" / "query.json").read_text())
    return (data / q["im_paths"][i]).read_bytes()


def add(srv: Server, img: bytes, headers: dict[str, str | bytes] | None = None) -> httpx.Response:
    return httpx.post(srv.url + "/images", headers=headers, files={"file": ("x.jpg", img)}, data=LOC, timeout=30)


def admin_calls(srv: Server, img: bytes, headers: dict[str, str]) -> list[httpx.Response]:
    return [
        add(srv, img, headers),
        httpx.delete(srv.url + "/images/1", headers=headers),
        httpx.post(srv.url + "/index/rollback", headers=headers),
        httpx.get(srv.url + "/metrics/precision", headers=headers),
    ]


def test_without_a_key_beyond_loopback_admin_endpoints_are_closed(serve, tiny_data: Path) -> None:
    srv = serve(host="0.0.0.0", admin_key="")  # as in the container; the test reaches it on loopback
    img = image(tiny_data, 0)
    for r in admin_calls(srv, img, {}):
        assert r.status_code == 403 and r.json()["code"] == "admin_locked", r.text
        assert "IMGSEARCH_ADMIN_KEY" in r.json()["detail"] and "X-API-Key" in r.json()["detail"]
    # A key sent to a service that has none opens nothing either.
    assert add(srv, img, {"X-API-Key": "anything-at-all-123456"}).status_code == 403
    # Search and reading are open, and nothing was changed.
    r = httpx.post(srv.url + "/search", files={"file": ("q.jpg", img)})
    assert r.status_code == 200 and httpx.get(srv.url + "/images/1").status_code == 200
    assert httpx.get(srv.url + "/readyz").json()["last_change"] == 0


def test_with_a_key_beyond_loopback_admin_endpoints_need_it(serve, tiny_data: Path) -> None:
    srv = serve(host="0.0.0.0", admin_key=ADMIN_KEY)
    img = image(tiny_data, 0)
    assert add(srv, img).status_code == 401
    assert add(srv, img, {"X-API-Key": "x" * 32}).status_code == 403
    assert add(srv, img, ADMIN).status_code == 201


def test_on_loopback_without_a_key_admin_answers_only_same_origin(serve, tiny_data: Path) -> None:
    srv = serve(admin_key="")
    own = srv.url
    img = image(tiny_data, 1)
    refused = [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:1"},  # another port is another origin
        {"Origin": own.replace("http:", "https:")},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "same-origin", "Origin": "http://evil.example"},
    ]
    for headers in refused:
        for r in admin_calls(srv, img, headers):
            assert r.status_code == 403 and r.json()["code"] == "cross_origin", (headers, r.text)
    # A key does not make another site's page welcome either.
    r = add(srv, img, ADMIN | {"Origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["code"] == "cross_origin"
    # The service's own page, a typed URL, a program: allowed.
    assert add(srv, img, {"Origin": own, "Sec-Fetch-Site": "same-origin"}).status_code == 201
    assert add(srv, image(tiny_data, 2), {"Sec-Fetch-Site": "none"}).status_code == 201
    assert add(srv, image(tiny_data, 3)).status_code == 201
    # Searching from another site's page stays possible (the answer is not readable there: no CORS).
    r = httpx.post(srv.url + "/search", headers={"Origin": "http://evil.example"}, files={"file": ("q.jpg", img)})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_no_cors_is_granted(serve) -> None:
    srv = serve()
    for method, path in (("POST", "/images"), ("DELETE", "/images/1"), ("POST", "/search"), ("GET", "/readyz")):
        r = httpx.options(
            srv.url + path,
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": method},
        )
        assert not any(h.startswith("access-control-") for h in r.headers), (path, dict(r.headers))


def test_the_host_header_must_name_an_allowed_host(serve) -> None:
    srv = serve()
    for host in ("rebound.example", f"rebound.example:{srv.port}", "127.0.0.2", "localhost.evil.example"):
        r = httpx.get(srv.url + "/healthz", headers={"Host": host})
        assert r.status_code == 400 and r.json()["code"] == "invalid_host", host
        assert "IMGSEARCH_ALLOWED_HOSTS" in r.json()["detail"]
    for host in ("localhost", f"LOCALHOST:{srv.port}", f"127.0.0.1:{srv.port}", f"[::1]:{srv.port}"):
        assert httpx.get(srv.url + "/healthz", headers={"Host": host}).status_code == 200, host
    opened = serve(allowed_hosts="search.example.org, *.internal")
    assert httpx.get(opened.url + "/healthz", headers={"Host": "search.example.org"}).status_code == 200
    assert httpx.get(opened.url + "/healthz", headers={"Host": "a.b.internal:80"}).status_code == 200
    assert httpx.get(opened.url + "/healthz", headers={"Host": "localhost"}).status_code == 400
    anyone = serve(allowed_hosts="*")
    assert httpx.get(anyone.url + "/healthz", headers={"Host": "whatever.example"}).status_code == 200


def test_adds_are_idempotent_over_http(serve, tiny_data: Path) -> None:
    srv = serve(admin_key="")
    img = image(tiny_data, 4)
    first = add(srv, img)
    assert first.status_code == 201
    again = add(srv, img)
    assert again.status_code == 200 and again.json() == first.json()
    keyed = add(srv, image(tiny_data, 5), {"Idempotency-Key": "upload-5"})
    assert keyed.status_code == 201
    retry = add(srv, image(tiny_data, 5), {"Idempotency-Key": "upload-5"})
    assert retry.status_code == 200 and retry.json()["id"] == keyed.json()["id"]
    clash = add(srv, image(tiny_data, 6), {"Idempotency-Key": "upload-5"})
    assert clash.status_code == 409 and clash.json()["code"] == "idempotency_conflict"
    for bad in ("has space", "", "x" * 129, "\xe9".encode("latin-1")):
        r = add(srv, image(tiny_data, 6), {"Idempotency-Key": bad})
        assert r.status_code == 422 and r.json()["code"] == "invalid_request", (bad, r.text)
    assert httpx.get(srv.url + "/readyz").json()["last_change"] == 2


def _break(version: Path) -> Path:
    """Move a version's index file away (it then does not load); returns where it went."""
    away = version.parent / f".{version.name}-index.faiss.away"
    (version / "index.faiss").rename(away)
    return away


def test_rollback_works_with_no_index_loaded(serve, tiny_data: Path, artifacts: Path, family: Path) -> None:
    from tests.service.test_lifecycle import copy_as_new_version

    first = store.current_version(family)
    bad = copy_as_new_version(family, corrupt=True)  # CURRENT names a corrupt version ...
    away = _break(first)  # ... and the one before does not load either, for now
    srv = serve(wait="/healthz")
    r = httpx.get(srv.url + "/readyz")
    assert r.status_code == 503 and "checksum" in r.json()["reason"]
    away.rename(first / "index.faiss")  # the operator mends the old version, then rolls back to it
    r = httpx.post(srv.url + "/index/rollback", headers=ADMIN, timeout=60)  # it loads the version
    assert r.status_code == 200, r.text
    assert r.json() == {"index_version": first.name, "previous": bad}
    ready = httpx.get(srv.url + "/readyz").json()
    assert ready["status"] == "ready" and ready["index_version"] == first.name and ready["warning"] is None


def test_a_process_with_nothing_loaded_heals_by_itself(serve, family: Path) -> None:
    import time

    version = store.current_version(family)
    away = _break(version)
    srv = serve(wait="/healthz")
    assert httpx.get(srv.url + "/readyz").status_code == 503
    away.rename(version / "index.faiss")  # the file is back (a slow mount, a restored backup)
    deadline = time.monotonic() + 30
    while httpx.get(srv.url + "/readyz").status_code != 200:
        assert time.monotonic() < deadline, "still not ready"
        time.sleep(0.5)
    assert httpx.get(srv.url + "/readyz").json()["index_version"] == version.name
