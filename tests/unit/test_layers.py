"""The package layers: the import contract has teeth, and the server imports none of the build stack."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("common", "dataset", "features", "model", "indexer", "retrieval", "app", "evaluation", "cluster", "cli")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """A copy of the packages and the contract, to break on purpose."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "web"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_contract_holds_and_catches_an_upward_import(tree: Path) -> None:
    ok = lint_imports(tree)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    append(tree / "features" / "orb.py", "import retrieval.query  # noqa: E402, F401")
    broken = lint_imports(tree)
    assert broken.returncode != 0
    assert "Layers: each package imports only the packages below it BROKEN" in broken.stdout
    assert "features.orb -> retrieval.query" in broken.stdout


def test_the_contract_catches_a_cycle_inside_a_package(tree: Path) -> None:
    # features.extract imports features.decode; the reverse import closes a cycle between siblings.
    append(tree / "features" / "decode.py", "import features.extract  # noqa: E402, F401")
    broken = lint_imports(tree)
    assert broken.returncode != 0
    assert "No cycles between the modules of a package BROKEN" in broken.stdout
    assert "Layers: each package imports only the packages below it KEPT" in broken.stdout


# Modules the server must never load: training, the demo-data renderer, evaluation, the stage runner
# and TensorFlow, Keras and matplotlib (serving embeds with numpy).
FORBIDDEN = ("model.train", "model.siamese", "dataset.synthetic", "evaluation", "cli.stages")
FORBIDDEN_EXTERNAL = ("tensorflow", "keras", "matplotlib")

_SERVE_AND_LIST_MODULES = """
import sys
from fastapi.testclient import TestClient

import app.main
import cli.main  # `imgsearch serve` runs the server in this process (with one worker)
from common.settings import Settings

before = sorted(sys.modules)
data, artifacts, query = sys.argv[1:4]
app = app.main.create_app(Settings(data=data, artifacts=artifacts, preset="paper"))
with TestClient(app, base_url="http://localhost") as client:  # runs the lifespan: loads the index, warms up
    with open(query, "rb") as f:
        r = client.post("/search", files={"file": ("q.jpg", f.read())})
    assert r.status_code == 200, r.text
print("IMPORTED", " ".join(before))
print("SERVED", " ".join(sorted(sys.modules)))
"""


def _loaded(line: str, names: tuple[str, ...]) -> list[str]:
    return [m for m in line.split()[1:] if any(m == n or m.startswith(n + ".") for n in names)]


def test_the_server_loads_no_training_demo_data_evaluation_or_tensorflow(tiny_data: Path, tiny_artifacts: Path) -> None:
    query = sorted((tiny_data / "query" / "images").iterdir())[0]
    out = subprocess.run(
        [sys.executable, "-c", _SERVE_AND_LIST_MODULES, str(tiny_data), str(tiny_artifacts), str(query)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith(("IMPORTED", "SERVED"))}
    imported, served = lines["IMPORTED"], lines["SERVED"]
    # What loads is what the layers say: the query path and below ...
    assert _loaded(imported, ("retrieval.query", "retrieval.live", "indexer.store", "model.encoder"))
    # ... and nothing of the build stack, neither on import nor after serving a search.
    for line in (imported, served):
        assert _loaded(line, FORBIDDEN) == []
        assert _loaded(line, FORBIDDEN_EXTERNAL) == []


def test_import_graph_prints_the_layers_and_refuses_a_bad_root(tmp_path: Path) -> None:
    script = str(ROOT / "scripts" / "import_graph.py")
    out = subprocess.run([sys.executable, script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    graph = {a.strip(): b for a, b in (line.split(" -> ") for line in out.stdout.splitlines() if " -> " in line)}
    assert graph["common"].strip() == "(nothing)" and "retrieval" in graph["app"] and "app" not in graph["retrieval"]
    assert "package cycles: 0" in out.stdout
    bad = subprocess.run([sys.executable, script, "--root", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no pyproject.toml there" in bad.stderr


MYPY = Path(sys.executable).with_name("mypy")


def test_the_type_check_is_strict_and_catches_a_wrong_type(tmp_path: Path) -> None:
    # The contract's packages with the real config; common alone (the bottom layer) keeps it quick.
    shutil.copytree(ROOT / "common", tmp_path / "common", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)

    def mypy() -> subprocess.CompletedProcess[str]:
        cmd = [str(MYPY), "--no-incremental", "--config-file", str(tmp_path / "pyproject.toml"), "common"]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    ok = mypy()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # A typo in a typed stage conf is caught before anything runs, and so is a function left unannotated.
    append(tmp_path / "common" / "pipeline.py", "def _typo(p: Pipeline) -> int:\n    return p.features.nfeature")
    append(tmp_path / "common" / "clock.py", "def _untyped(x):\n    return x")
    broken = mypy()
    assert broken.returncode != 0
    assert '"FeaturesConf" has no attribute "nfeature"' in broken.stdout
    assert "Function is missing a type annotation" in broken.stdout
