"""Train/validation/test split of the queries (by query, never by pair), seeded and saved.

Queries are grouped into square cells of the map (`cell_m` metres) and whole cells go to one split:
neighbouring frames of a sequence look alike, so a random split by query would leak test places
into training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.pipeline import SplitConf

SPLITS = ("train", "val", "test")


def split_queries(loc: np.ndarray, conf: SplitConf) -> dict[str, np.ndarray]:
    """Query row indices per split. Cells of `cell_m` metres are shuffled (seeded) and filled into
    train, then val, then test, until each holds its fraction of the queries. On a small map where
    whole cells leave a split with under half its share, the cells are halved until none does."""
    fracs = [conf.train, conf.val, conf.test]
    if len(loc) < 3 or any(f <= 0 for f in fracs) or abs(sum(fracs) - 1) > 1e-6:
        raise ValueError("need >= 3 queries and positive split fractions that sum to 1")
    cell_m = conf.cell_m
    while True:
        split = _split_cells(np.asarray(loc), fracs, cell_m, conf.seed)
        if all(len(split[s]) >= max(1.0, f * len(loc) / 2) for s, f in zip(SPLITS, fracs, strict=True)) or cell_m < 1.0:
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
