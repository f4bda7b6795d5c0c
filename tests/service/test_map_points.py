"""GET /map/points, the map images' positions the page's map draws: WGS84 from the index's UTM
locations, every image up to `limit`, an evenly thinned and stable subset beyond it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import numpy as np
import pytest
from pyproj import Transformer

from tests.conftest import ADMIN, LOC, Server


def points(srv: Server, **params: int) -> dict:
    r = httpx.get(srv.url + "/map/points", params=params, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    return r.json()


def test_every_map_image_in_wgs84(server: Server) -> None:
    body = points(server)
    n = httpx.get(server.url + "/readyz").json()["size"]
    assert body["total"] == body["shown"] == n
    assert body["ids"] == sorted(set(body["ids"])) and len(body["ids"]) == n
    assert len(body["latitude"]) == len(body["longitude"]) == len(body["heading"]) == n
    # Each point is its image's location (GET /images/{id}, UTM zone 30N) converted to WGS84.
    utm = [httpx.get(f"{server.url}/images/{i}").json()["location"] for i in body["ids"]]
    lon, lat = Transformer.from_crs("EPSG:32630", "EPSG:4326", always_xy=True).transform(
        [u["easting"] for u in utm], [u["northing"] for u in utm]
    )
    np.testing.assert_allclose(body["latitude"], lat, atol=1e-6)
    np.testing.assert_allclose(body["longitude"], lon, atol=1e-6)
    np.testing.assert_allclose(body["heading"], [u["heading"] for u in utm], atol=0.05)
    # The synthetic street lies in London, rounded as documented.
    assert all(51.4 < v < 51.6 for v in body["latitude"]) and all(-0.2 < v < 0 for v in body["longitude"])
    assert all(round(v, 6) == v for v in body["latitude"] + body["longitude"])
    assert all(round(v, 1) == v for v in body["heading"])


@pytest.mark.parametrize("limit", [1, 7, 59, 60, 61, 200_000])
def test_limit_thins_evenly_and_stably(server: Server, limit: int) -> None:
    full = points(server)
    n = full["total"]
    body = points(server, limit=limit)
    step = math.ceil(n / limit)
    assert body["total"] == n and body["shown"] == len(body["ids"]) == math.ceil(n / step) <= limit
    assert body["ids"] == full["ids"][::step]
    at = {i: k for k, i in enumerate(full["ids"])}
    assert body["latitude"] == [full["latitude"][at[i]] for i in body["ids"]]
    assert body["longitude"] == [full["longitude"][at[i]] for i in body["ids"]]
    assert points(server, limit=limit) == body  # the same subset every time


@pytest.mark.parametrize("limit", ["0", "-3", "200001", "many"])
def test_a_bad_limit_is_refused(server: Server, limit: str) -> None:
    r = httpx.get(server.url + "/map/points", params={"limit": limit})
    assert r.status_code == 422
    body = r.json()
    assert body["code"] == "invalid_request" and "limit" in body["detail"]


def test_documented_in_openapi(server: Server) -> None:
    op = httpx.get(server.url + "/openapi.json").json()["paths"]["/map/points"]["get"]
    ok = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.endswith("/MapPoints") and {"422", "503"} <= op["responses"].keys()
    limit = next(p for p in op["parameters"] if p["name"] == "limit")
    assert limit["schema"]["minimum"] == 1 and limit["schema"]["maximum"] == 200_000


def test_an_image_added_online_appears(serve, tiny_data: Path) -> None:
    srv = serve()
    before = points(srv)
    q = json.loads((tiny_data / "query" / "query.json").read_text())
    photo = (tiny_data / q["im_paths"][0]).read_bytes()
    added = httpx.post(srv.url + "/images", headers=ADMIN, data=LOC, files={"file": ("new.jpg", photo)}, timeout=60)
    assert added.status_code == 201, added.text
    new = added.json()["id"]
    after = points(srv)
    assert after["total"] == before["total"] + 1 and after["ids"][-1] == new
    lon, lat = Transformer.from_crs("EPSG:32630", "EPSG:4326", always_xy=True).transform(
        float(LOC["easting"]), float(LOC["northing"])
    )
    assert after["latitude"][-1] == pytest.approx(lat, abs=1e-6)
    assert after["longitude"][-1] == pytest.approx(lon, abs=1e-6)
    assert after["heading"][-1] == pytest.approx(float(LOC["heading"]), abs=0.05)
    # A deleted one leaves it.
    assert httpx.delete(f"{srv.url}/images/{new}", headers=ADMIN).status_code == 204
    assert points(srv) == before
