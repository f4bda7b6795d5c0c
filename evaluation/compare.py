"""Evaluation stage: compare presets by their area-fold cross-validation (evaluation/cv.py), in one
table and two figures.

For each preset: the out-of-fold figures with 95% intervals (bootstrap over map cells), the paired
difference of R@1 to the baseline preset over the same queries (an interval that excludes 0 is a
win or a loss; one that straddles it is noise), and the test split's one look. A recall@k plot and a
contact sheet of a few out-of-fold answers (relevant hits framed in green) are written with them, and
per preset the table and contact sheet of its failures by kind (evaluation/failures.py).
"""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np

from common import plots
from common.clock import utc_timestamp
from common.retrieval_metrics import cluster_bootstrap, recall_at_k
from dataset.layout import Dataset
from evaluation import failures
from evaluation.cv import CrossValidation, per_query

log = logging.getLogger(__name__)

COLUMNS = [
    ("R@1", "recall@1"),
    ("R@5", "recall@5"),
    ("R@10", "recall@10"),
    ("R@20", "recall@20"),
    ("R@50", "recall@50"),  # with verification: what the verified shortlist of 50 holds
    ("P@5", "precision@5"),
    ("P@10", "precision@10"),
    ("P@20", "precision@20"),
    ("P@50", "precision@50"),
    ("mAP", "mAP"),
    ("nDCG@10", "ndcg@10"),
    ("loc ≤25 m", "localised_within_25m"),
]


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _iv(r: dict[str, Any], key: str) -> str:
    iv = (r.get("intervals") or {}).get(key)
    return "" if iv is None else f" ({100 * iv[0]:.1f}–{100 * iv[1]:.1f})"


CV_COLUMNS = [
    ("R@1", "recall@1"),
    ("R@10", "recall@10"),
    ("R@50", "recall@50"),
    ("P@10", "precision@10"),
    ("mAP", "mAP"),
    ("loc ≤25 m", "localised_within_25m"),
    ("loc right", "localisation_right"),
]


def cv_table(results: dict[str, dict[str, Any]], baseline: str) -> str:
    """One row per cross-validated preset: figures (95% interval over cells), the paired R@1
    difference to `baseline`, and the test split's R@1 / R@10 / R@50."""
    head = "| preset | " + " | ".join(c for c, _ in CV_COLUMNS) + f" | ΔR@1 vs {baseline} | test R@1 / R@10 / R@50 |"
    lines = [head, "|" + "---|" * (len(CV_COLUMNS) + 3)]
    for name, r in results.items():
        cells = " | ".join(_fmt(r[key]) + _iv(r, key) for _, key in CV_COLUMNS)
        d = r.get("paired_recall@1")
        delta = (
            "–"
            if d is None
            else f"{100 * d['mean']:+.1f} ({100 * d['interval'][0]:+.1f}–{100 * d['interval'][1]:+.1f})"
        )
        t = r.get("test") or {}
        test = " / ".join(_fmt(t.get(k)) for k in ("recall@1", "recall@10", "recall@50"))
        lines.append(f"| `{name}` | {cells} | {delta} | {test} |")
    return "\n".join(lines)


def markdown_table(results: dict[str, dict[str, Any]], baseline: str) -> str:
    """One row per evaluation summary (evaluation/evaluate.py), named by its key."""
    head = (
        "| preset | " + " | ".join(c for c, _ in COLUMNS) + " | loc median m | p50 ms | sign test vs " + baseline + " |"
    )
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    for name, r in results.items():
        st = r.get("sign_test")
        sign = "–" if st is None else f"{st['wins']}/{st['losses']}/{st['ties']}, p={st['p_value']:.2g}"
        cells = " | ".join(_fmt(r[key]) for _, key in COLUMNS)
        med = r["localisation_median_m"]
        cells += " | –" if med is None else f" | {med:.0f}"
        p50 = r["latency_ms_p50"]
        lines.append(f"| `{name}` | {cells} | {'–' if p50 is None else f'{p50:.1f}'} | {sign} |")
    return "\n".join(lines)


def plot_recall(ranked: dict[str, np.ndarray], sim: np.ndarray, out: Path) -> Path:
    keep = sim.any(axis=1)
    ks = np.arange(1, 51)
    fig, ax = plots.pyplot().subplots(figsize=(6, 4))
    for name, r in ranked.items():
        ax.plot(ks, [recall_at_k(r[keep], sim[keep], int(k)).mean() for k in ks], label=name)
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k (a relevant map image in the top k)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    return plots.save(fig, out)


