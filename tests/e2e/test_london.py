"""End to end on a subset of the real London data: CLI build, HTTP service, client evaluation.

The client (scripts/client_evaluate.py, scoring from london_gt.h5) and GET /metrics/precision (computed at
index time) must agree on the same held-out queries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from dataset.layout import load_dataset
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
    test_queries = json.loads((index_dir / "split.json").read_text())["test"]
    assert served["split"] == "test" and served["queries_total"] == len(test_queries) > 0

    client = subprocess.run(
        [sys.executable, "scripts/client_evaluate.py", "--split", "test", "--json", "--url", srv.url],
        cwd=ROOT,
        env=os.environ | env,
        capture_output=True,
        text=True,
    )
    assert client.returncode == 0, client.stderr
    figures = json.loads(client.stdout)
    assert figures["n_queries"] == served["n_queries"]
    for k in ("5", "10", "20", "50"):
        assert figures[f"precision@{k}"] == pytest.approx(served["precision"][k], abs=1e-9)
        assert figures[f"recall@{k}"] == pytest.approx(served["recall"][k], abs=1e-9)

    # The search client prints ranked results for a London query image.
    ds = load_dataset(london_subset)
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
