"""Geometric verification through the API: verified hits carry inliers, come first, and locate the photo."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest

from common.pipeline import get_pipeline


@pytest.fixture(scope="module")
def verify_server(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory, start_server):
    from cli.stages import build_all

    artifacts = tmp_path_factory.mktemp("verify-artifacts")
    build_all(tiny_data, artifacts, "vlad-verify", jobs=1)
    env = {
        "IMGSEARCH_DATA": str(tiny_data),
        "IMGSEARCH_ARTIFACTS": str(artifacts),
        "IMGSEARCH_PRESET": "vlad-verify",
    }
    return start_server(env, wait_path="/readyz")


def test_search_reports_inliers_of_verified_hits(verify_server, tiny_data: Path) -> None:
    q = json.loads((tiny_data / "query" / "query.json").read_text())
    with h5py.File(tiny_data / "london_gt.h5") as f:
        sim = f["sim"][()].astype(bool)
    qi = int(np.flatnonzero(sim.any(axis=1))[0])
    img = (tiny_data / q["im_paths"][qi]).read_bytes()
    r = httpx.post(verify_server.url + "/search", params={"k": 60}, files={"file": ("q.jpg", img)})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    verify = get_pipeline("vlad-verify").verify
    assert verify is not None
    n = verify.n
    verified = [h for h in results if h["inliers"] is not None]
    assert len(verified) == min(n, len(results))
    assert all(h["inliers"] >= 0 for h in verified)
    # Verified hits come first, ordered by their score, which grows with inliers at equal distance.
    scores = [h["score"] for h in verified]
    assert scores == sorted(scores, reverse=True)
    # On the synthetic street the best verified hit is a relevant map image, with many inliers.
    assert sim[qi, results[0]["id"]] and results[0]["inliers"] > 20
    # ... so the service can say where the photo was taken: within the 25 m relevance radius.
    est = r.json()["query_location"]
    truth = q["loc"][qi]
    assert est["status"] == "estimated" and est["confidence"] > 0.5
    assert np.hypot(est["easting"] - truth[0], est["northing"] - truth[1]) < 25


def _query(tiny_data: Path) -> tuple[bytes, list[float], np.ndarray, int, np.ndarray]:
    """A query with a relevant map image: its bytes, true location, the sim matrix, its row, the map's locations."""
    q = json.loads((tiny_data / "query" / "query.json").read_text())
    db = json.loads((tiny_data / "database" / "database.json").read_text())
    with h5py.File(tiny_data / "london_gt.h5") as f:
        sim = f["sim"][()].astype(bool)
    qi = int(np.flatnonzero(sim.any(axis=1))[0])
    return (tiny_data / q["im_paths"][qi]).read_bytes(), q["loc"][qi], sim, qi, np.asarray(db["loc"], np.float64)


def _latlon(e: float, n: float) -> tuple[float, float]:
    from retrieval.locate import to_latlon

    return to_latlon(e, n, 32630)


def test_a_position_prior_searches_the_map_images_within_its_radius(verify_server, tiny_data: Path) -> None:
    img, truth, sim, qi, map_loc = _query(tiny_data)
    fix = (truth[0] + 20.0, truth[1] - 15.0)  # a phone's fix, 25 m off
    lat, lon = _latlon(*fix)
    params = {"k": 100, "lat": lat, "lon": lon, "radius_m": 60}
    r = httpx.post(verify_server.url + "/search", params=params, files={"file": ("q.jpg", img)})
    assert r.status_code == 200, r.text
    body = r.json()
    inside = np.flatnonzero(np.hypot(map_loc[:, 0] - fix[0], map_loc[:, 1] - fix[1]) <= 60)
    assert 0 < len(inside) < len(map_loc)
    assert body["prior"]["candidates"] == len(inside) and body["prior"]["accuracy_m"] == pytest.approx(20.0)
    # Every candidate within the radius is scored (k covers them all), and nothing outside it.
    assert sorted(h["id"] for h in body["results"]) == sorted(inside.tolist())
    assert sim[qi, body["results"][0]["id"]]
    scores = [h["score"] for h in body["results"] if h["inliers"] is not None]
    assert scores == sorted(scores, reverse=True)
    # Where it was taken: estimated right whenever the fused evidence is likely enough (the tiny street's
    # fused scores sit near the 0.5 line, so over a few queries).
    q = json.loads((tiny_data / "query" / "query.json").read_text())
    estimates = []
    for row in np.flatnonzero(sim.any(axis=1))[:6]:
        t = q["loc"][row]
        lat, lon = _latlon(t[0] + 20.0, t[1] - 15.0)
        data = (tiny_data / q["im_paths"][row]).read_bytes()
        est = httpx.post(
            verify_server.url + "/search",
            params={"lat": lat, "lon": lon, "radius_m": 60},
            files={"file": ("q.jpg", data)},
        ).json()["query_location"]
        if est["status"] == "estimated":
            estimates.append(np.hypot(est["easting"] - t[0], est["northing"] - t[1]))
            assert 0.0 <= est["heading_confidence"] <= 1.0
    assert estimates and max(estimates) < 25
    # Without a prior the answer keeps its shape: no prior, no explain fields.
    plain = httpx.post(verify_server.url + "/search", params={"k": 5}, files={"file": ("q.jpg", img)}).json()
    assert "prior" not in plain and "query_size" not in plain and "matches" not in plain["results"][0]


