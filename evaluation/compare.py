"""Evaluation stage: compare presets on the same held-out area split, in one table and two figures.

For each preset's served index version (built beforehand: `imgsearch evaluate` builds what is
missing), evaluate the queries of one split in process (evaluation/evaluate.py, the summary every
evaluation prints) and report R@1/5/10, P@5/10/20/50, mAP, nDCG@10 on fov, query latency and a
per-query sign test of AP against the baseline preset; write a recall@k plot and a contact sheet of a
few queries with their top 10 (relevant hits framed in green).
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
from common.retrieval_metrics import recall_at_k, sign_test
from dataset.layout import Dataset
from evaluation.evaluate import Evaluation, evaluate_searcher, held_out_rows
from indexer import store
from retrieval.searcher import Searcher

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


def plot_recall(evals: dict[str, Evaluation], sim: np.ndarray, out: Path) -> Path:
    keep = sim.any(axis=1)
    ks = np.arange(1, 51)
    fig, ax = plots.pyplot().subplots(figsize=(6, 4))
    for name, ev in evals.items():
        ax.plot(ks, [recall_at_k(ev.ranked[keep], sim[keep], int(k)).mean() for k in ks], label=name)
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k (a relevant map image in the top k)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    return plots.save(fig, out)


def contact_sheet(
    ev: Evaluation, dataset: Dataset, query_rows: np.ndarray, out: Path, n_queries: int = 6, seed: int = 0
) -> Path:
    """A grid: each row a query (left) and its top 10, relevant ones framed green, others red."""
    import cv2

    assert dataset.sim is not None  # an evaluation needs ground truth
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
        for j in ev.ranked[p, :10]:
            if j < 0:
                tiles.append(np.full((th, tw, 3), 40, np.uint8))
                continue
            good = bool(dataset.sim[q, j])
            tiles.append(thumb(dataset.image_path(dataset.database.paths[j]), (0, 200, 0) if good else (0, 0, 220)))
        rows.append(np.hstack([np.pad(t, ((pad, pad), (pad, pad), (0, 0)), constant_values=255) for t in tiles]))
    cv2.imwrite(str(out), np.vstack(rows))
    return out


def main(
    versions: dict[str, Path],
    dataset: Dataset,
    out_dir: Path,
    baseline: str = "bow",
    split_name: str = "test",
) -> Path:
    """Evaluate the index version of every preset (preset -> version folder); write results.{md,json},
    recall_at_k.png and a contact sheet per preset into out_dir. Returns the markdown file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    evals: dict[str, Evaluation] = {}
    results: dict[str, dict[str, Any]] = {}
    rows: np.ndarray | None = None
    for preset, version in versions.items():
        loaded = store.load(version)
        split = held_out_rows(dataset, split_name, loaded.directory / "split.json")
        if rows is not None and not np.array_equal(rows, split):
            raise ValueError(f"preset {preset} was split differently: presets must share the held-out split")
        rows = split
        ev = evaluate_searcher(Searcher(loaded), dataset, rows, split_name)
        evals[preset], results[preset] = ev, dict(ev.summary, index_version=loaded.version)
        contact_sheet(ev, dataset, rows, out_dir / f"contact_sheet-{preset}.png")
        log.info("%s: %s", preset, {k: results[preset][k] for _, k in COLUMNS})
    if baseline in evals:
        for name, ev in evals.items():
            if name != baseline:
                results[name]["sign_test"] = sign_test(ev.ap, evals[baseline].ap)
    assert rows is not None and dataset.sim is not None  # evaluate() refuses a data set without ground truth
    plot_recall(evals, dataset.sim[rows], out_dir / "recall_at_k.png")
    meta = {
        "data": str(dataset.root),
        "split": split_name,
        "queries": len(rows),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "created": utc_timestamp(),
    }
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "presets": results}, indent=1), encoding="utf-8")
    md = out_dir / "results.md"
    md.write_text(
        f"Held-out {split_name} areas of {dataset.root.name}: {len(rows)} queries "
        f"({next(iter(results.values()))['n_queries']} with a relevant map image), all figures in %, "
        f"latency = in-process time per query; sign test = per-query AP wins/losses/ties.\n\n"
        + markdown_table(results, baseline)
        + "\n",
        encoding="utf-8",
    )
    return md
