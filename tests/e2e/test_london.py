"""End to end on a subset of the real London data: CLI build, HTTP service, client evaluation.

GET /metrics/precision serves the area-fold cross-validation computed at index time (its figures are
those of the out-of-fold answers saved beside it), and the client (scripts/client_evaluate.py, scoring
from london_gt.h5) scores the service's own answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from common.pipeline import get_pipeline
from dataset.layout import load_dataset
from evaluation.cv import CrossValidation, fold_splits, per_query
from tests.conftest import ADMIN_KEY, ROOT


def test_cli_build_serve_and_client_agree(london_subset: Path, tmp_path: Path, start_server) -> None:
    env = {
        "IMGSEARCH_DATA": str(london_subset),
        "IMGSEARCH_ARTIFACTS": str(tmp_path / "artifacts"),
        "IMGSEARCH_PRESET": "paper",
        "IMGSEARCH_ADMIN_KEY": ADMIN_KEY,
    }
    build = subprocess.run(
        [sys.executable, "-m", "cli.main", "build"], cwd=ROOT, env=os.environ | env, capture_output=True, text=True
    )
    assert build.returncode == 0, build.stderr[-3000:]
    index_dir = Path(build.stdout.strip().splitlines()[-1])
    manifest = json.loads((index_dir / "manifest.json").read_text())
    n_map = len(json.loads((london_subset / "database" / "database.json").read_text())["im_paths"])
    assert manifest["count"] == n_map and manifest["preset"] == "paper"
    model_dir = tmp_path / "artifacts" / index_dir.parent.parent.name / manifest["model"]
    assert (model_dir / "loss.png").stat().st_size > 1000
    assert json.loads((model_dir / "history.json").read_text())["val_loss"]

    srv = start_server(env, wait_path="/readyz")
    served = httpx.get(srv.url + "/metrics/precision", headers={"X-API-Key": ADMIN_KEY}).json()
    ds = load_dataset(london_subset)
    pool, _, _, _ = fold_splits(ds.queries.loc, get_pipeline("paper").split)
    assert served["split"] == "cv" and served["queries_total"] == len(pool)
    saved = CrossValidation.load(next((tmp_path / "artifacts" / index_dir.parent.parent.name).glob("cv-paper-*.json")))
    assert ds.sim is not None and np.array_equal(saved.rows, pool)
    values = per_query(saved.ranked, ds.sim[pool], saved.loc_error)
    for k in ("1", "10", "50"):
        assert served["recall"][k] == pytest.approx(np.nanmean(values[f"recall@{k}"]), abs=1e-9)
        lo, hi = served["intervals"][f"recall@{k}"]
        assert lo <= served["recall"][k] <= hi
    assert served["test"]["n_queries"] == int(ds.sim[np.setdiff1d(np.arange(len(ds.queries)), pool)].any(1).sum())

    client = subprocess.run(
        [sys.executable, "scripts/client_evaluate.py", "--json", "--url", srv.url],
        cwd=ROOT,
        env=os.environ | env,
        capture_output=True,
        text=True,
    )
    assert client.returncode == 0, client.stderr
    figures = json.loads(client.stdout)
    assert figures["split"] == "all" and figures["n_queries"] == int(ds.sim.any(1).sum())
    assert all(0.0 <= figures[f"recall@{k}"] <= 1.0 for k in (1, 10, 50))

    # The search client prints ranked results for a London query image.
    out = subprocess.run(
        [
            sys.executable,
            "scripts/client_search.py",
            str(ds.image_path(ds.queries.paths[0])),
            "-k",
            "3",
            "--url",
            srv.url,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(lines) == 3 and all("database/images/" in line for line in lines)
