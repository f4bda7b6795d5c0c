"""The web page in a real browser (Debian's chromium driven by playwright) against a real server,
plus the thumbnail route it uses. Screenshots go to test-artifacts/browser/."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.api.routes.web import THUMB_SIDE
from common.files import confined_file
from tests.conftest import ADMIN_KEY, ROOT, Server

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "test-artifacts" / "browser"
K = 5


def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not CHROMIUM.is_file():
        _unavailable(f"chromium not found at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-background-networking"],
        )
        yield b
        b.close()


@pytest.fixture
def page(browser, server: Server) -> Iterator:
    """A fresh page; records page errors and every URL the browser asked for."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 1400})
    pg = ctx.new_page()
    pg.errors, pg.requests = [], []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("console", lambda m: m.type == "error" and pg.errors.append(m.text))
    pg.on("request", lambda r: pg.requests.append(r.url))
    pg.goto(server.url + "/")
    yield pg
    ctx.close()


def london_query(london: Path, i: int = 0) -> Path:
    q = json.loads((london / "query" / "query.json").read_text())
    return london / q["im_paths"][i]


def search_api(server: Server, data: bytes, k: int) -> httpx.Response:
    return httpx.post(server.url + "/search", params={"k": k}, files={"file": ("q.jpg", data)}, timeout=60)


def shown_hits(pg) -> list[dict]:
    return pg.eval_on_selector_all(
        "#results .hit-card",
        "cards => cards.map(c => ({rank: +c.dataset.rank, id: +c.dataset.id, path: c.dataset.path,"
        " text: c.innerText}))",
    )


def wait_for_hits(pg, k: int) -> None:
    pg.wait_for_function("k => document.querySelectorAll('#results .hit-card').length === k", arg=k, timeout=60_000)
    # Every thumbnail and the query preview actually decoded in the browser.
    pg.wait_for_function(
        "() => [...document.querySelectorAll('#results img, #query-img')].every(i => i.complete && i.naturalWidth > 0)",
        timeout=30_000,
    )


def test_page_shows_the_hits_of_search(page, server: Server, london: Path) -> None:
    query = london_query(london)
    page.select_option("#k", str(K))
    page.set_input_files("#file", str(query))
    wait_for_hits(page, K)

    api = search_api(server, query.read_bytes(), K)
    assert api.status_code == 200, api.text
    body = api.json()
    hits = shown_hits(page)
    assert [(h["rank"], h["id"], h["path"]) for h in hits] == [(r["rank"], r["id"], r["path"]) for r in body["results"]]
    for h, r in zip(hits, body["results"], strict=True):
        assert f"#{r['rank']}" in h["text"] and f"score {r['score']:.3f}" in h["text"]
        assert f"distance {r['distance']:.3f}" in h["text"]

    loc, est = page.locator("#location"), body["query_location"]
    assert loc.is_visible() and loc.get_attribute("data-status") == est["status"]
    if est["status"] == "estimated":
        assert f"{est['latitude']:.6f}, {est['longitude']:.6f}" in loc.inner_text()
        assert page.locator("#map-sketch [data-role=estimate]").count() == 1
    else:
        assert "unknown" in loc.inner_text()
    # The sketch draws one marker per hit, labelled with its rank, and metre ticks on its axes.
    assert page.locator("#map-sketch svg g.hit").count() == K
    assert sorted(int(t) for t in page.locator("#map-sketch svg g.hit text").all_text_contents()) == list(
        range(1, K + 1)
    )
    assert "north (m)" in page.locator("#map-sketch svg").inner_html()

    # No CDN, no external font: the browser fetched nothing from any other origin.
    foreign = [u for u in page.requests if not u.startswith((server.url + "/", "blob:", "data:"))]
    assert foreign == []
    assert page.errors == []
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "london_query.png"), full_page=True)


