"""The synthetic demo data: course layout, determinism, ground truth, and images that ORB can match."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from dataset import synthetic
from dataset.layout import load_dataset
from dataset.relevance import fov_matrix, heading_diff, sim_matrix


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.main(tmp_path_factory.mktemp("syn") / "tiny", synthetic.confs["tiny"])


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _orb_score(orb: cv2.ORB, a: np.ndarray, b: np.ndarray) -> int:
    """RANSAC homography inliers of cross-checked, distance-filtered ORB matches."""
    ka, da = orb.detectAndCompute(a, None)
    kb, db = orb.detectAndCompute(b, None)
    if da is None or db is None:
        return 0
    matches = [m for m in cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True).match(da, db) if m.distance < 64]
    if len(matches) < 8:
        return 0
    pa = np.float32([ka[m.queryIdx].pt for m in matches])
    pb = np.float32([kb[m.trainIdx].pt for m in matches])
    _, mask = cv2.findHomography(pa, pb, cv2.RANSAC, 8.0)
    return 0 if mask is None else int(mask.sum())


def test_layout_loads(tiny: Path) -> None:
    ds = load_dataset(tiny)
    conf = synthetic.confs["tiny"]
    assert len(ds.database) == conf.n_db
    assert len(ds.queries) == conf.n_query
    assert ds.database.paths[0] == "database/images/db_0001.jpg"
    assert ds.queries.paths[0] == "query/images/q_0001.jpg"
    img = cv2.imread(str(ds.image_path(ds.queries.paths[0])))
    assert img is not None and img.shape == (256, 341, 3)
    # UTM-like coordinates and compass headings.
    loc = np.concatenate([ds.database.loc, ds.queries.loc])
    assert np.all(np.abs(loc[:, 0] - 700000) < 5000) and np.all(np.abs(loc[:, 1] - 5710000) < 5000)
    assert np.all((loc[:, 2] >= 0) & (loc[:, 2] < 360))
    manifest = json.loads((tiny / "manifest.json").read_text())
    assert manifest["conf"] == conf.model_dump(mode="json") and manifest["counts"]["database"] == conf.n_db
    assert "synthetic" in (tiny / "README.md").read_text().lower()


def test_ground_truth_follows_locations(tiny: Path) -> None:
    ds = load_dataset(tiny)
    nq, ndb = len(ds.queries), len(ds.database)
    assert ds.sim.shape == (nq, ndb) and ds.fov.shape == (nq, ndb)
    assert np.array_equal(ds.sim, sim_matrix(ds.queries.loc, ds.database.loc))
    assert np.allclose(ds.fov, fov_matrix(ds.queries.loc, ds.database.loc), atol=1e-3)
    has_rel = ds.sim.any(axis=1)
    assert has_rel.mean() >= 0.8  # most queries have a relevant map image
    assert ds.sim.sum() >= 3 * has_rel.sum()  # and usually several
    # Cameras look across the street: headings are about +-90 degrees from the street bearing.
    defaults = synthetic.SyntheticConf()
    bearing = defaults.street_bearing_deg
    off = heading_diff(np.concatenate([ds.database.loc, ds.queries.loc])[:, 2], bearing)
    assert np.all(np.abs(off - 90) <= defaults.query_yaw_jitter_deg + 0.01)


def test_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = synthetic.main(tmp_path / "again", synthetic.confs["tiny"])
    assert _hashes(again) == _hashes(tiny)
    other = synthetic.main(tmp_path / "other", synthetic.confs["tiny"].model_copy(update={"seed": 1}))
    assert _hashes(other)["database/images/db_0001.jpg"] != _hashes(tiny)["database/images/db_0001.jpg"]


def test_orb_finds_many_keypoints(tiny: Path) -> None:
    ds = load_dataset(tiny)
    orb = cv2.ORB_create(nfeatures=500)
    paths = ds.database.paths[::7] + ds.queries.paths[::3]
    counts = [len(orb.detect(cv2.imread(str(ds.image_path(p)), cv2.IMREAD_GRAYSCALE), None)) for p in paths]
    assert min(counts) >= 200
    assert np.median(counts) >= 400


def test_relevant_pairs_share_content(tiny: Path) -> None:
    ds = load_dataset(tiny)
    orb = cv2.ORB_create(nfeatures=500)

    def gray(rel: str) -> np.ndarray:
        return cv2.imread(str(ds.image_path(rel)), cv2.IMREAD_GRAYSCALE)

    dist = np.hypot(*(ds.queries.loc[:, None, :2] - ds.database.loc[None, :, :2]).transpose(2, 0, 1))
    rng = np.random.default_rng(0)
    rel_scores, non_scores, wins = [], [], []
    queries = np.flatnonzero(ds.sim.any(axis=1))[:10]
    for i in queries:
        q = gray(ds.queries.paths[i])
        best = int(np.argmax(np.where(ds.sim[i], ds.fov[i], -1)))
        # Hard negatives: the nearest map image looking at the other side, and a same-side one far away.
        opposite = np.flatnonzero(heading_diff(ds.database.loc[:, 2], ds.queries.loc[i, 2]) > 120)
        same_far = np.flatnonzero(~ds.sim[i] & (dist[i] > 60) & (ds.fov[i] == 0))
        negatives = [int(opposite[np.argmin(dist[i, opposite])]), int(rng.choice(same_far))]
        assert not ds.sim[i, negatives].any()
        r = _orb_score(orb, q, gray(ds.database.paths[best]))
        n = [_orb_score(orb, q, gray(ds.database.paths[j])) for j in negatives]
        rel_scores.append(r)
        non_scores.extend(n)
        wins.append(r > max(n))
    assert len(queries) >= 8
    assert np.mean(rel_scores) >= 50
    assert np.mean(rel_scores) > 4 * np.mean(non_scores)
    assert np.mean(wins) >= 0.8


def test_reuse_overwrite_and_atomic_publish(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    conf = {**synthetic.confs["tiny"].model_dump(), "n_db": 10, "n_query": 4}
    assert synthetic.main(out, conf) == out
    stamp = (out / "manifest.json").stat().st_mtime_ns
    marker = out / "marker"
    marker.write_text("x")
    # Same conf: returned as is, not regenerated.
    assert synthetic.main(out, conf) == out and marker.exists()
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    # Another conf never silently replaces existing data.
    with pytest.raises(FileExistsError):
        synthetic.main(out, {**conf, "seed": 3})
    assert marker.exists()
    synthetic.main(out, {**conf, "seed": 3}, overwrite=True)
    assert not marker.exists()
    assert json.loads((out / "manifest.json").read_text())["conf"]["seed"] == 3
    # Only the published folder is left: no temporary or old siblings.
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    for bad in ({"n_dbb": 3}, {"n_db": 1}, {"street_width_m": 10.0}):  # a typo, too few, no room to stand
        with pytest.raises(ValueError, match="invalid synthetic conf"):
            synthetic.main(tmp_path / "bad", bad)
    assert not (tmp_path / "bad").exists()
