"""The benchmark scripts' own logic (no timing): the harness's loop, the results writer, generated ANN
data, recall, targets, the report, the studies' argument checks."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from common.pipeline import IndexConf, get_pipeline
from features.orb import OrbFeatures
from model.vectorize import Vectorizer
from model.verify import Evidence
from tests.conftest import ROOT

BENCH = ROOT / "bench"


def _module(name: str) -> ModuleType:
    """A bench script by its path under bench/ ("run", "studies/shortlist")."""
    if str(BENCH) not in sys.path:  # the scripts import their siblings: bench/harness.py, bench/report.py, ...
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name.replace('/', '_')}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ann() -> ModuleType:
    return _module("ann")


@pytest.fixture(scope="module")
def run() -> ModuleType:
    return _module("run")


@pytest.fixture(scope="module")
def harness() -> ModuleType:
    return _module("harness")


@pytest.fixture(scope="module")
def report() -> ModuleType:
    return _module("report")


@pytest.fixture(scope="module")
def server() -> ModuleType:
    return _module("live_server")


def _real(n: int = 300, d: int = 16) -> np.ndarray:
    x = np.random.default_rng(1).standard_normal((n, d)).astype(np.float32) * np.linspace(2, 0.2, d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_generated_vectors_are_seeded_unit_and_clustered(ann: ModuleType) -> None:
    a = np.concatenate(list(ann.Generator(_real(), 50, 0.5, seed=3).database(2000)))
    b = np.concatenate(list(ann.Generator(_real(), 50, 0.5, seed=3).database(2000)))
    c = np.concatenate(list(ann.Generator(_real(), 50, 0.5, seed=4).database(2000)))
    assert a.shape == (2000, 16) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    # Photos of one place are closer to each other than to other places: the nearest neighbour of a
    # query is much closer than a random vector.
    q = ann.Generator(_real(), 50, 0.5, seed=3).queries(100)
    d2 = ((q[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    assert np.median(d2.min(1)) < 0.5 * np.median(d2)


def test_recall_at_k_counts_shared_ids(ann: ModuleType) -> None:
    truth = np.arange(20).reshape(2, 10)
    found = truth.copy()
    assert ann.recall_at_k(found, truth) == 1.0
    found[0, :5] = -1  # FAISS pads missing results with -1
    found[1] = found[1][::-1]  # order does not matter
    assert ann.recall_at_k(found, truth) == pytest.approx(0.75)


def test_the_served_layout_is_measured_beside_exact_and_hnsw_and_the_fastest_accurate_one_chosen(
    ann: ModuleType,
) -> None:
    gen = ann.Generator(_real(d=64), 150, 0.5, seed=0)
    # Coarse codes of 2 sub-quantizers: too coarse for a shallow shortlist to hold every neighbour.
    conf = IndexConf(m=16, coarse_m=2, shortlist=100, rerank=30, train_size=3000)
    out = ann.run_size(gen, 3000, nq=50, n_time=5, hnsw_max=10**6, seed=0, pq_conf=conf)
    rows = out["indexes"]
    assert {r["index"] for r in rows} == {"Flat (exact)", ann.PQ_LABEL, "HNSW32-Flat"}
    served = [r for r in rows if r["index"] == ann.PQ_LABEL]
    assert all((r["m"], r["coarse_m"], r["rerank"]) == (16, 2, 30) for r in served)
    # A deeper shortlist never loses a neighbour the shallower one found.
    recalls = [r["recall_at_10"] for r in served]
    assert len(recalls) >= 2 and recalls == sorted(recalls) and recalls[-1] >= 0.95
    best = out["fastest_at_recall_0.95"]
    accurate = [r for r in rows if r["recall_at_10"] >= 0.95]
    assert best in accurate and best["p50_ms"] == min(r["p50_ms"] for r in accurate)


def test_calls_in_turns_rotate_the_first_and_skip_refused_items(harness: ModuleType) -> None:
    order: list[tuple[str, int]] = []

    def call(name: str) -> Callable[[int], None]:
        def f(x: int) -> None:
            order.append((name, x))
            if x == 3 and name == "b":
                raise KeyError(x)

        return f

    prepared: list[int] = []
    calls = {"a": call("a"), "b": call("b")}
    t = harness.in_turns(
        calls, [1, 2, 3], rounds=2, warmup=1, prepare=lambda x: prepared.append(x) or x, skip=(KeyError,)
    )
    # Warm-up: the first item through each call, untimed; then each item in turns, the first rotating.
    assert order[:2] == [("a", 1), ("b", 1)]
    assert order[2:8] == [("a", 1), ("b", 1), ("b", 2), ("a", 2), ("a", 3), ("b", 3)]
    assert len(prepared) == len(order)  # every call's argument was prepared, untimed
    assert len(t["a"].wall) == 6 and len(t["b"].wall) == 4  # b refused item 3 in both rounds: not timed
    assert all(w >= 0 for w in t["a"].wall) and t["a"].ms(50) >= 0
    assert harness.time_calls(lambda x: x, [1, 2]).summary()["n"] == 2
    with pytest.raises(KeyError):  # what is not to be skipped still fails the run
        harness.in_turns({"b": call("b")}, [3])


def test_summaries_and_ratios(harness: ModuleType) -> None:
    s = harness.summarise([float(v) for v in range(1, 101)])
    assert s["n"] == 100 and s["p50_ms"] == 50.5 and s["max_ms"] == 100.0
    assert s["p99_ms"] == pytest.approx(99.01)
    assert harness.summarise([]) == {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    assert harness.ratio(15.0, 10.0) == 1.5
    assert harness.ratio(None, 10.0) is None and harness.ratio(1.0, None) is None and harness.ratio(1.0, 0.0) is None


def test_results_are_merged_section_by_section(report: ModuleType, tmp_path: Path) -> None:
    import json

    out = tmp_path / "results.json"
    started = report.started("bench/x.py", ["--a", "b c"])
    assert started["command"] == "python bench/x.py --a 'b c'"
    assert {"cpu", "cores", "memory_gb", "load_avg_start"} <= set(started["machine"])
    report.record("ann", started | {"sizes": {}}, out)
    report.record(report.SUITE, started | {"inproc_floor_ms": 5.0, "stale": 1}, out)
    whole = report.record(report.SUITE, started | {"inproc_floor_ms": 6.0}, out)
    # The suite's own keys are replaced (no stale figure survives), other scripts' sections kept.
    assert whole == json.loads(out.read_text())
    assert whole["inproc_floor_ms"] == 6.0 and "stale" not in whole and whole["ann"]["sizes"] == {}
    for section in (whole, whole["ann"]):
        assert section["created"] and section["command"] and "load_avg_end" in section["machine"]
        assert "commit" in section
    kept = report.record(report.SUITE, dict(whole, created="then"), out, stamp=False)
    assert kept["created"] == "then"  # a report rewritten from recorded figures keeps their date
    with pytest.raises(ValueError, match="unknown results section"):
        report.record("nope", {}, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary left behind


def test_a_markdown_section_replaces_itself_or_goes_before_another(report: ModuleType) -> None:
    b, e, soak = "<!-- x:begin -->", "<!-- x:end -->", "<!-- soak:begin -->\nsoak\n<!-- soak:end -->\n"
    new = f"{b}\nnew\n{e}"
    assert (
        report.replace_section(f"# B\n{b}\nold\n{e}\nafter\n{soak}", b, e, "new", soak[:17])
        == f"# B\n{new}\nafter\n{soak}"
    )
    assert report.replace_section(f"# B\n\n{soak}", b, e, "new", soak[:17]) == f"# B\n\n{new}\n\n{soak}"
    assert report.replace_section("# B\n", b, e, "new") == f"# B\n\n{new}\n"


def _result(**over: object) -> dict:
    r = {
        "preset": "p",
        "queries": 3,
        "inproc_floor_ms": 60.0,
        "stages_ms": {"decode": 1.0, "features": 9.0, "encode": 20.0, "search": 1.0, "verify": 29.0},
        "server_workers": 2,
        "http_p50_ms_c1": 70.0,
        "http_p99_ms_c1": 90.0,
        "rps_c1": 14.0,
        "rps_c8": 25.0,
        "http_p99_ms_c8": 400.0,
        "errors_c1": 0,
        "errors_c8": 0,
        "rss_mb": 1600.0,
        "ready_s": 2.0,
        "machine": {"cpu": "x", "cores": 2, "memory_gb": 24, "python": "3.11", "load_avg_start": [0.1, 0, 0]},
        "created": "t",
        "command": "python bench/run.py",
    }
    r["machine"]["load_avg_end"] = [0.2, 0, 0]
    return r | over


def test_targets_say_met_or_missed(run: ModuleType) -> None:
    met = {t: ok for t, _, ok in run.targets(_result())}
    assert met["http_p50_ms_c1 <= 1.25 x inproc_floor_ms"] is True  # 70 / 60 = 1.17
    assert met["rps_c8 >= 1.7 x rps_c1, no errors"] is True  # 25 / 14 = 1.79
    missed = {t: ok for t, _, ok in run.targets(_result(http_p50_ms_c1=80.0, errors_c8=1))}
    assert missed["http_p50_ms_c1 <= 1.25 x inproc_floor_ms"] is False
    assert missed["rps_c8 >= 1.7 x rps_c1, no errors"] is False  # fast enough, but an error
    ann = {"dim": 4, "sizes": {"1000000": {"queries": 1, "indexes": [], "fastest_at_recall_0.95": None}}}
    assert (
        dict((t, ok) for t, _, ok in run.targets(_result(ann=ann)))["1M vectors: p50 <= 2 ms at recall@10 >= 0.95"]
        is False
    )


def test_floor_against_the_previous_default_is_a_ratio_of_one_run(run: ModuleType) -> None:
    name = "inproc floor <= 1.3 x `dense-rvlad-verify`"

    def floor(preset_ms: float, baseline_ms: float) -> dict:
        ratio = round(preset_ms / baseline_ms, 3)
        f = {"baseline": "dense-rvlad-verify", "baseline_ms": baseline_ms, "preset_ms": preset_ms, "ratio": ratio}
        return {t: (m, ok) for t, m, ok in run.targets(_result(floor_vs_baseline=f))}

    assert floor(120.0, 100.0)[name] == ("1.200 x (120.0 ms against 100.0 ms, queries in turn)", True)
    assert floor(131.0, 100.0)[name][1] is False
    assert name not in {t for t, _, _ in run.targets(_result())}  # not measured: not claimed
    f = {"baseline": "b", "baseline_ms": 2.0, "preset_ms": 3.0, "ratio": 1.5}
    table = run.markdown(_result(floor_vs_baseline=f))
    assert "| floor ratio (preset / baseline) | 1.5 |" in table


def test_report_rewrites_only_its_section(run: ModuleType, tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# B\nbefore\n{run.BEGIN}\nold table\n{run.END}\nafter\n", encoding="utf-8")
    run.write_markdown(md, _result())
    text = md.read_text(encoding="utf-8")
    assert text.startswith("# B\nbefore\n") and text.endswith(f"{run.END}\nafter\n")
    assert "old table" not in text
    assert "| http_p50_ms_c1 | 70.0 |" in text
    assert "Command: `python bench/run.py`" in text


def test_process_tree_finds_children(server: ModuleType) -> None:
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tree = server.process_tree(os.getpid())
        assert tree[0] == os.getpid() and child.pid in tree
        assert server.rss_mb(child.pid) > 0
    finally:
        child.kill()
        child.wait()


def test_wait_loaded_counts_every_worker_that_serves(server: ModuleType, tmp_path: Path) -> None:
    import subprocess
    import threading
    import time

    log = tmp_path / "server.log"
    log.write_text('{"message": "serving index v1 (3 images)", "pid": 1}\n')
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        t0 = time.perf_counter()
        late = threading.Timer(0.3, lambda: log.write_text(log.read_text() + '{"message": "serving index v1"}\n'))
        late.start()
        took = server.wait_loaded(log, proc, t0, workers=2, timeout=20)
        late.join()
        assert 0.3 <= took < 20  # returned once the second worker's line came, not before
        with pytest.raises(RuntimeError, match=r"within 0\.3 s"):  # a third never comes: gives up
            server.wait_loaded(log, proc, time.perf_counter(), workers=3, timeout=0.3)
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(RuntimeError, match="exited"):  # the server is gone: no waiting for the timeout
        server.wait_loaded(log, proc, time.perf_counter(), workers=3, timeout=60)


def _wrk_run(latencies_ms: np.ndarray, duration_s: float, errors: int = 0) -> dict:
    """A wrk summary as bench/wrk_search.lua prints it, of these request latencies."""
    return {
        "requests": len(latencies_ms),
        "duration_s": duration_s,
        "errors": errors,
        "statuses": {"200": len(latencies_ms) - errors, "500": errors} if errors else {"200": len(latencies_ms)},
        "quantiles_ms": np.percentile(latencies_ms, np.arange(1, 200) / 2).tolist(),
        "mean_ms": float(latencies_ms.mean()),
        "max_ms": float(latencies_ms.max()),
    }


def test_merged_wrk_runs_weigh_each_run_by_its_requests(server: ModuleType) -> None:
    one = server.merge_runs([_wrk_run(np.arange(1.0, 1001.0), 10.0)])
    assert one["p50_ms"] == pytest.approx(np.percentile(np.arange(1.0, 1001.0), 50))
    assert one["rps"] == pytest.approx(100.0)
    # 900 fast requests and 100 slow ones: the median is a fast one, the 99th percentile a slow one,
    # whichever run comes first; rps is over the summed duration, errors and statuses add up.
    fast, slow = _wrk_run(np.full(900, 10.0), 5.0), _wrk_run(np.full(100, 200.0), 5.0, errors=2)
    for runs in ([fast, slow], [slow, fast]):
        m = server.merge_runs(runs)
        assert (m["requests"], m["errors"], m["rps"]) == (1000, 2, pytest.approx(100.0))
        assert m["statuses"] == {"200": 998, "500": 2}
        assert m["p50_ms"] == pytest.approx(10.0) and m["p99_ms"] == pytest.approx(200.0)
        assert m["mean_ms"] == pytest.approx(29.0) and m["max_ms"] == 200.0
    with pytest.raises(ValueError):
        server.merge_runs([])


@pytest.mark.parametrize("bad", [["--rerank", "0"], ["--shortlist", "800", "-1"], ["--queries", "0"]])
def test_shortlist_refuses_non_positive_settings(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    shortlist = _module("studies/shortlist")
    with pytest.raises(SystemExit) as e:
        shortlist.main(["--data", str(ROOT / "nowhere"), *bad])
    assert e.value.code == 2 and "must be positive" in capsys.readouterr().err


def test_targets_within_one_run(run: ModuleType) -> None:
    def met(**over: object) -> dict:
        return {t: ok for t, _, ok in run.targets(_result(**over))}

    now = met()  # floor 60 = 6.7 x features 9; HTTP 70 = 1.17 x floor; 25 / 14 = 1.79 x; 1,600 MB; 2 s
    assert now["inproc floor <= 2.5 x the features stage"] is False
    assert now["http_p50_ms_c1 <= 1.1 x inproc floor"] is False
    assert now["rps_c8 >= 1.85 x rps_c1, no errors"] is False
    assert now["RSS of the serving tree <= 1.0 GB"] is False
    assert now["ready_s <= 3 s"] is True
    lean = met(inproc_floor_ms=22.0, http_p50_ms_c1=24.0, rps_c8=26.0, rss_mb=900.0, ready_s=3.5)
    assert lean["inproc floor <= 2.5 x the features stage"] is True  # 22 / 9 = 2.44
    assert lean["http_p50_ms_c1 <= 1.1 x inproc floor"] is True
    assert lean["rps_c8 >= 1.85 x rps_c1, no errors"] is True
    assert lean["RSS of the serving tree <= 1.0 GB"] is True
    assert lean["ready_s <= 3 s"] is False
    # HTTP p50 against the floor measured just before the server, where the run has it: 70 / 66 = 1.06.
    drifted = met(inproc_floor_ms_before=66.0)
    assert drifted["http_p50_ms_c1 <= 1.1 x inproc floor"] is True
    slower_before = met(inproc_floor_ms=66.0, inproc_floor_ms_before=60.0)
    assert slower_before["http_p50_ms_c1 <= 1.1 x inproc floor"] is False
    big = {"n": 1_000_000, "search_p50_ms": 4.0, "exact_p50_ms": 500.0, "recall_at_10": 0.97}
    big |= {"recall_at_10_london_queries": 0.5, "rss_mb": 5000.0, "workers": 3, "ready_s": 9.0}
    served = {t: ok for t, _, ok in run.targets({"served_1m": big})}
    assert served == {
        "1,000,000 served: search <= 1/100 exact at recall@10 >= 0.95": True,
        "1,000,000 served: RSS <= 6 GB": True,
    }
    slow = {t: ok for t, _, ok in run.targets({"served_1m": big | {"search_p50_ms": 5.5, "rss_mb": 7000.0}})}
    assert not any(slow.values())


def test_the_million_collection_keeps_the_real_keypoints_and_generates_the_rest(run: ModuleType) -> None:
    from features.orb import OrbFeatures
    from model.verify import MapFeatures

    million = _module("million")
    rng = np.random.default_rng(0)
    feats = [
        OrbFeatures(rng.random((n, 2)).astype(np.float32), rng.integers(0, 256, (n, 32), dtype=np.uint8))
        for n in (4, 2)
    ]
    real = MapFeatures.build([0, 1], feats, [rng.integers(0, 8, 4), rng.integers(0, 8, 2)])
    kp = million.generated_keypoints(real, 5, 3, 8, seed=0)
    assert kp.ids.tolist() == [0, 1, 2, 3, 4] and kp.offsets.tolist() == [0, 4, 6, 9, 12, 15]
    assert np.array_equal(kp.descriptors[:6], real.descriptors) and np.array_equal(kp.xy[:6], real.xy)
    for r in range(2, 5):  # each generated set sorted by word, as the store keeps every image
        w = kp.words[kp.offsets[r] : kp.offsets[r + 1]]
        assert np.all(np.diff(w) >= 0) and w.max() < 8
    assert len(kp.xy) == len(kp.descriptors) == len(kp.words) == len(kp.angles) == 15


def test_the_generated_collection_starts_with_the_real_images_in_id_order() -> None:
    from types import SimpleNamespace

    from common.pipeline import IndexConf
    from indexer.kinds import build_index

    london = _module("london")
    real = _real(40, 16)
    ids = np.arange(40)[::-1].copy()  # stored in another order than the ids
    served = SimpleNamespace(index=build_index(IndexConf(kind="exact"), real, ids))
    xb, gen = london.collection(served, 200, 5, 1.0, seed=3)
    assert xb.shape == (200, 16) and np.allclose(xb[:40], real[::-1])  # row i is image i
    assert np.array_equal(xb, london.collection(served, 200, 5, 1.0, seed=3)[0])  # seeded
    assert gen.queries(4).shape == (4, 16)
    with pytest.raises(ValueError, match="size above"):
        london.collection(served, 40, 5, 1.0, seed=3)
    # recall@10 as every evaluation has it: of the queries with a relevant map image, those with one
    # among their ids (generated ids, past the real images, never are); the second query has none.
    from dataset.layout import Dataset, ImageSet

    relevant = np.array([[True, False], [False, False], [False, True]])
    images = ImageSet(["a.jpg", "b.jpg"], np.zeros((2, 3)))
    queries = ImageSet(["q0.jpg", "q1.jpg", "q2.jpg"], np.zeros((3, 3)))
    ds = Dataset(Path("nowhere"), images, queries, relevant, relevant.astype(np.float32))
    found = np.array([[5, 0, -1], [1, 0, 7], [9, 8, 7]])
    assert london.recall_at(found, ds, [0, 1, 2]) == 0.5


def test_cold_rows_times_each_reader_on_rows_it_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    cold_rows = _module("studies/cold_rows")
    work, out = tmp_path / "work", tmp_path / "results.json"
    work.mkdir()
    args = ["--rows", "256", "--per-query", "3", "--queries", "2", "--dir", str(work), "--out", str(out)]
    assert cold_rows.main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["reader"] for r in rows] == ["read_rows", "read_rows, descriptor per call", "one-at-a-time"]
    assert all(r["queries"] == 2 and r["cold_p50_ms"] > 0 and r["warm_p90_ms"] > 0 for r in rows)
    assert not list(work.iterdir())  # its file is removed afterwards
    recorded = json.loads(out.read_text())["cold_rows"]
    assert recorded["readers"] == rows and recorded["command"].startswith("python bench/studies/cold_rows.py")


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (["--rows", "100"], "--rows >= 128"),
        (["--per-query", "0"], "--per-query"),
        (["--queries", "0"], "--queries >= 1"),
    ],
)
def test_cold_rows_refuses_bad_settings(bad: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _module("studies/cold_rows").main(bad)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_cold_rows_refuses_a_file_without_enough_stored_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from common.files import atomic_savez

    cold_rows = _module("studies/cold_rows")
    f = atomic_savez(tmp_path / "v.npz", vectors=np.zeros((200, 8), np.float32), ids=np.arange(200))
    assert cold_rows.main(["--file", str(tmp_path / "gone.npz")]) == 2
    assert "gone.npz" in capsys.readouterr().err
    assert cold_rows.main(["--file", str(f), "--member", "ids"]) == 2  # 1-D
    assert "not a stored 2-D array" in capsys.readouterr().err
    assert cold_rows.main(["--file", str(f), "--per-query", "150"]) == 2  # 200 rows cannot give 150 clear of the end
    assert "214+ rows" in capsys.readouterr().err
    out = ["--out", str(tmp_path / "results.json")]
    assert cold_rows.main(["--file", str(f), "--per-query", "2", "--queries", "1", *out]) == 0


@pytest.mark.parametrize("bad", [["--queries", "0"], ["--rounds", "0"]])
def test_search_parts_refuses_non_positive_settings(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _module("studies/search_parts").main(["--data", str(ROOT / "nowhere"), *bad])
    assert e.value.code == 2 and "must be positive" in capsys.readouterr().err


def test_search_parts_says_when_no_collection_was_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _module("studies/search_parts").main(["--data", str(tmp_path / "nowhere"), "--work", str(tmp_path)]) == 2
    assert "search_parts:" in capsys.readouterr().err


def test_slow_clients_tells_open_closed_and_answered_connections() -> None:
    import socket

    sc = _module("slow_clients")
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    try:
        assert sc.socket_state(a) == "open"
        b.sendall(b"HTTP/1.1 408")
        assert sc.socket_state(a) == "answered"
        assert sc.socket_state(a) == "answered"  # a peek: the bytes are still there
        d.close()
        assert sc.socket_state(c) == "closed"
    finally:
        for s in (a, b, c):
            s.close()


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (["--held", "1"], "--held must be at least 2"),
        (["--workers", "0"], "--workers must be between 1 and 64"),
        (["--rounds", "0"], "--rounds and --requests must be positive"),
        (["--requests", "-1"], "--rounds and --requests must be positive"),
        (["--header-timeout", "0"], "--header-timeout and --body-timeout"),
        (["--body-timeout", "nan"], "--header-timeout and --body-timeout"),
        (["--preset", "nope"], "unknown --preset"),
        (["--held", "x"], "invalid int value"),
        (["--out", "/nowhere/slow_clients.json"], "--out /nowhere/slow_clients.json: no folder"),
        (["--markdown", "/nowhere/B.md"], "--markdown /nowhere/B.md: no folder"),
    ],
)
def test_slow_clients_refuses_bad_settings(
    bad: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        _module("slow_clients").main(["--data", str(tmp_path), *bad])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_slow_clients_says_to_build_a_missing_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sc = _module("slow_clients")
    with pytest.raises(SystemExit) as e:
        sc.main(["--data", str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "not a data folder" in capsys.readouterr().err
    data = tmp_path / "data"
    for rel in ("database/database.json", "query/query.json"):
        (data / rel).parent.mkdir(parents=True)
        (data / rel).write_text('{"im_paths": []}')
    assert sc.main(["--data", str(data), "--artifacts", str(tmp_path / "art"), "--preset", "paper"]) == 2
    err = capsys.readouterr().err
    assert "no index of preset paper" in err and f"IMGSEARCH_DATA={data}" in err and "make build" in err


def test_a_driver_probe_collection_past_the_map_images_repeats_them_with_ground_truth_padded() -> None:
    from dataset.layout import Dataset, ImageSet

    ray_bench = _module("ray_bench")
    db = ImageSet(["a.jpg", "b.jpg", "c.jpg"], np.arange(9, dtype=np.float64).reshape(3, 3))
    sim = np.array([[True, False, True], [False, True, False]])
    ds = Dataset(Path("/x"), db, ImageSet(["q1.jpg", "q2.jpg"], np.zeros((2, 3))), sim, sim.astype(np.float32))
    cut = ray_bench.first_map_images(ds, 2)
    assert cut.database.paths == ["a.jpg", "b.jpg"] and cut.sim.shape == (2, 2) and np.shares_memory(cut.sim, sim)
    big = ray_bench.first_map_images(ds, 7)
    assert big.database.paths == ["a.jpg", "b.jpg", "c.jpg"] * 2 + ["a.jpg"]
    assert np.array_equal(big.database.loc[6], db.loc[0])
    assert big.sim.shape == big.fov.shape == (2, 7) and big.fov.dtype == np.float32
    assert np.array_equal(big.sim[:, :3], sim) and not big.sim[:, 3:].any() and not big.fov[:, 3:].any()


def test_diffusion_follows_the_graph_and_keeps_the_tail() -> None:
    diffusion = _module("studies/diffusion")
    # Map images along two streets; the query stands next to the first image of street A, and nearer
    # (in L2) to one image of street B than to the far end of A.
    a = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    b = np.array([[0.0, 2.2], [1.0, 2.2], [2.0, 2.2], [3.0, 2.2]])
    xd = np.concatenate([a, b, [[9.0, 9.0]]])
    q = np.array([[0.0, 0.4]])
    dq, dm = diffusion.squared_l2(q, xd), diffusion.squared_l2(xd, xd)
    np.fill_diagonal(dm, np.inf)
    dq[:, 8] = np.inf  # the last map image has no features
    dm[:, 8] = dm[8, :] = np.inf
    l2 = np.argsort(dq, axis=1)[0]
    assert l2[:3].tolist() == [0, 1, 4]
    whole = diffusion.diffuse(dq, dm, diffusion.Variant(k=2, seeds=1, alpha=0.99, gamma=1.0))[0]
    assert set(whole[:4].tolist()) == {0, 1, 2, 3}  # the whole street the seed lies on comes first
    assert whole[-1] == 8  # an image without features stays last
    top = diffusion.diffuse(dq, dm, diffusion.Variant(k=2, seeds=1, alpha=0.99, gamma=1.0, blend=0.5, pool=3))[0]
    assert sorted(top[:3].tolist()) == sorted(l2[:3].tolist())  # re-ranks the first stage's top 3 only
    assert top[3:].tolist() == l2[3:].tolist()


def test_verify_depth_checks_its_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    verify_depth = _module("studies/verify_depth")
    with pytest.raises(SystemExit) as e:
        verify_depth.main(["--data", str(ROOT / "nowhere"), "--artifacts", str(ROOT / "nowhere"), "--n", "0"])
    assert e.value.code == 2 and "--n must be within 1..1000" in capsys.readouterr().err
    deeper = verify_depth.deeper(get_pipeline("default"), 80)
    assert deeper.verify is not None and deeper.verify.n == 80 and deeper.name == "default-n80"
    assert deeper.features == get_pipeline("default").features
    with pytest.raises(ValueError, match="does not verify"):
        verify_depth.deeper(get_pipeline("fast"), 80)


def test_query_assignment_at_ratio_zero_is_the_served_vector() -> None:
    query_assign = _module("studies/query_assign")
    conf = get_pipeline("default")
    rng = np.random.default_rng(0)
    desc = rng.integers(0, 256, (400, 32), dtype=np.uint8)
    vectorizer = Vectorizer(conf.vector.model_copy(update={"words": 16})).fit([desc], seed=0)
    xy = rng.uniform(0, [300, 200], (400, 2)).astype(np.float32)
    feats = OrbFeatures(xy, desc, height=200.0, width=300.0)
    single = query_assign.assigned(vectorizer, feats, 0.0)
    np.testing.assert_allclose(single, vectorizer(feats), atol=1e-6)
    both = query_assign.assigned(vectorizer, feats, 2.0)  # every descriptor in its two nearest words
    assert both.shape == single.shape and np.linalg.norm(both) == pytest.approx(1.0, abs=1e-5)
    assert not np.allclose(both, single)


def test_query_assign_checks_its_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    query_assign = _module("studies/query_assign")
    with pytest.raises(SystemExit) as e:
        query_assign.main(["--artifacts", str(ROOT / "nowhere"), "--ratios", "0.9"])
    assert e.value.code == 2 and "each ratio must be within (1, 2]" in capsys.readouterr().err


def test_verify_features_measures_where_the_inliers_lie() -> None:
    study = _module("studies/verify_features")
    frame = np.array([[0.0, 0.0], [100.0, 100.0]])
    # Four corners of a 4 x 4 grid, the far corner on the frame's edge counted in the last cell.
    corners = np.array([[1.0, 1.0], [99.0, 1.0], [1.0, 99.0], [100.0, 100.0]])
    assert study.coverage(corners, frame) == pytest.approx(4 / 16)
    assert study.coverage(np.array([[10.0, 10.0], [12.0, 11.0]]), frame) == pytest.approx(1 / 16)
    assert study.coverage(np.zeros((0, 2)), frame) == 0.0
    half = np.array([[[0.5, 0.0, 3.0], [0.0, 0.5, -1.0]]])[0]  # a similarity that halves the size
    evidence = Evidence(corners, corners / 2, half, matched=9)
    feats = study.candidate_features(evidence, frame, frame)
    assert feats[:3] == [4.0, 9.0, pytest.approx(4 / 16)]
    assert feats[4] == pytest.approx(np.log(2.0))


def test_verify_features_finds_the_queries_ranked_below() -> None:
    study = _module("studies/verify_features")
    labels = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 1]], float)
    order = np.array([[0, 1, 2], [0, 1, 2], [0, 1, 2], [2, 0, 1]])
    counted = np.array([True, True, True, False])
    # Query 0: relevant second; 1: first; 2: none in the list; 3: not counted.
    assert study.ranked_below(order, labels, counted).tolist() == [True, False, False, False]


def test_verify_features_checks_its_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    study = _module("studies/verify_features")
    with pytest.raises(SystemExit) as e:
        study.main(["--artifacts", str(ROOT / "nowhere"), "--jobs", "0"])
    assert e.value.code == 2 and "--jobs must be at least 1" in capsys.readouterr().err
    assert study.main(["--artifacts", str(ROOT / "nowhere"), "--preset", "fast"]) == 2
    assert "does not verify" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        study.main(["--artifacts", str(ROOT / "nowhere"), "--preset", "nope"])
    assert e.value.code == 2 and "unknown preset 'nope'" in capsys.readouterr().err