def contact_sheet(
    ranked: np.ndarray,
    dataset: Dataset,
    query_rows: np.ndarray,
    out: Path,
    n_queries: int = 6,
    seed: int = 0,
    picks: np.ndarray | None = None,
) -> Path:
    """A grid: each row a query (left) and its top 10, relevant ones framed green, others red; the
    rows at `picks` of query_rows, else n_queries drawn (seeded)."""
    import cv2

    assert dataset.sim is not None  # an evaluation needs ground truth
    if picks is None:
        rng = np.random.default_rng(seed)
        picks = np.sort(rng.choice(len(query_rows), min(n_queries, len(query_rows)), replace=False))
    th, tw, pad = 96, 128, 4

    def thumb(path: Path, colour: tuple[int, int, int] | None) -> np.ndarray:
        img = cv2.imread(str(path))
        img = np.zeros((th, tw, 3), np.uint8) if img is None else cv2.resize(img, (tw, th))
        if colour is not None:
            cv2.rectangle(img, (0, 0), (tw - 1, th - 1), colour, 5)
        return img

    rows = []
    for p in picks:
        q = query_rows[p]
        tiles = [thumb(dataset.image_path(dataset.queries.paths[q]), (255, 160, 0))]
        for j in ranked[p, :10]:
            if j < 0:
                tiles.append(np.full((th, tw, 3), 40, np.uint8))
                continue
            good = bool(dataset.sim[q, j])
            tiles.append(thumb(dataset.image_path(dataset.database.paths[j]), (0, 200, 0) if good else (0, 0, 220)))
        rows.append(np.hstack([np.pad(t, ((pad, pad), (pad, pad), (0, 0)), constant_values=255) for t in tiles]))
    cv2.imwrite(str(out), np.vstack(rows) if rows else np.full((th, tw, 3), 255, np.uint8))
    return out


def main(results: dict[str, CrossValidation], dataset: Dataset, out_dir: Path, baseline: str = "bow") -> Path:
    """Compare the presets' cross-validations (preset -> its result; all over the same queries):
    write results.{md,json}, recall_at_k.png and a contact sheet per preset into out_dir. Returns
    the markdown file."""
    assert dataset.sim is not None  # cross-validation needs ground truth
    out_dir.mkdir(parents=True, exist_ok=True)
    first = next(iter(results.values()))
    rows = first.rows
    for preset, r in results.items():
        if not np.array_equal(r.rows, rows) or not np.array_equal(r.fold, first.fold):
            raise ValueError(f"preset {preset} was cross-validated on other folds: presets must share them")
    sim = dataset.sim[rows]
    figures: dict[str, dict[str, Any]] = {}
    for preset, r in results.items():
        figures[preset] = dict(r.cv, test=r.test)
        if baseline in results and preset != baseline:
            figures[preset]["paired_recall@1"] = paired_difference(r, results[baseline], sim, "recall@1")
        contact_sheet(r.ranked, dataset, rows, out_dir / f"contact_sheet-{preset}.png")
        failures.main(r, dataset, out_dir, preset)
        log.info("%s: %s", preset, {k: figures[preset][k] for _, k in CV_COLUMNS})
    plot_recall({p: r.ranked for p, r in results.items()}, sim, out_dir / "recall_at_k.png")
    meta = {
        "data": str(dataset.root),
        "evaluation": f"{first.cv['folds']}-fold cross-validation over areas, out-of-fold answers pooled",
        "queries": len(rows),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "created": utc_timestamp(),
    }
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "presets": figures}, indent=1), encoding="utf-8")
    md = out_dir / "results.md"
    md.write_text(
        f"Area-fold cross-validation of {dataset.root.name} ({first.cv['folds']} folds, out-of-fold answers "
        f"pooled): {len(rows)} queries outside the test split "
        f"({first.cv['n_queries']} with a relevant map image), all figures in %, 95% intervals from a "
        f"bootstrap over {first.cv['cell_m']:g} m cells; ΔR@1 = paired difference over the same queries; "
        "test = the test split's one look (fitted on the rest).\n\n" + cv_table(figures, baseline) + "\n",
        encoding="utf-8",
    )
    return md


def paired_difference(a: CrossValidation, b: CrossValidation, sim: np.ndarray, key: str) -> dict[str, Any]:
    """Mean per-query difference of `key` (a minus b) over the same queries, with its 95% interval
    from the bootstrap over cells."""
    va = per_query(a.ranked, sim, a.loc_error)[key]
    vb = per_query(b.ranked, sim, b.loc_error)[key]
    diff = va - vb
    iv = cluster_bootstrap(diff, a.cell)
    return {"mean": float(np.nanmean(diff)), "interval": None if iv is None else [iv[0], iv[1]]}
