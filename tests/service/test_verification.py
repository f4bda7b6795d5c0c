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
