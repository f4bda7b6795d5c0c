"""Failure analysis of a cross-validation: each kind's rule on a tiny data folder laid out by hand,
the table's counts, and the three files of `main`."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from dataset.layout import Dataset, load_dataset
from dataset.relevance import fov_matrix, sim_matrix
from evaluation import failures as fl
from evaluation.cv import CrossValidation

E0, N0 = 699_000.0, 5_710_000.0  # a UTM origin in London

# Map images: (easting, northing, heading, look). m1 stands 10 m from m0 and faces the other way; m5-m10
# are distractors far from every query; m11 is the only green one.
MAP = [
    (0, 0, 0, "grey"),
    (10, 0, 180, "grey"),
    (200, 0, 90, "grey"),
    (400, 0, 0, "grey"),
    (600, 0, 0, "grey"),
    *((1000 + 100 * k, 0, 0, "grey") for k in range(6)),
    (800, 0, 0, "green"),
]
DISTRACTORS = list(range(5, 11))

# Queries: (easting, northing, heading, look, ranked map rows, expected kind). Query 0 is in the test
# split (not cross-validated), so positions in cv.rows differ from query rows.
QUERIES = [
    (0, 0, 0, "grey", [], None),
    (5000, 5000, 0, "grey", [0, 1], fl.NO_OVERLAP),
    (0, 5, 10, "grey", [0, 5], fl.RIGHT),
    (0, 0, 0, "grey", [1, 0], fl.WRONG_HEADING),  # top-1 10 m away, facing 180° the other way
    (200, 3, 90, "dark", [3, 5, 6, 7, 2], fl.DARK),  # relevant at rank 5, but dark comes first
    (400, 2, 5, "grey", [*DISTRACTORS, 3], fl.RANKED_BELOW),  # relevant m3 at rank 7
    (400, -3, 355, "grey", [5, 6, 3], fl.RANKED_BELOW),  # relevant m3 at rank 3
    (600, 2, 0, "grey", [5, 6], fl.FIRST_STAGE_MISS),  # relevant m4 nowhere in its top 50
    (800, 4, 0, "grey", [5, 6, 11], fl.FOLIAGE),  # grey query, its relevant map image green
    (0, 3, 350, "dark", [0], fl.RIGHT),  # dark, but right: dark only explains misses
]


def _image(look: str, seed: int) -> np.ndarray:
    """64x48 BGR with some texture: mid grey, dark grey, or leaf green."""
    noise = np.random.default_rng(seed).integers(-15, 16, (48, 64, 1))
    base = {"grey": (130, 130, 130), "dark": (25, 25, 25), "green": (40, 160, 40)}[look]
    return np.clip(np.array(base)[None, None, :] + noise, 0, 255).astype(np.uint8)


def _write_side(root: Path, side: str, items: list[tuple[float, float, float, str]], seed: int) -> np.ndarray:
    (root / side / "images").mkdir(parents=True)
    paths, loc = [], []
    for i, (e, n, h, look) in enumerate(items):
        rel = f"{side}/images/{side}{i:02d}.jpg"
        cv2.imwrite(str(root / rel), _image(look, seed + i))
        paths.append(rel)
        loc.append([E0 + e, N0 + n, h])
    (root / side / f"{side}.json").write_text(json.dumps({"im_paths": paths, "loc": loc}))
    return np.array(loc)


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[CrossValidation, Dataset, list[str]]:
    root = tmp_path / "tiny-failures"
    dloc = _write_side(root, "database", [(e, n, h, look) for e, n, h, look in MAP], 0)
    qloc = _write_side(root, "query", [(e, n, h, look) for e, n, h, look, _, _ in QUERIES], 100)
    with h5py.File(root / "london_gt.h5", "w") as f:
        f["sim"] = sim_matrix(qloc, dloc).astype(np.uint8)
        f["fov"] = fov_matrix(qloc, dloc).astype(np.float16)
    dataset = load_dataset(root)
    rows = np.arange(1, len(QUERIES))
    ranked = np.full((len(rows), 50), -1, np.int64)
    for i, q in enumerate(rows):
        hits = QUERIES[q][4]
        ranked[i, : len(hits)] = hits
    n = len(rows)
    cv = CrossValidation(
        rows, np.zeros(n, np.int64), np.zeros(n, np.int64), ranked, np.full(n, np.nan), {"folds": 5}, None
    )
    expected = [str(QUERIES[q][5]) for q in rows]
    return cv, dataset, expected


def test_image_statistics_by_hand(tmp_path: Path) -> None:
    img = np.full((10, 20, 3), 100, np.uint8)
    img[:, :10] = (40, 160, 40)  # left half leaf green (hue 60 of 180)
    img[:2, 10:] = (0, 20, 0)  # a dark green strip: too dark for its hue to count
    cv2.imwrite(str(tmp_path / "half.png"), img)
    cv2.imwrite(str(tmp_path / "flat.png"), np.full((8, 8, 3), 100, np.uint8))
    assert fl.grey_level(tmp_path / "flat.png") == 100.0
    assert fl.green_share(tmp_path / "flat.png") == 0.0
    assert fl.green_share(tmp_path / "half.png") == 0.5
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    assert fl.grey_level(tmp_path / "broken.jpg") is None and fl.green_share(tmp_path / "broken.jpg") is None


def test_each_query_gets_the_first_kind_that_applies(setup: tuple[CrossValidation, Dataset, list[str]]) -> None:
    cv, dataset, expected = setup
    assert dataset.sim is not None and not dataset.sim[1].any()  # the layout is what the test means
    assert fl.classify(cv, dataset) == expected
    assert fl.first_relevant_rank(cv.ranked, dataset.sim[cv.rows]).tolist() == [0, 1, 2, 5, 7, 3, 0, 3, 1]
    assert fl.nearest_relevant(dataset, 8) == 11


def test_table_counts_add_up(setup: tuple[CrossValidation, Dataset, list[str]]) -> None:
    cv, dataset, expected = setup
    table = fl.failure_table(expected, cv, dataset)
    lines = table.splitlines()
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    kinds = [k for k, _ in fl.KINDS]
    assert [k for k in rows if k != "**total**"] == kinds  # every kind occurs here, in order
    assert sum(int(rows[k][1]) for k in kinds) == int(rows["**total**"][1]) == 9
    # 9 queries, 7 misses; ranked below: 2 queries, relevant at ranks 7 and 3.
    assert rows[fl.RANKED_BELOW][1:6] == ["2", "22.2", "28.6", "100.0", "5"]
    assert rows[fl.RIGHT][1:6] == ["2", "22.2", "–", "100.0", "1"]
    assert rows[fl.FIRST_STAGE_MISS][1:6] == ["1", "11.1", "14.3", "0.0", "–"]
    assert rows[fl.NO_OVERLAP][4:6] == ["–", "–"]
    assert rows[fl.DARK][4:6] == ["100.0", "5"]
    assert sum(float(rows[k][3]) for k in fl.FAILURES) == pytest.approx(100.0, abs=0.2)
    assert table == fl.failure_table(expected, cv, dataset)
    # Only the kinds that occur get a row.
    only = [fl.RIGHT] * 9
    assert [line.split("|")[1].strip() for line in fl.failure_table(only, cv, dataset).splitlines()[2:]] == [
        fl.RIGHT,
        "**total**",
    ]
    with pytest.raises(ValueError, match="kinds"):
        fl.failure_table(expected[:-1], cv, dataset)


def test_main_writes_table_sheet_and_counts(setup: tuple[CrossValidation, Dataset, list[str]], tmp_path: Path) -> None:
    cv, dataset, expected = setup
    md = fl.main(cv, dataset, tmp_path / "out", "paper", per_kind=3, seed=0)
    assert md == tmp_path / "out" / "failures-paper.md"
    text = md.read_text(encoding="utf-8")
    assert "out-of-fold answers of the 5-fold area cross-validation" in text.splitlines()[0]
    counts = {
        cells[0]: int(cells[1])
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[4:])
        if cells[0] != "**total**"
    }
    body = json.loads((tmp_path / "out" / "failures-paper.json").read_text(encoding="utf-8"))
    assert {k: c for k, c in body["counts"].items() if c} == counts
    assert sum(body["counts"].values()) == body["n_queries"] == 9
    assert body["queries"][fl.RANKED_BELOW] == [dataset.queries.paths[5], dataset.queries.paths[6]]
    assert body["queries"][fl.WRONG_HEADING] == [dataset.queries.paths[3]]
    sheet = cv2.imread(str(tmp_path / "out" / "failures-paper.png"))
    assert sheet is not None
    # One labelled row per failure example: 7 misses with 3 per kind, 6 with one per kind.
    one = cv2.imread(str(fl.failure_sheet(cv, dataset, fl.examples(expected, 1, 0), tmp_path / "one.png")))
    assert one is not None and sheet.shape[0] * 6 == one.shape[0] * 7
    assert fl.examples(expected, 3, 0) == fl.examples(expected, 3, 0)
    assert {k for k, _ in fl.examples(expected, 3, 0)} == set(fl.FAILURES)
    # Deterministic: the same files again.
    again = fl.main(cv, dataset, tmp_path / "again", "paper", per_kind=3, seed=0)
    assert again.read_bytes() == md.read_bytes()
    assert (tmp_path / "again" / "failures-paper.png").read_bytes() == (
        tmp_path / "out" / "failures-paper.png"
    ).read_bytes()
