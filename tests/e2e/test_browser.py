"""The web page in a real browser (Debian's chromium driven by playwright) against a real server,
plus the thumbnail route it uses. Screenshots go to test-artifacts/browser/; the map's and the
evidence's are read back with PIL to check that each thing is drawn where it belongs."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import h5py
import httpx
import numpy as np
import pytest
from PIL import Image

from app.api.routes.web import THUMB_SIDE
from common.files import confined_file
from tests.conftest import ADMIN, ADMIN_KEY, LOC, ROOT, Server

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


def open_page(ctx, url: str):
    """A page of the context on `url`; records page errors and every URL the browser asked for."""
    pg = ctx.new_page()
    pg.errors, pg.requests = [], []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("console", lambda m: m.type == "error" and pg.errors.append(m.text))
    pg.on("request", lambda r: pg.requests.append(r.url))
    pg.goto(url + "/")
    return pg


@pytest.fixture
def page(browser, server: Server) -> Iterator:
    """A fresh page on the shared server (paper preset: no verification, so no matches)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 1400})
    yield open_page(ctx, server.url)
    ctx.close()


@pytest.fixture(scope="module")
def verify_server(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory, start_server) -> Server:
    """The tiny street with a verifying preset: hits carry inliers and matches, photos are located."""
    from cli.stages import build_all

    artifacts = tmp_path_factory.mktemp("verify-artifacts")
    build_all(tiny_data, artifacts, "vlad-verify", jobs=1)
    env = {"IMGSEARCH_DATA": str(tiny_data), "IMGSEARCH_ARTIFACTS": str(artifacts), "IMGSEARCH_PRESET": "vlad-verify"}
    return start_server(env, wait_path="/readyz")


@pytest.fixture
def vpage(browser, verify_server: Server) -> Iterator:
    ctx = browser.new_context(viewport={"width": 1280, "height": 1400})
    yield open_page(ctx, verify_server.url)
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
        assert page.locator("#map [data-role=estimate]").count() == 1
    else:
        assert "unknown" in loc.inner_text()
    # The map draws every map image, one marker per hit labelled with its rank, and a scale bar.
    wait_for_map_points(page, server)
    assert page.locator("#map svg g.hit").count() == K
    assert sorted(int(t) for t in page.locator("#map svg g.hit text").all_text_contents()) == list(range(1, K + 1))
    assert re.fullmatch(r"[\d,]+ k?m", page.locator("#map [data-role=scale] text").text_content() or "")
    # The paper preset verifies nothing: no matches to draw, and the page says so.
    assert "no matches to show" in page.locator("#evidence").inner_text()

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


# --- the map, the prior and the evidence (a verifying preset on the tiny street) --------------------

MAP_PROBE = """points => {
    const svg = document.querySelector('#map svg'), R = svg.getBoundingClientRect();
    return points.map(([x, y]) => {
        const e = document.elementFromPoint(R.x + x, R.y + y);
        const hit = e && e.closest('g.hit');
        return {role: e && e.dataset.role || null, rank: hit ? +hit.dataset.rank : null};
    });
}"""

# Centres (relative to the map) and colours of what the map drew.
MAP_STATE = """() => {
    const svg = document.querySelector('#map svg'), R = svg.getBoundingClientRect();
    const centre = e => {
        const r = e.getBoundingClientRect();
        return [r.x + r.width / 2 - R.x, r.y + r.height / 2 - R.y];
    };
    const one = sel => document.querySelector('#map ' + sel);
    const css = (sel, prop) => one(sel) && getComputedStyle(one(sel))[prop];
    const scale = one('[data-role=scale]');
    const est = one('[data-role=estimate]'), arrow = one('[data-role=estimate-heading]');
    const prior = one('[data-role=prior]'), marker = one('[data-role=prior-marker]');
    return {
        size: [R.width, R.height],
        pxPerM: +scale.dataset.px / +scale.dataset.metres,
        hits: [...document.querySelectorAll('#map g.hit')].map(g => ({
            rank: +g.dataset.rank, id: +g.dataset.id, centre: centre(g.querySelector('circle'))})),
        hitColour: css('g.hit circle', 'fill'),
        points: one('[data-role=map-points]').getAttribute('d'),
        pointColour: css('[data-role=map-points]', 'stroke'),
        estimate: est && {centre: centre(est), r: +est.getAttribute('r'), tip: [
            +arrow.getAttribute('x2') - +est.getAttribute('cx'), +arrow.getAttribute('y2') - +est.getAttribute('cy')]},
        estColour: css('[data-role=estimate-heading]', 'stroke'),
        prior: prior && {centre: centre(prior), r: +prior.getAttribute('r')},
        priorColour: css('[data-role=prior]', 'stroke'),
        marker: marker && centre(marker),
        markerColour: css('[data-role=prior-marker]', 'fill'),
    };
}"""