def test_drop_a_photo_then_change_k(page, server: Server, london: Path) -> None:
    query = london_query(london, 1)
    # What a drag-and-drop hands the page: a DataTransfer holding the file.
    transfer = page.evaluate_handle(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: "image/jpeg"}));
            return dt;
        }""",
        [base64.b64encode(query.read_bytes()).decode(), query.name],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    wait_for_hits(page, 10)  # the page's default k
    page.select_option("#k", "1")
    wait_for_hits(page, 1)
    top = search_api(server, query.read_bytes(), 1).json()["results"][0]
    assert [(h["id"], h["path"]) for h in shown_hits(page)] == [(top["id"], top["path"])]
    assert page.locator("#query-name").inner_text() == query.name
    assert page.errors == []


def test_bad_file_shows_the_error(page, server: Server, tmp_path: Path) -> None:
    bad = tmp_path / "holiday.jpg"
    bad.write_bytes(b"this is not a photo, only text")
    page.set_input_files("#file", str(bad))
    error = page.locator("#error")
    error.wait_for(state="visible", timeout=30_000)

    api = search_api(server, bad.read_bytes(), 10).json()
    assert api["code"] == "invalid_image"
    assert error.get_attribute("data-code") == "invalid_image"
    assert api["code"] in error.inner_text() and api["detail"] in error.inner_text()
    assert page.locator("#answer").is_hidden()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "bad_file.png"), full_page=True)


# --- the routes behind the page, over HTTP without a browser ---------------------------------------


def test_page_and_assets_are_served(server: Server) -> None:
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert '<script src="/web/app.js"' in r.text
    for name, ctype in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        a = httpx.get(f"{server.url}/web/{name}")
        assert a.status_code == 200 and a.headers["content-type"].startswith(ctype)
    for name in ["index.html", "..%2Fapi%2Fdeps.py", "nope.js"]:
        a = httpx.get(f"{server.url}/web/{name}")
        assert a.status_code == 404 and a.json()["code"] == "not_found"


def test_thumbnail_is_a_small_jpeg_of_the_map_image(server: Server, tiny_data: Path) -> None:
    db = json.loads((tiny_data / "database" / "database.json").read_text())
    r = httpx.get(server.url + "/images/3/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert "max-age" in r.headers["cache-control"]
    thumb = Image.open(io.BytesIO(r.content))
    orig = Image.open(tiny_data / db["im_paths"][3])
    assert thumb.format == "JPEG" and max(thumb.size) <= THUMB_SIDE
    assert thumb.width / thumb.height == pytest.approx(orig.width / orig.height, rel=0.02)


@pytest.mark.parametrize(
    ("image_id", "status", "code"),
    [("999999", 404, "not_found"), ("-1", 404, "not_found"), ("abc", 422, "invalid_request")],
)
def test_thumbnail_of_an_unknown_id(server: Server, image_id: str, status: int, code: str) -> None:
    r = httpx.get(f"{server.url}/images/{image_id}/thumbnail")
    assert r.status_code == status and r.json()["code"] == code


def test_map_image_file_stays_inside_the_data_folder(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "database" / "images").mkdir(parents=True)
    ok = root / "database" / "images" / "a.jpg"
    ok.write_bytes(b"x")
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"x")
    (root / "database" / "images" / "link.jpg").symlink_to(outside)
    assert confined_file(root, "database/images/a.jpg") == ok.resolve()
    for rel in ["../secret.jpg", str(outside), "database/images/link.jpg", "database/images/missing.jpg", "database"]:
        assert confined_file(root, rel) is None, rel


def test_thumbnail_of_an_image_added_online(
    tiny_data: Path, tiny_artifacts: Path, tmp_path: Path, start_server
) -> None:
    """An image added with POST /images lives in the index family folder, not the data folder."""
    artifacts = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, artifacts)  # a server of its own: the shared one stays unchanged
    srv = start_server(
        {
            "IMGSEARCH_DATA": str(tiny_data),
            "IMGSEARCH_ARTIFACTS": str(artifacts),
            "IMGSEARCH_PRESET": "paper",
            "IMGSEARCH_ADMIN_KEY": ADMIN_KEY,
        },
        "/readyz",
    )
    q = json.loads((tiny_data / "query" / "query.json").read_text())
    photo = (tiny_data / q["im_paths"][0]).read_bytes()
    added = httpx.post(
        srv.url + "/images",
        headers={"X-API-Key": ADMIN_KEY},
        data={"easting": "700000", "northing": "5710000", "heading": "90"},
        files={"file": ("new.jpg", photo)},
        timeout=60,
    )
    assert added.status_code == 201, added.text
    r = httpx.get(f"{srv.url}/images/{added.json()['id']}/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb, orig = Image.open(io.BytesIO(r.content)), Image.open(io.BytesIO(photo))
    assert max(thumb.size) <= THUMB_SIDE
    assert thumb.width / thumb.height == pytest.approx(orig.width / orig.height, rel=0.02)


def test_api_docs_render_without_a_cdn(browser, server: Server) -> None:
    """/docs works on a machine without internet: its scripts come from this server."""
    ctx = browser.new_context()
    pg = ctx.new_page()
    requests: list[str] = []
    pg.on("request", lambda r: requests.append(r.url))
    pg.goto(server.url + "/docs")
    pg.wait_for_selector(".opblock-summary-path", timeout=30_000)
    assert "/search" in pg.content()
    ctx.close()
    assert requests and all(u.startswith(server.url) or u.startswith("data:") for u in requests), requests
