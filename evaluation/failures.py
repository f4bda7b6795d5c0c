"""Failures of a cross-validation by kind: which kind of miss costs the most queries, so that the
next improvement is chosen from data rather than from a hunch.

Every cross-validated query (the out-of-fold answers of evaluation/cv.py) gets exactly one kind of
KINDS: the first whose rule applies, in the order of KINDS. The kinds come from three sources:
- the locations: "no overlap" (no relevant map image at all), "wrong heading" (the top-1 map image
  stands within 25 m but looks 40° or more away);
- the ranking: "right", "first stage miss" (no relevant map image in the top 50), "ranked below"
  (one is, but not first);
- image statistics: "night / dark" (the query's mean grey level) and "foliage / season" (the share
  of vegetation-green pixels against the nearest relevant map image). These are proxies measured on
  the pixels, not labels: on the London photos a mean grey level below 60 picks mostly night shots
  but also daytime photos in deep shade or filled by a red bus, and a change of green share picks
  bare trees against leaves but also a view into a hedge against a view of the road, or green
  facades.
There is no "occluded" kind: in a street photo a large low-texture blob is as often sky, road or a
wall in shade as a bus in front of the camera, and image statistics alone do not tell them apart.

`main` writes failures-{preset}.md (the table), failures-{preset}.png (examples of each kind of
failure, each row labelled) and failures-{preset}.json (counts and query paths per kind).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dataset.layout import Dataset
from dataset.relevance import SIM_DIST_M, SIM_HEADING_DEG, heading_diff, pairwise_distance
from evaluation.cv import CrossValidation

# Below this mean grey level (0-255) a query counts as night / dark.
DARK_GREY = 60.0
# Vegetation green in OpenCV's HSV (hue 0-180): hue in [35, 85], saturation > 60. Pixels darker than
# GREEN_MIN_VALUE are left out: the hue of near-black pixels is noise, and would make every night
# photo "green".
GREEN_HUE = (35, 85)
GREEN_MIN_SAT = 60
GREEN_MIN_VALUE = 40
# A query whose green share differs by more than this from its nearest relevant map image.
FOLIAGE_DIFF = 0.15

NO_OVERLAP = "no overlap"
RIGHT = "right"
WRONG_HEADING = "wrong heading"
DARK = "night / dark"
FOLIAGE = "foliage / season"
FIRST_STAGE_MISS = "first stage miss"
RANKED_BELOW = "ranked below"

# Each query's kind is the first of these that applies.
KINDS: tuple[tuple[str, str], ...] = (
    (NO_OVERLAP, "no map image is relevant to the query: the map does not show its place"),
    (RIGHT, "the top-1 map image is relevant (not a failure)"),
    (
        WRONG_HEADING,
        f"the top-1 map image stands within {SIM_DIST_M:g} m but looks ≥ {SIM_HEADING_DEG:g}° away: "
        "the same place, another direction",
    ),
    (DARK, f"the query's mean grey level is below {DARK_GREY:g} of 255: night or deep shade"),
    (
        FOLIAGE,
        f"the share of vegetation-green pixels differs by more than {FOLIAGE_DIFF:g} from the nearest "
        "relevant map image: season, foliage, or a view into greenery",
    ),
    (FIRST_STAGE_MISS, "no relevant map image in the top 50: nothing that re-ranks them could fix it"),
    (RANKED_BELOW, "a relevant map image is in the top 50 but not first: verification or re-ranking put it below"),
)
DESCRIPTIONS = dict(KINDS)
FAILURES = tuple(k for k, _ in KINDS if k != RIGHT)


def grey_level(path: Path) -> float | None:
    """Mean grey level (0-255) of the image at `path`, None when it does not decode."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return None if img is None else float(img.mean())


