"""The imgsearch command line: help for each stage, clear exit codes for bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import ROOT

SUBCOMMANDS = ["presets", "data", "train", "index", "build", "evaluate", "serve"]


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=ROOT,
        env=os.environ | (env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help(sub: str) -> None:
    out = run(sub, "--help")
    assert out.returncode == 0 and f"imgsearch {sub}" in out.stdout


def test_console_script_installed() -> None:
    exe = Path(sys.executable).parent / "imgsearch"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and all(s in out.stdout for s in SUBCOMMANDS)


def test_missing_data_folder_exits_2_with_message(tmp_path: Path) -> None:
    out = run("train", "--data", str(tmp_path / "nowhere"), "--artifacts", str(tmp_path))
    assert out.returncode == 2
    assert "data folder not found" in out.stderr and "Traceback" not in out.stderr


def test_bad_env_setting_exits_2(tmp_path: Path) -> None:
    out = run("index", env={"IMGSEARCH_PRESET": "nonsense", "IMGSEARCH_ARTIFACTS": str(tmp_path)})
    assert out.returncode == 2
    assert "IMGSEARCH_PRESET" in out.stderr and "unknown preset" in out.stderr and "Traceback" not in out.stderr
    out = run("serve", env={"IMGSEARCH_PORT": "99999"})
    assert out.returncode == 2 and "IMGSEARCH_PORT" in out.stderr
    out = run("serve", env={"IMGSEARCH_SEARCH_SLOTS": "-1"})
    assert out.returncode == 2 and "IMGSEARCH_SEARCH_SLOTS" in out.stderr and "Traceback" not in out.stderr


def test_bad_jobs_and_workers_flags(tmp_path: Path) -> None:
    # --jobs counts feature extraction processes, --workers the server's processes: both must be >= 1.
    out = run("build", "--jobs", "0", "--artifacts", str(tmp_path))
    assert out.returncode == 2 and "--jobs" in out.stderr
    out = run("serve", "--workers", "0")
    assert out.returncode == 2 and "--workers" in out.stderr
    out = run("build", "--workers", "2")
    assert out.returncode == 2 and "unrecognized arguments: --workers" in out.stderr


def test_an_unknown_preset_exits_2_naming_the_presets(tmp_path: Path) -> None:
    from common.pipeline import PRESETS

    out = run("build", "--preset", "nope", "--artifacts", str(tmp_path))
    assert out.returncode == 2 and "unknown preset 'nope'" in out.stderr, out.stderr
    assert all(name in out.stderr for name in PRESETS) and "imgsearch presets --all" in out.stderr
    assert "Traceback" not in out.stderr and not list(tmp_path.iterdir())  # refused before any work


def test_presets_lists_the_presets_and_with_all_the_ablations() -> None:
    def names(out: subprocess.CompletedProcess[str]) -> list[str]:
        assert out.returncode == 0, out.stderr
        return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]

    shown = names(run("presets"))
    assert {"default", "fast", "paper", "paper-sim"} <= set(shown)
    assert not {"r5vlad", "bow", "vlad-verify", "dense-rvlad-verify"} & set(shown)  # ablations only with --all
    every = names(run("presets", "--all"))
    assert {"default", "fast", "paper", "paper-sim", "r5vlad", "bow", "vlad-verify", "teblid-rvlad-lw"} <= set(every)
    # Each line names the preset's stage choices.
    default = next(line.split() for line in run("presets").stdout.splitlines() if line.startswith("default "))
    assert default[1:] == ["dense-teblid", "vlad-r5", "lw-wb96-axes64", "auto", "angle-ma2-distinct", "place"]


def test_presets_json_is_the_typed_confs() -> None:
    from common.pipeline import PRESETS, Pipeline, get_pipeline

    out = run("presets", "--json")
    assert out.returncode == 0, out.stderr
    confs = json.loads(out.stdout)
    assert set(confs) == set(PRESETS)
    for name, conf in confs.items():
        assert Pipeline.model_validate(conf) == get_pipeline(name), name
    default, fast = confs["default"], confs["fast"]
    assert default["features"]["descriptor"] == "teblid" and default["features"]["upsample"] == 2.0
    assert default["vector"]["regions"] == [[0.0, 0.5], [0.5, 1.0]] and default["vector"]["words"] == 128
    assert default["encoder"]["kind"] == "pair-whiten" and default["encoder"]["embed_dim"] == 1024
    assert default["verify"]["max_angle_deg"] == 30.0 and default["expand"]["min_inliers"] == 16
    assert fast["verify"] is None and fast["expand"] is None and fast["encoder"] == default["encoder"]
    assert confs["paper"]["encoder"]["kind"] == "siamese-mlp" and confs["paper"]["vector"]["name"] == "concat"
    every = json.loads(run("presets", "--all", "--json").stdout)
    assert {"r5vlad", "bow"} <= set(every) and every["bow"]["vector"]["name"] == "bow"


def test_other_libraries_log_info_only_with_verbose(tiny_data: Path, tmp_path: Path) -> None:
    # `index --rollback` with nothing built: imports FAISS (whose loader logs at INFO), then exits 2.
    args = ["index", "--rollback", "--data", str(tiny_data), "--artifacts", str(tmp_path)]
    quiet = run(*args)
    assert quiet.returncode == 2 and "rolling back" in quiet.stderr, quiet.stderr
    assert "faiss.loader" not in quiet.stderr and "Traceback" not in quiet.stderr
    loud = run("-v", *args)
    assert loud.returncode == 2 and "rolling back" in loud.stderr, loud.stderr
    assert "INFO faiss.loader" in loud.stderr


def test_evaluate_compares_presets_by_cross_validation(tiny_data: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "report"
    args = ["--data", str(tiny_data), "--artifacts", str(tmp_path / "a"), "--out", str(out_dir)]
    out = run("evaluate", *args, "--presets", "bow", "vlad", "--baseline", "bow", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    table = (out_dir / "results.md").read_text()
    assert "| `bow` |" in table and "| `vlad` |" in table and "cross-validation" in table
    results = json.loads((out_dir / "results.json").read_text())["presets"]
    assert set(results) == {"bow", "vlad"} and "paired_recall@1" in results["vlad"]
    assert results["bow"]["split"] == "cv" and results["bow"]["test"]["split"] == "test"
    # Both over the same out-of-fold queries: every query outside the test split, once.
    assert results["bow"]["queries_total"] == results["vlad"]["queries_total"] > 0
    lo, hi = results["vlad"]["paired_recall@1"]["interval"]
    assert lo <= results["vlad"]["paired_recall@1"]["mean"] <= hi
    for png in ("recall_at_k.png", "contact_sheet-bow.png", "failures-vlad.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| **total** |" in (out_dir / "failures-bow.md").read_text()


def test_evaluate_cross_validates_prior_searches_against_the_fix_alone(tiny_data: Path, tmp_path: Path) -> None:
    args = ["--data", str(tiny_data), "--artifacts", str(tmp_path / "a"), "--preset", "bow"]
    out = run("evaluate", *args, "--prior", "20:60", "--json", timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    body = json.loads(out.stdout)
    assert body["preset"] == "bow" and body["folds"] == 5 and body["seed"] == 0
    fused, alone = body["results"]["sigma20-r60/fused"], body["results"]["sigma20-r60/fix-alone"]
    assert fused["n_queries"] == alone["n_queries"] > 0
    for fig in (fused, alone):
        assert 0 <= fig["recall@1"] <= fig["recall@10"] <= 1
        lo, hi = fig["recall@1_interval"]
        assert lo <= fig["recall@1"] <= hi
    # The fix alone answers the fix as the location: every query is answered.
    assert alone["localisation_answered"] == 1.0 and alone["heading_median_deg"] is None
    answers = list((tmp_path / "a").glob("*/cvprior-bow-*.npz"))
    assert len(answers) == 1
    with np.load(answers[0]) as z:
        assert len(z["rows"]) == fused["n_queries"] == len(z["sigma20-r60/fused/top1"])


@pytest.mark.parametrize("key", ["secret", "aaaaaaaaaaaaaaaaaaaaaaaa"])
def test_serve_refuses_a_weak_admin_key(key: str) -> None:
    out = run("serve", env={"IMGSEARCH_ADMIN_KEY": key})
    assert out.returncode == 2
    assert "IMGSEARCH_ADMIN_KEY" in out.stderr and "too weak" in out.stderr and key not in out.stderr


_WITHOUT_TRAIN_EXTRA = """
import sys