def rgb(css: str) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in re.findall(r"\d+", css)[:3])
    return r, g, b


def has_colour(img: Image.Image, xy: tuple[float, float], colour: str, tol: int = 40) -> bool:
    """Whether a pixel next to xy (3x3, for antialiasing and rounding) has the colour."""
    want = rgb(colour)
    x0, y0 = round(xy[0]), round(xy[1])
    for x in range(x0 - 1, x0 + 2):
        for y in range(y0 - 1, y0 + 2):
            if 0 <= x < img.width and 0 <= y < img.height:
                got = img.getpixel((x, y))
                if all(abs(a - b) <= tol for a, b in zip(got, want, strict=False)):
                    return True
    return False


def shot(locator, name: str) -> Image.Image:
    SHOTS.mkdir(parents=True, exist_ok=True)
    return Image.open(io.BytesIO(locator.screenshot(path=str(SHOTS / name)))).convert("RGB")


def dots(d: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in re.findall(r"M(-?[\d.]+) (-?[\d.]+)", d)]


def wait_for_map_points(pg, srv: Server) -> dict:
    """The map points the service lists, once the page drew them (whole map: all in view)."""
    pts = httpx.get(srv.url + "/map/points").json()
    pg.wait_for_function(
        "n => { const p = document.querySelector('#map [data-role=map-points]');"
        " return p !== null && (p.getAttribute('d').match(/M/g) || []).length === n; }",
        arg=pts["shown"],
        timeout=30_000,
    )
    return pts


def wait_idle(pg) -> None:
    """The latest search answered and drawn."""
    pg.wait_for_function("() => !document.body.classList.contains('busy')", timeout=60_000)