def green_share(path: Path) -> float | None:
    """Share of the pixels of the image at `path` that are vegetation green (GREEN_HUE,
    GREEN_MIN_SAT, GREEN_MIN_VALUE), None when it does not decode."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        return None
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    green = (h >= GREEN_HUE[0]) & (h <= GREEN_HUE[1]) & (s > GREEN_MIN_SAT) & (v > GREEN_MIN_VALUE)
    return float(green.mean())


def _sim(dataset: Dataset) -> np.ndarray:
    if dataset.sim is None:
        raise ValueError(f"{dataset.root}: the failure analysis needs ground truth")
    return dataset.sim


def first_relevant_rank(ranked: np.ndarray, sim: np.ndarray) -> np.ndarray:
    """(n,) 1-based rank of the first relevant map image in each row of `ranked` (sim: the rows'
    relevance, (n, ndb)), 0 where none is."""
    hit = np.zeros(ranked.shape, bool)
    valid = ranked >= 0
    hit[valid] = sim[np.nonzero(valid)[0], ranked[valid]]
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0)


def nearest_relevant(dataset: Dataset, q: int) -> int:
    """The relevant map image whose camera stands nearest to query `q`'s (the first of equals)."""
    rel = np.flatnonzero(_sim(dataset)[q])
    if len(rel) == 0:
        raise ValueError(f"query {q} has no relevant map image")
    dist = pairwise_distance(dataset.queries.loc[q][None, :], dataset.database.loc[rel])[0]
    return int(rel[int(dist.argmin())])


def classify(cv: CrossValidation, dataset: Dataset) -> list[str]:
    """The kind of each cross-validated query (one per row of cv.rows): the first of KINDS whose rule
    applies. Images are read only for the misses that reach the image rules."""
    sim = _sim(dataset)[cv.rows]
    rank = first_relevant_rank(cv.ranked, sim)
    qloc = dataset.queries.loc[cv.rows]
    top1 = cv.ranked[:, 0]
    tloc = dataset.database.loc[np.maximum(top1, 0)]
    dist = np.hypot(tloc[:, 0] - qloc[:, 0], tloc[:, 1] - qloc[:, 1])
    turned = (top1 >= 0) & (dist < SIM_DIST_M) & (heading_diff(tloc[:, 2], qloc[:, 2]) >= SIM_HEADING_DEG)
    map_green: dict[int, float | None] = {}  # map images are shared between queries: read each once

    def foliage(q: int) -> bool:
        g_query = green_share(dataset.image_path(dataset.queries.paths[q]))
        m = nearest_relevant(dataset, q)
        if m not in map_green:
            map_green[m] = green_share(dataset.image_path(dataset.database.paths[m]))
        g_map = map_green[m]
        return g_query is not None and g_map is not None and abs(g_query - g_map) > FOLIAGE_DIFF

    kinds = []
    for i, q in enumerate(cv.rows.tolist()):
        if not sim[i].any():
            kinds.append(NO_OVERLAP)
        elif rank[i] == 1:
            kinds.append(RIGHT)
        elif turned[i]:
            kinds.append(WRONG_HEADING)
        elif (grey := grey_level(dataset.image_path(dataset.queries.paths[q]))) is not None and grey < DARK_GREY:
            kinds.append(DARK)
        elif foliage(q):
            kinds.append(FOLIAGE)
        elif rank[i] == 0:
            kinds.append(FIRST_STAGE_MISS)
        else:
            kinds.append(RANKED_BELOW)
    return kinds


def _pct(part: int, whole: int) -> str:
    return "–" if whole == 0 else f"{100 * part / whole:.1f}"


def _check(kinds: list[str], cv: CrossValidation) -> None:
    if len(kinds) != len(cv.rows):
        raise ValueError(f"{len(kinds)} kinds for {len(cv.rows)} cross-validated queries")
    unknown = set(kinds) - set(DESCRIPTIONS)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}")