# An install without the `train` extra: importing Keras or TensorFlow fails as it would there.
sys.modules["keras"] = sys.modules["tensorflow"] = None
from cli.main import main

sys.exit(main(sys.argv[1:]))
"""


def test_training_without_the_train_extra_says_what_to_install(tiny_data: Path, tmp_path: Path) -> None:
    args = ["train", "--data", str(tiny_data), "--artifacts", str(tmp_path), "--preset", "paper", "--jobs", "1"]
    out = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TRAIN_EXTRA, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "train needs keras: pip install '.[train]'" in out.stderr and "Traceback" not in out.stderr


_WITHOUT_RAY_EXTRA = """
import sys

# An install without the `ray` extra: importing Ray fails as it would there.
sys.modules["ray"] = None
from cli.main import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["index", "serve"])
def test_the_ray_engine_without_the_ray_extra_says_what_to_install(command: str, tiny_data: Path) -> None:
    args = [command, "--engine", "ray", "--data", str(tiny_data)]
    out = subprocess.run(
        [sys.executable, "-c", _WITHOUT_RAY_EXTRA, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"{command} needs ray: pip install '.[ray]'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("flag", ["--shards", "--actors"])
def test_index_refuses_a_count_below_one(flag: str) -> None:
    out = run("index", flag, "0")
    assert out.returncode == 2 and f"--{flag.lstrip('-')} must be >= 1" in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--replicas", "2"], "--replicas is for --engine ray"),
        (["index", "--address", "127.0.0.1:6379"], "--address is for --engine ray"),
        (["serve", "--engine", "ray", "--workers", "2"], "--workers is for --engine embedded"),
        (["serve", "--shard-replicas", "2"], "--shard-replicas is for --engine ray"),
        (["serve", "--engine", "ray", "--shard-replicas", "0"], "--shard-replicas must be >= 1"),
        (["evaluate", "--prior", "30:0"], "RADIUS in (0, 5000]"),
        (["evaluate", "--prior", "thirty"], "expected SIGMA:RADIUS"),
    ],
)
def test_engine_flags_are_refused_with_the_other_engine(args: list[str], message: str) -> None:
    out = run(*args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_the_ray_engine_refuses_an_address_where_no_cluster_answers(tiny_data: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    out = run("index", "--engine", "ray", "--address", f"127.0.0.1:{port}", "--data", str(tiny_data))
    assert out.returncode == 2 and f"no Ray cluster answers at 127.0.0.1:{port}" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_the_health_check_restarts_a_service_not_ready_for_too_long(
    tmp_path: Path, tiny_data: Path, start_server, server
) -> None:
    import signal
    import time

    empty = tmp_path / "no-index"  # a data folder with nothing built for it: up, never ready
    srv = start_server({"IMGSEARCH_DATA": str(tiny_data), "IMGSEARCH_ARTIFACTS": str(empty)})
    victim = subprocess.Popen(["sleep", "60"])  # stands for the container's init
    state = tmp_path / "unready-since"

    def check(url: str) -> subprocess.CompletedProcess[str]:
        args = ["--url", url + "/readyz", "--restart-after", "2", "--state", str(state), "--pid", str(victim.pid)]
        return subprocess.run(
            [sys.executable, "-m", "cli.healthcheck", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
        )

    try:
        first = check(srv.url)
        assert first.returncode == 1 and "HTTP 503" in first.stderr and state.is_file()
        assert victim.poll() is None  # not ready for less than 2 s: no restart yet
        time.sleep(2.5)
        assert check(srv.url).returncode == 1
        assert victim.wait(10) == -signal.SIGTERM and not state.is_file()
        assert check(server.url).returncode == 0  # a ready service is healthy
        bad = subprocess.run(
            [sys.executable, "-m", "cli.healthcheck", "--restart-after", "soon"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert bad.returncode == 2 and "--restart-after" in bad.stderr
    finally:
        victim.kill()


def test_serve_flags_reach_every_worker(tiny_data: Path, tiny_artifacts: Path) -> None:
    # The environment names another preset and data folder; the flags win in every worker.
    from tests.conftest import Server

    env = {"IMGSEARCH_PRESET": "default", "IMGSEARCH_DATA": str(tiny_data / "nowhere")}
    args = ("--preset", "paper", "--data", str(tiny_data), "--artifacts", str(tiny_artifacts), "--workers", "2")
    srv = Server(env, args)
    try:
        srv.wait("/readyz", timeout=120)
        deadline = time.monotonic() + 120  # the second worker starts once the first serves
        while srv.output().count("serving index") < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert srv.output().count("serving index") == 2, srv.output()[-3000:]
        ready = [httpx.get(srv.url + "/readyz", timeout=10) for _ in range(12)]
        assert {r.status_code for r in ready} == {200}, [r.text for r in ready]
        assert {r.json()["preset"] for r in ready} == {"paper"}
        # The service logs its own lines, not the libraries' start-up chatter (only with -v).
        assert "faiss.loader" not in srv.output()
    finally:
        srv.stop()
