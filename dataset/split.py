"""Train/validation/test split of the queries (by query, never by pair), seeded and saved."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")


def split_queries(n_queries: int, conf: dict[str, Any]) -> dict[str, np.ndarray]:
    """Query row indices per split, from a seeded permutation; fractions from conf."""
    fracs = [float(conf[s]) for s in SPLITS]
    if n_queries < 3 or any(f <= 0 for f in fracs) or abs(sum(fracs) - 1) > 1e-6:
        raise ValueError("need >= 3 queries and positive split fractions that sum to 1")
    perm = np.random.default_rng(int(conf["seed"])).permutation(n_queries)
    n_val = max(1, round(fracs[1] * n_queries))
    n_test = max(1, round(fracs[2] * n_queries))
    n_train = n_queries - n_val - n_test
    return {
        "train": np.sort(perm[:n_train]),
        "val": np.sort(perm[n_train : n_train + n_val]),
        "test": np.sort(perm[n_train + n_val :]),
    }


def data_tag(root: Path) -> str:
    """Name of a data folder plus a hash of its index files: artifacts of other data never mix."""
    h = hashlib.sha256()
    for rel in ("database/database.json", "query/query.json"):
        h.update((root / rel).read_bytes())
    return f"{root.resolve().name}-{h.hexdigest()[:8]}"


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
