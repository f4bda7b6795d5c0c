"""The container files: valid compose, and the image runs the README's own make targets."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def compose_bin() -> str:
    exe = shutil.which("docker-compose")
    if exe:
        return exe
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but docker-compose (Debian package) is not installed; .ci/run installs it")
    pytest.skip("docker-compose not installed")


def test_compose_file_is_valid() -> None:
    out = subprocess.run([compose_bin(), "config"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    conf = yaml.safe_load(out.stdout)
    assert conf["services"]["indexer"]["command"] == ["make", "build"]
    assert conf["services"]["api"]["command"] == ["make", "serve"]
    assert conf["services"]["api"]["depends_on"]["indexer"]["condition"] == "service_completed_successfully"


def test_compose_data_override_mounts_read_only(tmp_path: Path) -> None:
    env = os.environ | {"DATA_DIR": str(tmp_path)}
    cmd = [compose_bin(), "-f", "docker-compose.yml", "-f", "docker-compose.data.yml", "config"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert f"{tmp_path}:/data:ro" in out.stdout
    assert "IMGSEARCH_DATA: /data" in out.stdout
    # Without DATA_DIR the override refuses, with a message, rather than mount nothing.
    env.pop("DATA_DIR")
    bad = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "set DATA_DIR" in bad.stderr


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


def test_image_and_compose_use_the_readme_make_targets() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    compose = (ROOT / "docker-compose.yml").read_text()
    readme = (ROOT / "README.md").read_text()
    targets = make_targets()
    used = set(re.findall(r"^RUN make (\w+)", dockerfile, flags=re.M)) | set(
        re.findall(r'"make", "(\w+)"', dockerfile + compose)
    )
    assert used, "the image should run make targets"
    assert used <= targets
    assert {"run", "test"} <= targets
    for t in ("make run", "make test"):
        assert t in readme
    assert re.search(r"^USER (?!root)\w+", dockerfile, flags=re.M), "the image must not run as root"
    assert "HEALTHCHECK" in dockerfile