def test_a_prior_with_no_map_image_inside_answers_nothing_and_unknown(verify_server, tiny_data: Path) -> None:
    img, truth, *_ = _query(tiny_data)
    lat, lon = _latlon(truth[0] + 50_000.0, truth[1])
    r = httpx.post(
        verify_server.url + "/search",
        params={"lat": lat, "lon": lon, "radius_m": 100, "accuracy_m": 10},
        files={"file": ("q.jpg", img)},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["results"] == [] and body["query_location"]["status"] == "unknown"
    assert body["prior"]["candidates"] == 0 and body["prior"]["accuracy_m"] == 10


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"lat": 51.5}, "lon"),
        ({"lat": 51.5, "lon": -0.1}, "radius_m"),
        ({"lon": -0.1, "radius_m": 100}, "lat"),
        ({"accuracy_m": 10}, "accuracy_m"),
        ({"lat": 51.5, "lon": -0.1, "radius_m": 0}, "radius_m"),
        ({"lat": 51.5, "lon": -0.1, "radius_m": 5000.5}, "radius_m"),
        ({"lat": 91, "lon": -0.1, "radius_m": 100}, "lat"),
        ({"lat": "nan", "lon": -0.1, "radius_m": 100}, "lat"),
        ({"lat": 51.5, "lon": "inf", "radius_m": 100}, "lon"),
        ({"lat": 51.5, "lon": -0.1, "radius_m": 100, "accuracy_m": -1}, "accuracy_m"),
    ],
)
def test_a_partial_or_out_of_range_prior_is_refused_naming_the_parameter(
    verify_server, tiny_data: Path, params: dict, named: str
) -> None:
    img, *_ = _query(tiny_data)
    r = httpx.post(verify_server.url + "/search", params=params, files={"file": ("q.jpg", img)})
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_request" and f"query.{named}" in r.json()["detail"]


def test_explain_returns_the_inlier_matches_in_each_images_own_pixels(verify_server, tiny_data: Path) -> None:
    import io

    from PIL import Image

    img, *_ = _query(tiny_data)
    small = Image.open(io.BytesIO(img))
    # The photo at 3x its size: the pipeline reads it shrunk, the matches come back in its own pixels.
    big = io.BytesIO()
    small.resize((small.width * 3, small.height * 3), Image.Resampling.BICUBIC).save(big, "JPEG", quality=95)
    for data, scale in ((img, 1), (big.getvalue(), 3)):
        r = httpx.post(
            verify_server.url + "/search", params={"k": 10, "explain": True}, files={"file": ("q.jpg", data)}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["query_size"] == [small.width * scale, small.height * scale]
        for h in body["results"]:
            if h["inliers"] is None:
                assert h.get("matches") is None
                continue
            assert len(h["matches"]) == min(200, h["inliers"])
            w, hh = h["image_size"]
            q = np.array([m["query"] for m in h["matches"]]).reshape(-1, 2)
            m = np.array([m["map"] for m in h["matches"]]).reshape(-1, 2)
            assert np.all((q >= 0) & (q <= [small.width * scale, small.height * scale]))
            assert np.all((m >= 0) & (m <= [w, hh]))
            if h["inliers"] >= 10:
                # The transform maps the photo's inliers onto the map's: within RANSAC's threshold
                # (8 px at the pipeline's scale), in the map image's pixels.
                t = np.array(h["transform"])
                err = np.hypot(*(q @ t[:, :2].T + t[:, 2] - m).T)
                assert np.median(err) < 8 * max(w, hh) / 341
        best = body["results"][0]
        if scale == 1:
            spread = np.ptp(np.array([m["query"][0] for m in best["matches"]]))
        else:  # the same matches, three times as far apart
            assert np.ptp(np.array([m["query"][0] for m in best["matches"]])) == pytest.approx(3 * spread, rel=0.3)


def test_an_image_added_online_is_found_by_a_prior_search_at_once(verify_server, tiny_data: Path) -> None:
    """Loopback-only service without a key: the admin routes answer locally."""
    img, truth, *_ = _query(tiny_data)
    far = (truth[0] + 20_000.0, truth[1] + 20_000.0)  # no map image stands there
    lat, lon = _latlon(*far)
    params = {"lat": lat, "lon": lon, "radius_m": 50}

    def near() -> list[int]:
        r = httpx.post(verify_server.url + "/search", params=params, files={"file": ("q.jpg", img)})
        assert r.status_code == 200, r.text
        return [h["id"] for h in r.json()["results"]]

    assert near() == []
    loc = {"easting": str(far[0] + 5), "northing": str(far[1]), "heading": "90"}
    added = httpx.post(verify_server.url + "/images", files={"file": ("x.jpg", img)}, data=loc, timeout=60)
    assert added.status_code == 201, added.text
    new_id = added.json()["id"]
    try:
        assert near() == [new_id]
    finally:
        assert httpx.delete(f"{verify_server.url}/images/{new_id}", timeout=60).status_code == 204
    assert near() == []