def metres(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Distance of two (lat, lon) points a few hundred metres apart."""
    kx = 111_320 * math.cos(math.radians(a[0]))
    return math.hypot((a[0] - b[0]) * 111_320, (a[1] - b[1]) * kx)


def located_query(tiny: Path) -> Path:
    """A tiny query that has relevant map images (so verified, with matches, and located)."""
    q = json.loads((tiny / "query" / "query.json").read_text())
    with h5py.File(tiny / "london_gt.h5") as f:
        qi = int(np.flatnonzero(f["sim"][()].any(axis=1))[0])
    return tiny / q["im_paths"][qi]


def search_on_page(pg, photo: Path, k: int = K) -> dict:
    """Choose a photo on the page; the service's answer to the page's own request."""
    pg.select_option("#k", str(k))
    with pg.expect_response(lambda r: urlsplit(r.url).path == "/search", timeout=60_000) as resp:
        pg.set_input_files("#file", str(photo))
    body = resp.value.json()
    wait_for_hits(pg, len(body["results"]))
    wait_idle(pg)
    return body


def test_map_draws_the_map_images_hits_and_estimate(vpage, verify_server: Server, tiny_data: Path) -> None:
    pts = wait_for_map_points(vpage, verify_server)
    assert pts["shown"] == pts["total"] == 60
    body = search_on_page(vpage, located_query(tiny_data))
    url = urlsplit(next(u for u in vpage.requests if urlsplit(u).path == "/search"))
    assert parse_qs(url.query) == {"k": [str(K)], "explain": ["true"]}  # no prior yet
    est = body["query_location"]
    assert est["status"] == "estimated" and len(body["results"]) == K

    vpage.click("#view-around")
    state = vpage.evaluate(MAP_STATE)
    scale = state["pxPerM"]
    # Every hit is drawn, at its map image's position: distances on the map are metres on the ground.
    assert sorted(h["rank"] for h in state["hits"]) == list(range(1, K + 1))
    utm = {h["id"]: (h["location"]["easting"], h["location"]["northing"]) for h in body["results"]}
    first = next(h for h in state["hits"] if h["rank"] == 1)
    for h in state["hits"]:
        ground = math.dist(utm[h["id"]], utm[first["id"]])
        assert math.dist(h["centre"], first["centre"]) == pytest.approx(ground * scale, rel=0.01, abs=1.5)
    # The estimate: a circle of 25 m, a heading arrow along the estimated heading (compass degrees).
    assert state["estimate"]["r"] == pytest.approx(25 * scale, abs=0.2)
    tip = state["estimate"]["tip"]
    assert math.degrees(math.atan2(tip[0], -tip[1])) % 360 == pytest.approx(est["heading"] % 360, abs=1.0)
    heading_row = vpage.locator("#location").inner_text()
    assert "heading confidence" in heading_row
    if est["heading_confidence"] is not None:
        assert f"{est['heading_confidence']:.2f}" in heading_row

    # The screenshot has each thing where it was drawn, in its colour.
    img = shot(vpage.locator("#map svg"), "map_answer.png")
    assert all(abs(a - b) <= 1 for a, b in zip(img.size, state["size"], strict=True))
    hit_at = [(h["centre"][0], h["centre"][1] + 5) for h in state["hits"]]  # below the rank's digits
    tops = vpage.evaluate(MAP_PROBE, hit_at)
    checked = [xy for xy, top, h in zip(hit_at, tops, state["hits"], strict=True) if top["rank"] == h["rank"]]
    assert len(checked) >= 2
    assert all(has_colour(img, xy, state["hitColour"]) for xy in checked)
    cx, cy = state["estimate"]["centre"]
    mid = (cx + tip[0] * 0.75, cy + tip[1] * 0.75)  # along the heading arrow
    assert has_colour(img, mid, state["estColour"])
    shown = [p for p in dots(state["points"]) if 0 <= p[0] < img.width and 0 <= p[1] < img.height]
    tops = vpage.evaluate(MAP_PROBE, shown)
    grey = [p for p, top in zip(shown, tops, strict=True) if top["role"] == "map-points"]
    assert len(grey) >= 10 and all(has_colour(img, p, state["pointColour"], tol=25) for p in grey)
    assert vpage.errors == []


def test_a_click_on_the_map_sets_the_prior(vpage, verify_server: Server, tiny_data: Path) -> None:
    pts = wait_for_map_points(vpage, verify_server)
    body = search_on_page(vpage, located_query(tiny_data))
    vpage.click("#view-whole")
    state = vpage.evaluate(MAP_STATE)
    assert state["prior"] is None and state["marker"] is None
    top = next(h for h in state["hits"] if h["rank"] == 1)
    before = shot(vpage.locator("#map svg"), "map_before_prior.png")
    assert has_colour(before, top["centre"], state["hitColour"])

    # Click on hit #1: the prior is its map image's position (a radius that keeps its circle in view).
    vpage.fill("#radius", "20")
    box = vpage.locator("#map svg").bounding_box()
    click = (box["x"] + top["centre"][0], box["y"] + top["centre"][1])
    with vpage.expect_response(lambda r: "lat=" in r.url and urlsplit(r.url).path == "/search") as resp:
        vpage.mouse.click(*click)
    params = parse_qs(urlsplit(resp.value.url).query)
    assert params.keys() == {"k", "lat", "lon", "radius_m", "explain"}  # accuracy left to the service
    assert params["k"] == [str(K)] and params["radius_m"] == ["20"] and params["explain"] == ["true"]
    prior = (float(params["lat"][0]), float(params["lon"][0]))
    at = pts["ids"].index(body["results"][0]["id"])
    assert metres(prior, (pts["latitude"][at], pts["longitude"][at])) < 1.0
    # The service echoes it and searched the map images within it.
    echo = resp.value.json()["prior"]
    assert (echo["latitude"], echo["longitude"]) == pytest.approx(prior, abs=1e-6)
    assert echo["radius_m"] == 20 and echo["accuracy_m"] == pytest.approx(20 / 3, rel=1e-3)
    near = [metres(prior, p) for p in zip(pts["latitude"], pts["longitude"], strict=True)]
    assert 0 < sum(d <= 19.5 for d in near) <= echo["candidates"] <= sum(d <= 20.5 for d in near) < len(near)
    wait_idle(vpage)

    # The prior is drawn where the click was: its marker, and a circle of its radius around it.
    state = vpage.evaluate(MAP_STATE)
    clicked = top["centre"]
    assert math.dist(state["marker"], clicked) < 1.5 and math.dist(state["prior"]["centre"], clicked) < 1.5
    assert state["prior"]["r"] == pytest.approx(20 * state["pxPerM"], abs=0.2)
    assert f"{prior[0]:.6f}, {prior[1]:.6f}" in vpage.locator("#prior-info").inner_text()
    img = shot(vpage.locator("#map svg"), "map_prior.png")
    assert has_colour(img, clicked, state["markerColour"])
    (cx, cy), r = state["prior"]["centre"], state["prior"]["r"]
    ring = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    ring = [p for p in ring if 2 <= p[0] < img.width - 2 and 2 <= p[1] < img.height - 2]
    tops = vpage.evaluate(MAP_PROBE, ring)
    on_top = [p for p, t in zip(ring, tops, strict=True) if t["role"] == "prior"]
    assert len(on_top) >= 6 and all(has_colour(img, p, state["priorColour"]) for p in on_top)

    # Another radius searches again around the same point; "clear prior" searches without one.
    with vpage.expect_request(lambda r: "radius_m=250" in r.url) as req:
        vpage.fill("#radius", "250")
        vpage.press("#radius", "Enter")
    assert parse_qs(urlsplit(req.value.url).query)["lat"] == params["lat"]
    wait_idle(vpage)
    with vpage.expect_request(lambda r: urlsplit(r.url).path == "/search") as req:
        vpage.click("#clear-prior")
    assert "lat" not in parse_qs(urlsplit(req.value.url).query)
    wait_idle(vpage)
    assert vpage.locator("#map [data-role=prior-marker]").count() == 0
    assert vpage.errors == []


def test_use_my_position_sets_the_prior(browser, verify_server: Server, tiny_data: Path) -> None:
    ctx = browser.new_context(viewport={"width": 1280, "height": 1400})
    try:
        pg = open_page(ctx, verify_server.url)
        pts = wait_for_map_points(pg, verify_server)
        body = search_on_page(pg, located_query(tiny_data))
        best = body["results"][0]["id"]
        at = pts["ids"].index(best)
        here = {"latitude": pts["latitude"][at], "longitude": pts["longitude"][at], "accuracy": 12}
        ctx.grant_permissions(["geolocation"], origin=verify_server.url)
        ctx.set_geolocation(here)
        with pg.expect_response(lambda r: "lat=" in r.url and urlsplit(r.url).path == "/search") as resp:
            pg.click("#use-position")
        params = parse_qs(urlsplit(resp.value.url).query)
        # Three times the fix's accuracy as the radius, the accuracy itself as the prior's.
        assert params["radius_m"] == ["36"] and params["accuracy_m"] == ["12"]
        assert float(params["lat"][0]) == pytest.approx(here["latitude"], abs=1e-6)
        assert float(params["lon"][0]) == pytest.approx(here["longitude"], abs=1e-6)
        echo = resp.value.json()["prior"]
        assert echo["radius_m"] == 36 and echo["accuracy_m"] == 12 and echo["candidates"] >= 1
        wait_idle(pg)
        assert pg.input_value("#radius") == "36" and pg.input_value("#accuracy") == "12"
        # The map turns to the prior: its marker on the position's map image, its circle in view.
        state = pg.evaluate(MAP_STATE)
        assert pg.get_attribute("#view-around", "aria-pressed") == "true"
        same = next(h for h in state["hits"] if h["id"] == best)
        assert math.dist(state["marker"], same["centre"]) < 1.5
        (cx, cy), r = state["prior"]["centre"], state["prior"]["r"]
        assert r == pytest.approx(36 * state["pxPerM"], abs=0.2)
        assert r <= cx <= state["size"][0] - r and r <= cy <= state["size"][1] - r
        img = shot(pg.locator("#map svg"), "map_my_position.png")
        assert has_colour(img, state["marker"], state["markerColour"])
        assert pg.errors == []
    finally:
        ctx.close()


EVIDENCE = """() => {
    const pair = document.querySelector('#evidence [data-role=pair]');
    if (!pair) return null;
    const P = pair.getBoundingClientRect();
    const rect = e => { const r = e.getBoundingClientRect(); return [r.x - P.x, r.y - P.y, r.width, r.height]; };
    const point = (line, x, y) => {
        const p = new DOMPoint(+line.getAttribute(x), +line.getAttribute(y)).matrixTransform(line.getScreenCTM());
        return [p.x - P.x, p.y - P.y];
    };
    const lines = [...pair.querySelectorAll('[data-role=matches] line')];
    return {
        id: +document.querySelector('#evidence').dataset.id,
        photo: rect(pair.querySelector('.ev-query')), map: rect(pair.querySelector('.ev-map')),
        lines: lines.map(l => [point(l, 'x1', 'y1'), point(l, 'x2', 'y2')]),
        colour: lines.length ? getComputedStyle(lines[0]).stroke : null,
        count: document.querySelector('#evidence [data-role=match-count]').textContent,
    };
}"""


def check_evidence(pg, body: dict, hit: dict, name: str) -> None:
    """The selected hit's matches drawn between the photo and its thumbnail, each where it belongs."""
    pg.wait_for_function("id => +document.querySelector('#evidence').dataset.id === id", arg=hit["id"])
    ev = pg.evaluate(EVIDENCE)
    matches = hit["matches"]
    assert len(ev["lines"]) == min(200, len(matches)) > 0
    assert ev["count"] == f"{len(matches)} matches"
    qw, qh = body["query_size"]
    mw, mh = hit["image_size"]
    px, py, pw, ph = ev["photo"]
    mx, my, mwid, mhei = ev["map"]
    for m, (start, end) in zip(matches, ev["lines"], strict=False):
        assert math.dist(start, (px + m["query"][0] * pw / qw, py + m["query"][1] * ph / qh)) < 1.5
        assert math.dist(end, (mx + m["map"][0] * mwid / mw, my + m["map"][1] * mhei / mh)) < 1.5
    img = shot(pg.locator("#evidence [data-role=pair]"), name)
    mids = [((a[0] + b[0]) / 2, (a[1] + b[1]) / 2) for a, b in ev["lines"]]
    assert all(has_colour(img, p, ev["colour"]) for p in mids)
    # Away from every line, the photo shows through: the lines are lines, not a wash of their colour.
    xs, ys = np.meshgrid(np.arange(px + 4, px + pw - 4, 7), np.arange(py + 4, py + ph - 4, 7))
    grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
    far = grid[distance_to_lines(grid, np.array(ev["lines"])) > 4]
    assert len(far) > 50 and sum(not has_colour(img, p, ev["colour"], tol=20) for p in far) > 0.8 * len(far)


def distance_to_lines(p: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """(n,) distance of each of n points to the nearest of the segments (m, 2, 2)."""
    a, b = lines[None, :, 0], lines[None, :, 1]
    ab = b - a
    t = np.clip(((p[:, None] - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-9), 0, 1)
    return np.linalg.norm(p[:, None] - (a + t[..., None] * ab), axis=-1).min(axis=1)


def test_evidence_draws_the_matches_of_the_selected_hit(vpage, verify_server: Server, tiny_data: Path) -> None:
    body = search_on_page(vpage, located_query(tiny_data))
    assert body["query_size"] == list(Image.open(located_query(tiny_data)).size)
    with_matches = [h for h in body["results"] if h.get("matches")]
    assert len(with_matches) >= 2
    # First the first verified hit with matches, highlighted on the map too.
    first = with_matches[0]
    check_evidence(vpage, body, first, "evidence_first.png")
    assert vpage.locator("#map g.hit.selected").get_attribute("data-id") == str(first["id"])
    # A click on another hit's card shows its matches instead.
    other = with_matches[1]
    vpage.click(f"#results .hit-card[data-id='{other['id']}']")
    check_evidence(vpage, body, other, "evidence_other.png")
    assert vpage.locator("#results .hit-card.selected").get_attribute("data-id") == str(other["id"])
    assert vpage.locator("#map g.hit.selected").get_attribute("data-id") == str(other["id"])
    assert vpage.errors == []


def test_the_page_works_with_a_plain_answer(vpage, verify_server: Server, tiny_data: Path) -> None:
    """A service without the prior, explain and heading-confidence fields: the page still draws what it has."""
    photo = located_query(tiny_data)

    def plain(route) -> None:
        # Asked again from here: an intercepted upload's file part is not handed to the handler.
        answer = httpx.post(route.request.url, files={"file": (photo.name, photo.read_bytes())}, timeout=60).json()
        for key in ("prior", "query_size"):
            answer.pop(key, None)
        answer["query_location"].pop("heading_confidence", None)
        for h in answer["results"]:
            for key in ("matches", "transform", "image_size"):
                h.pop(key, None)
        route.fulfill(json=answer)

    vpage.route(re.compile(r".*/search\?.*"), plain)
    wait_for_map_points(vpage, verify_server)
    body = search_on_page(vpage, photo)
    assert "prior" not in body and not any("matches" in h for h in body["results"])
    assert vpage.locator("#map svg g.hit").count() == K
    assert "no matches to show" in vpage.locator("#evidence").inner_text()
    assert "heading confidence" not in vpage.locator("#location").inner_text()
    box = vpage.locator("#map svg").bounding_box()
    with vpage.expect_request(lambda r: "lat=" in r.url):
        vpage.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    wait_idle(vpage)
    state = vpage.evaluate(MAP_STATE)
    assert math.dist(state["marker"], (box["width"] / 2, box["height"] / 2)) < 1.5
    assert "inside" not in vpage.locator("#prior-info").inner_text()  # no echo to count candidates
    assert vpage.errors == []


def test_an_image_added_after_the_page_loaded_is_placed(browser, serve, tiny_data: Path) -> None:
    """The page asks for the positions again when a hit is not among them."""
    srv = serve()
    ctx = browser.new_context(viewport={"width": 1280, "height": 1400})
    try:
        pg = open_page(ctx, srv.url)
        before = wait_for_map_points(pg, srv)
        photo = located_query(tiny_data)
        added = httpx.post(
            srv.url + "/images", headers=ADMIN, data=LOC, files={"file": ("new.jpg", photo.read_bytes())}, timeout=60
        )
        assert added.status_code == 201, added.text
        new = added.json()["id"]
        body = search_on_page(pg, photo)
        assert new in [h["id"] for h in body["results"]]  # the same photo: it is a hit
        pg.wait_for_selector(f"#map g.hit[data-id='{new}']", timeout=30_000)
        assert pg.locator("#map svg g.hit").count() == K
        assert sum(urlsplit(u).path == "/map/points" for u in pg.requests) == 2
        d = pg.get_attribute("#map [data-role=map-points]", "d") or ""
        assert len(dots(d)) == before["shown"] + 1
        assert pg.errors == []
    finally:
        ctx.close()


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