def failure_table(kinds: list[str], cv: CrossValidation, dataset: Dataset) -> str:
    """Markdown table, one row per kind that occurs (in the order of KINDS): how many queries, their
    share of all cross-validated queries and of the misses (top-1 not relevant), how many of them
    have a relevant map image in the top 50 and the median rank of the first one; then the total."""
    _check(kinds, cv)
    rank = first_relevant_rank(cv.ranked, _sim(dataset)[cv.rows])
    of_kind = np.array(kinds)
    n = len(kinds)
    misses = sum(k != RIGHT for k in kinds)
    lines = [
        "| kind | queries | % of all | % of misses | relevant in top 50 (%) | median rank of first relevant | rule |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for kind, description in KINDS:
        members = of_kind == kind
        count = int(members.sum())
        if count == 0:
            continue
        found = rank[members][rank[members] > 0]
        in_top = "–" if kind == NO_OVERLAP else _pct(len(found), count)
        median = "–" if len(found) == 0 else f"{float(np.median(found)):g}"
        share_of_misses = "–" if kind == RIGHT else _pct(count, misses)
        lines.append(
            f"| {kind} | {count} | {_pct(count, n)} | {share_of_misses} | {in_top} | {median} | {description} |"
        )
    lines.append(
        f"| **total** | {n} | {_pct(n, n)} | {_pct(misses, misses)} | – | – | "
        f"{misses} of {n} queries are misses (top-1 not relevant) |"
    )
    return "\n".join(lines)


def examples(kinds: list[str], per_kind: int, seed: int) -> list[tuple[str, int]]:
    """Up to `per_kind` positions (into the cross-validated rows) of each kind of failure, drawn
    seeded, in the order of KINDS."""
    rng = np.random.default_rng(seed)
    of_kind = np.array(kinds)
    out: list[tuple[str, int]] = []
    for kind in FAILURES:
        members = np.flatnonzero(of_kind == kind)
        if len(members) == 0:
            continue
        picked = np.sort(rng.choice(members, min(per_kind, len(members)), replace=False))
        out.extend((kind, int(p)) for p in picked)
    return out


def failure_sheet(cv: CrossValidation, dataset: Dataset, picks: list[tuple[str, int]], out: Path) -> Path:
    """Contact sheet of the picked (kind, position) queries: each row a band naming the kind above the
    query (left) and its top 10, relevant ones framed green, others red (as compare.contact_sheet, with
    a label per row)."""
    import cv2

    sim = _sim(dataset)
    rank = first_relevant_rank(cv.ranked, sim[cv.rows])
    th, tw, pad, band = 96, 128, 4, 20

    def thumb(path: Path, colour: tuple[int, int, int]) -> np.ndarray:
        img = cv2.imread(str(path))
        img = np.zeros((th, tw, 3), np.uint8) if img is None else cv2.resize(img, (tw, th))
        cv2.rectangle(img, (0, 0), (tw - 1, th - 1), colour, 5)
        return img

    rows = []
    for kind, p in picks:
        q = int(cv.rows[p])
        tiles = [thumb(dataset.image_path(dataset.queries.paths[q]), (255, 160, 0))]
        for j in cv.ranked[p, :10].tolist():
            if j < 0:
                tiles.append(np.full((th, tw, 3), 40, np.uint8))
                continue
            good = bool(sim[q, j])
            tiles.append(thumb(dataset.image_path(dataset.database.paths[j]), (0, 200, 0) if good else (0, 0, 220)))
        row = np.hstack([np.pad(t, ((pad, pad), (pad, pad), (0, 0)), constant_values=255) for t in tiles])
        where = f"first relevant at rank {rank[p]}" if rank[p] > 0 else "no relevant map image in the top 50"
        label = np.full((band, row.shape[1], 3), 255, np.uint8)
        text = f"{kind}: {dataset.queries.paths[q]}, {where}"
        cv2.putText(label, text, (pad, band - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(np.vstack([label, row]))
    cv2.imwrite(str(out), np.vstack(rows) if rows else np.full((th, tw, 3), 255, np.uint8))
    return out


def main(cv: CrossValidation, dataset: Dataset, out_dir: Path, preset: str, per_kind: int = 3, seed: int = 0) -> Path:
    """Classify the cross-validated queries and write failures-{preset}.md (the table),
    failures-{preset}.png (up to `per_kind` seeded examples of each kind of failure) and
    failures-{preset}.json (counts and query paths per kind) into out_dir. Returns the md file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = classify(cv, dataset)
    folds = cv.cv.get("folds")
    area_cv = "area-fold cross-validation" if folds is None else f"{folds}-fold area cross-validation"
    head = (
        f"Failures of `{preset}` on {dataset.name}: the out-of-fold answers of the {area_cv}, "
        f"{len(kinds)} queries outside the test split, each of the first kind whose rule applies "
        "(in this order); night / dark and foliage / season come from image statistics: proxies, not labels."
    )
    md = out_dir / f"failures-{preset}.md"
    md.write_text(head + "\n\n" + failure_table(kinds, cv, dataset) + "\n", encoding="utf-8")
    failure_sheet(cv, dataset, examples(kinds, per_kind, seed), out_dir / f"failures-{preset}.png")
    paths = dataset.queries.paths
    body = {
        "preset": preset,
        "data": dataset.name,
        "n_queries": len(kinds),
        "counts": {k: kinds.count(k) for k, _ in KINDS},
        "queries": {k: [paths[q] for q, kq in zip(cv.rows.tolist(), kinds, strict=True) if kq == k] for k, _ in KINDS},
        "rules": DESCRIPTIONS,
    }
    (out_dir / f"failures-{preset}.json").write_text(json.dumps(body, indent=1, ensure_ascii=False), encoding="utf-8")
    return md
