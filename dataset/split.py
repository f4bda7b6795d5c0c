"""Which labelled queries fit what, by area (by query, never by pair), seeded and saved.

Queries are grouped into square cells of the map (`cell_m` metres) and whole cells go to one part:
neighbouring frames of a sequence look alike, so a random split by query would leak held-out places
into training. Three uses:
- `split_queries`: the train/val/test split; test is held out from everything (one final look);
- `area_folds`: the cells of the other queries dealt into folds for cross-validation;
- `fit_split`: of the queries a model may learn from, which train the encoder and which fit the
  heads (evaluation/cv.py fits every fold, the test look and the served model this way).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.pipeline import SplitConf

SPLITS = ("train", "val", "test")


def split_queries(loc: np.ndarray, conf: SplitConf) -> dict[str, np.ndarray]:
    """Query row indices per split. Cells of `cell_m` metres are shuffled (seeded) and filled into
    train, then val, then test, until each holds its fraction of the queries (val may be 0)."""
    fracs = [conf.train, conf.val, conf.test]
    if len(loc) < 3 or conf.train <= 0 or conf.test <= 0 or conf.val < 0 or abs(sum(fracs) - 1) > 1e-6:
        raise ValueError("need >= 3 queries and split fractions that sum to 1 (train and test positive)")
    return _deal(np.asarray(loc), fracs, conf.cell_m, conf.seed)


def _deal(loc: np.ndarray, fracs: list[float], cell_m: float, seed: int) -> dict[str, np.ndarray]:
    """On a small map where whole cells leave a part under half its share (or a wanted part empty),
    the cells are halved until none does."""
    while True:
        split = _split_cells(loc, fracs, cell_m, seed)
        sizes = [len(split[s]) for s in SPLITS]
        if all(n >= f * len(loc) / 2 and (n or not f) for n, f in zip(sizes, fracs, strict=True)) or cell_m < 1.0:
            return split
        cell_m /= 2


def _split_cells(loc: np.ndarray, fracs: list[float], cell_m: float, seed: int) -> dict[str, np.ndarray]:
    n = len(loc)
    cells = np.floor(loc[:, :2] / cell_m).astype(np.int64)
    _, cell_of = np.unique(cells, axis=0, return_inverse=True)
    cell_of = cell_of.ravel()
    order = np.random.default_rng(seed).permutation(cell_of.max() + 1)
    bounds = (fracs[0] * n, (fracs[0] + fracs[1]) * n)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    filled = 0
    for c in order:
        members = np.flatnonzero(cell_of == c)
        name = "train" if filled < bounds[0] else "val" if filled < bounds[1] else "test"
        out[name].extend(members.tolist())
        filled += len(members)
    return {s: np.array(sorted(v), dtype=np.int64) for s, v in out.items()}


def cells_of(loc: np.ndarray, cell_m: float) -> np.ndarray:
    """(n,) the cell of each location: an id per occupied square of cell_m metres, 0..cells-1."""
    cells = np.floor(np.asarray(loc)[:, :2] / cell_m).astype(np.int64)
    return np.unique(cells, axis=0, return_inverse=True)[1].ravel()


def area_folds(loc: np.ndarray, n_folds: int, cell_m: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fold, cell) of each location: cells in a seeded order, each dealt to the fold that holds
    fewest locations so far, so folds are whole areas of about equal size. On a map of fewer cells
    than folds, the cells are halved until there are enough."""
    if n_folds < 2 or len(loc) < n_folds:
        raise ValueError(f"{len(loc)} queries cannot fill {n_folds} folds (at least 2)")
    cell_of = cells_of(loc, cell_m)
    while cell_of.max() + 1 < n_folds and cell_m >= 1.0:
        cell_m /= 2
        cell_of = cells_of(loc, cell_m)
    sizes = np.bincount(cell_of)
    fold_of_cell = np.empty(len(sizes), np.int64)
    filled = np.zeros(n_folds, np.int64)
    for c in np.random.default_rng(seed).permutation(len(sizes)):
        f = int(np.argmin(filled))
        fold_of_cell[c] = f
        filled[f] += sizes[c]
    return fold_of_cell[cell_of], cell_of


def fit_split(
    loc: np.ndarray, rows: np.ndarray, conf: SplitConf, relevant: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Of the query `rows` a model may learn from: which train the encoder ("train") and which fit
    the heads after it ("val"). With conf.val > 0, whole cells, val / (train + val) of the rows, are
    kept from the encoder for the heads; with val 0 the encoder learns from every row and the heads
    are fitted on a seeded sample of head_queries of them. `relevant` (bool per query row): whether a
    query has a relevant map image; when no val query has one (a tiny map), it is done as with val 0."""
    rows = np.sort(np.asarray(rows, np.int64))
    if conf.val > 0:
        share = conf.val / (conf.train + conf.val)
        part = _deal(np.asarray(loc)[rows], [1 - share, share, 0.0], conf.cell_m, conf.seed)
        split = {"train": rows[part["train"]], "val": rows[part["val"]]}
        if relevant is None or relevant[split["val"]].any():
            return split
    rng = np.random.default_rng(conf.seed)
    heads = rng.choice(rows, min(conf.head_queries, len(rows)), replace=False) if len(rows) else rows
    return {"train": rows, "val": np.sort(heads)}


def save_split(path: Path, split: dict[str, np.ndarray], query_paths: list[str]) -> Path:
    path.write_text(json.dumps({s: [query_paths[i] for i in split[s]] for s in SPLITS}, indent=1), encoding="utf-8")
    return path


def load_split(path: Path, query_paths: list[str]) -> dict[str, np.ndarray]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    row = {p: i for i, p in enumerate(query_paths)}
    try:
        return {s: np.array(sorted(row[p] for p in raw[s]), dtype=np.int64) for s in SPLITS}
    except KeyError as e:
        raise ValueError(f"{path}: split names a query not in this data folder: {e}") from e
