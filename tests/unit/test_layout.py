"""The course-layout loader names the file and the problem when the layout is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from dataset.layout import DatasetError, load_dataset


def make_layout(root: Path, ndb: int = 3, nq: int = 2) -> Path:
    for side, n, key in (("database", ndb, "database"), ("query", nq, "query")):
        (root / side / "images").mkdir(parents=True)
        paths = [f"{side}/images/{key}_{i}.jpg" for i in range(n)]
        for p in paths:
            (root / p).write_bytes(b"x")
        loc = [[700000.0 + i, 5710000.0, 90.0] for i in range(n)]
        (root / side / f"{key}.json").write_text(json.dumps({"im_paths": paths, "loc": loc}))
    with h5py.File(root / "london_gt.h5", "w") as f:
        f["sim"] = np.zeros((nq, ndb), np.uint8)
        f["fov"] = np.zeros((nq, ndb), np.float16)
    return root


def test_valid_layout_loads(tmp_path: Path) -> None:
    ds = load_dataset(make_layout(tmp_path))
    assert len(ds.database) == 3 and len(ds.queries) == 2
    assert ds.sim.shape == (2, 3) and ds.sim.dtype == bool
    assert ds.fov.dtype == np.float32
    assert ds.database.loc.shape == (3, 3)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="data folder not found"):
        load_dataset(tmp_path / "nope")


def test_missing_json(tmp_path: Path) -> None:
    root = make_layout(tmp_path)
    (root / "query" / "query.json").unlink()
    with pytest.raises(DatasetError, match=r"query\.json: missing"):
        load_dataset(root)


def test_bad_json(tmp_path: Path) -> None:
    root = make_layout(tmp_path)
    (root / "database" / "database.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset(root)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"im_paths": ["a.jpg"]}, "keys 'im_paths' and 'loc'"),
        ({"im_paths": [], "loc": []}, "is empty"),
        ({"im_paths": ["database/images/database_0.jpg"] * 2, "loc": [[0, 0, 0]] * 2}, "duplicate"),
        ({"im_paths": ["database/images/database_0.jpg"], "loc": [[0, 0]]}, r"shape \(1, 2\)"),
        ({"im_paths": ["database/images/database_0.jpg"], "loc": [[0, 0, "x"]]}, "numbers"),
        ({"im_paths": ["../../etc/passwd"], "loc": [[0, 0, 0]]}, "leaves the data folder"),
        ({"im_paths": ["database/images/gone.jpg"], "loc": [[0, 0, 0]]}, "listed but missing"),
        ({"im_paths": [3], "loc": [[0, 0, 0]]}, "non-empty strings"),
    ],
)
def test_bad_database_json(tmp_path: Path, payload: dict, message: str) -> None:
    root = make_layout(tmp_path)
    (root / "database" / "database.json").write_text(json.dumps(payload))
    with pytest.raises(DatasetError, match=message):
        load_dataset(root)


def test_gt_wrong_shape(tmp_path: Path) -> None:
    root = make_layout(tmp_path)
    with h5py.File(root / "london_gt.h5", "w") as f:
        f["sim"] = np.zeros((3, 2), np.uint8)  # transposed
        f["fov"] = np.zeros((2, 3), np.float16)
    with pytest.raises(DatasetError, match=r"'sim' has shape \(3, 2\), expected \(2, 3\)"):
        load_dataset(root)


def test_gt_missing_key_and_range(tmp_path: Path) -> None:
    root = make_layout(tmp_path)
    with h5py.File(root / "london_gt.h5", "w") as f:
        f["sim"] = np.zeros((2, 3), np.uint8)
    with pytest.raises(DatasetError, match="'fov' missing"):
        load_dataset(root)
    with h5py.File(root / "london_gt.h5", "w") as f:
        f["sim"] = np.zeros((2, 3), np.uint8)
        f["fov"] = np.full((2, 3), 2.0, np.float16)
    with pytest.raises(DatasetError, match=r"\[0, 1\]"):
        load_dataset(root)


def test_gt_not_hdf5(tmp_path: Path) -> None:
    root = make_layout(tmp_path)
    (root / "london_gt.h5").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="not a readable HDF5"):
        load_dataset(root)


def test_gt_optional_when_not_required(tmp_path: Path) -> None:
    root = make_layout(tmp_path)
    (root / "london_gt.h5").unlink()
    assert load_dataset(root, require_gt=False).sim is None
    with pytest.raises(DatasetError, match="ground truth missing"):
        load_dataset(root)


def test_london_layout(london: Path) -> None:
    ds = load_dataset(london, check_files=False)
    assert len(ds.database) == 3291 and len(ds.queries) == 2019
    assert int(ds.sim.sum()) == 14060


def test_copy_without_images_fails_on_first_missing_image(london: Path, tmp_path: Path) -> None:
    shutil.copytree(london / "database", tmp_path / "database", ignore=shutil.ignore_patterns("*.jpg"))
    shutil.copytree(london / "query", tmp_path / "query", ignore=shutil.ignore_patterns("*.jpg"))
    with pytest.raises(DatasetError, match="listed but missing"):
        load_dataset(tmp_path, require_gt=False)
