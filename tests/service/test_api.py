"""The HTTP API over real HTTP on loopback, against an index built by the real pipeline."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from tests.conftest import ADMIN_KEY, Server


def query_image(data: Path, i: int = 0) -> bytes:
    q = json.loads((data / "query" / "query.json").read_text())
    return (data / q["im_paths"][i]).read_bytes()


def blank_png() -> bytes:
    return cv2.imencode(".png", np.full((256, 341, 3), 90, np.uint8))[1].tobytes()


def test_health_and_ready(server: Server) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready" and body["preset"] == "paper" and body["size"] > 0


def test_search_returns_ranked_map_images(server: Server, tiny_data: Path) -> None:
    db = json.loads((tiny_data / "database" / "database.json").read_text())
    r = httpx.post(server.url + "/search", params={"k": 7}, files={"file": ("q.jpg", query_image(tiny_data))})
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert [h["rank"] for h in results] == list(range(1, 8))
    distances = [h["distance"] for h in results]
    assert distances == sorted(distances)
    for h in results:
        # path is exactly the map image's entry in database.json, and the location is that entry's.
        assert h["path"] == db["im_paths"][h["id"]]
        assert [h["location"][c] for c in ("easting", "northing", "heading")] == pytest.approx(db["loc"][h["id"]])
        assert 0.0 <= h["score"] <= 1.0
    # The score is a decreasing function of the distance (sigmoid head over the distance).
    scores = [h["score"] for h in results]
    assert scores == sorted(scores, reverse=True) or scores == sorted(scores)
    assert body["preset"] == "paper" and body["k"] == 7
    est = body["query_location"]
    assert est["status"] in ("estimated", "unknown") and 0 <= est["confidence"] <= 1
    if est["status"] == "estimated":
        assert -90 <= est["latitude"] <= 90 and est["support"] >= 1


def test_default_k_is_10(server: Server, tiny_data: Path) -> None:
    r = httpx.post(server.url + "/search", files={"file": ("q.jpg", query_image(tiny_data, 1))})
    assert r.status_code == 200 and len(r.json()["results"]) == 10


def test_same_image_same_answer(server: Server, tiny_data: Path) -> None:
    img = query_image(tiny_data, 2)
    a = httpx.post(server.url + "/search", files={"file": ("a.jpg", img)}).json()["results"]
    b = httpx.post(server.url + "/search", files={"file": ("other-name.png", img)}).json()["results"]
    assert [h["id"] for h in a] == [h["id"] for h in b]


def test_concurrent_searches_wait_for_the_slot_and_all_answer(server: Server, tiny_data: Path) -> None:
    # The server runs one search at a time (IMGSEARCH_SEARCH_SLOTS, default 1): concurrent requests
    # queue for it, none is refused or mixed up with another's answer.
    images = [query_image(tiny_data, i) for i in range(4)]

    def ids(img: bytes) -> list[int]:
        r = httpx.post(server.url + "/search", files={"file": ("q.jpg", img)}, timeout=60)
        assert r.status_code == 200, r.text
        return [h["id"] for h in r.json()["results"]]

    alone = [ids(img) for img in images]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(ids, images * 2))
    assert together == alone * 2


def test_map_image_finds_itself_first(server: Server, tiny_data: Path) -> None:
    db = json.loads((tiny_data / "database" / "database.json").read_text())
    img = (tiny_data / db["im_paths"][5]).read_bytes()
    r = httpx.post(server.url + "/search", params={"k": 1}, files={"file": ("m.jpg", img)})
    top = r.json()["results"][0]
    assert top["path"] == db["im_paths"][5] and top["distance"] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("k", [0, 101, -1, "ten"])
def test_k_out_of_range(server: Server, tiny_data: Path, k: object) -> None:
    r = httpx.post(server.url + "/search", params={"k": k}, files={"file": ("q.jpg", query_image(tiny_data))})
    assert r.status_code == 422
    assert r.json()["code"] == "invalid_request" and "k" in r.json()["detail"]


def test_blank_image_is_422_no_keypoints(server: Server) -> None:
    r = httpx.post(server.url + "/search", files={"file": ("blank.png", blank_png())})
    assert r.status_code == 422
    assert r.json()["code"] == "no_keypoints"
    assert "keypoints" in r.json()["detail"]


@pytest.mark.parametrize("payload", [b"", b"hello, not an image", b"<html><body>x</body></html>"])
def test_not_an_image_is_400(server: Server, payload: bytes) -> None:
    r = httpx.post(server.url + "/search", files={"file": ("x.png", payload, "image/png")})
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_image"


def test_missing_file_field(server: Server) -> None:
    r = httpx.post(server.url + "/search", data={"other": "x"})
    assert r.status_code == 422
    assert "file" in r.json()["detail"]


def test_too_large_upload_is_413(server: Server) -> None:
    r = httpx.post(server.url + "/search", files={"file": ("big.jpg", b"\xff" * (11 * 1024 * 1024))})
    assert r.status_code == 413 and r.json()["code"] == "too_large"


def test_precision_needs_admin_key(server: Server) -> None:
    assert httpx.get(server.url + "/metrics/precision").status_code == 401
    wrong = httpx.get(server.url + "/metrics/precision", headers={"X-API-Key": "nope"})
    assert wrong.status_code == 403 and wrong.json()["code"] == "forbidden"


def test_precision_reports_cross_validated_figures(server: Server) -> None:
    r = httpx.get(server.url + "/metrics/precision", headers={"X-API-Key": ADMIN_KEY})
    assert r.status_code == 200, r.text
    body = r.json()
    # Out-of-fold over areas, every query outside the test split once; the test split looked at once.
    assert body["split"] == "cv" and body["folds"] == 5 and body["n_queries"] > 0
    assert body["test"]["n_queries"] > 0 and body["queries_total"] + body["test"]["n_queries"] <= 20
    assert body["intervals"]["recall@1"] is not None
    for key, iv in body["intervals"].items():
        if iv is None:  # nothing to resample (e.g. no location estimated)
            continue
        lo, hi = iv
        name, k = key.split("@") if "@" in key else (key, None)
        point = body[name][k] if k else body[name]
        assert 0.0 <= lo <= point <= hi <= 1.0, key
    assert set(body["precision"]) == set(body["recall"]) == {"1", "5", "10", "20", "50"}
    assert set(body["accuracy_within_margin"]) == {"0.1", "0.05", "0.01"}
    for v in [*body["precision"].values(), *body["recall"].values(), *body["accuracy_within_margin"].values()]:
        assert 0.0 <= v <= 1.0
    # recall@k (a relevant hit within the top k) cannot fall as k grows.
    rec = [body["recall"][k] for k in ("1", "5", "10", "20", "50")]
    assert rec == sorted(rec)


def test_unknown_route_is_json_404(server: Server) -> None:
    r = httpx.get(server.url + "/nope")
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_not_ready_without_index(tmp_path: Path, tiny_data: Path, start_server) -> None:
    srv = start_server({"IMGSEARCH_DATA": str(tiny_data), "IMGSEARCH_ARTIFACTS": str(tmp_path / "empty")})
    ready = httpx.get(srv.url + "/readyz")
    assert ready.status_code == 503
    assert "no index built yet" in ready.json()["reason"]
    r = httpx.post(srv.url + "/search", files={"file": ("q.jpg", query_image(tiny_data))})
    assert r.status_code == 503 and r.json()["code"] == "not_ready"


def test_gif_is_415_by_content_not_name(server: Server) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (64, 48), 128).save(buf, format="GIF")
    r = httpx.post(server.url + "/search", files={"file": ("looks-like.jpg", buf.getvalue(), "image/jpeg")})
    assert r.status_code == 415 and r.json()["code"] == "unsupported_format" and "GIF" in r.json()["detail"]


def test_pixel_bomb_is_413_before_decoding(server: Server) -> None:
    # 9000 x 6000 = 54 megapixels of one colour: a small PNG that would decode to 54 MB.
    png = cv2.imencode(".png", np.zeros((6000, 9000), np.uint8))[1].tobytes()
    assert len(png) < 1_000_000
    r = httpx.post(server.url + "/search", files={"file": ("bomb.png", png)})
    assert r.status_code == 413 and r.json()["code"] == "image_too_large" and "9000x6000" in r.json()["detail"]


def test_truncated_jpeg_is_400(server: Server, tiny_data: Path) -> None:
    img = query_image(tiny_data)
    r = httpx.post(server.url + "/search", files={"file": ("cut.jpg", img[: len(img) // 3])})
    assert r.status_code in (400, 422) and r.json()["code"] in ("invalid_image", "no_keypoints")
