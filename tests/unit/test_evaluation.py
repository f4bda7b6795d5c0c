"""The one evaluation (evaluation/evaluate.py): answers from any ranker, in process or over HTTP,
scored into one summary shape; and `imgsearch evaluate --url`, which scripts/client_evaluate.py runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest

from dataset.layout import Dataset, ImageSet
from evaluation import evaluate as ev

MAP = [f"database/images/{i}.jpg" for i in range(4)]


def _dataset(tmp_path: Path) -> Dataset:
    """Three queries over four map images: q0 sees map 1, q1 sees maps 2 and 3, q2 sees none."""
    queries = [f"query/images/q{i}.jpg" for i in range(3)]
    for rel in queries:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"jpeg")
    sim = np.array([[0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]], bool)
    loc = np.array([[100.0, 200.0, 0.0], [300.0, 400.0, 0.0], [0.0, 0.0, 0.0]])
    return Dataset(tmp_path, ImageSet(MAP, np.zeros((4, 3))), ImageSet(queries, loc), sim, sim * np.float32(0.8))


# What each query gets: map rows best first, and an estimated location (None: unknown); q2 is refused.
ANSWERS: dict[int, tuple[list[int], tuple[float, float] | None] | None] = {
    0: ([1, 0], (110.0, 200.0)),  # right at rank 1, located 10 m off
    1: ([0, 3, 2], None),  # right at rank 2
    2: None,
}


def _in_process(q: int) -> ev.Answer | None:
    a = ANSWERS[q]
    return None if a is None else ev.Answer(a[0], a[1], lambda: np.full(len(MAP), 0.5, np.float32))


def _service(request: httpx.Request) -> httpx.Response:
    q = int(re.search(rb'filename="q(\d)\.jpg"', request.content).group(1))
    if ANSWERS[q] is None:
        return httpx.Response(422, json={"detail": "no keypoints"})
    rows, where = ANSWERS[q]
    # The service names its hits by path; one it has but the data set has not (added online) is no map row.
    results = [{"id": 1000 + r, "path": MAP[r]} for r in rows] + [{"id": 7, "path": "added/online.jpg"}]
    est = {"status": "unknown"} if where is None else {"status": "estimated", "easting": where[0], "northing": where[1]}
    return httpx.Response(200, json={"results": results, "query_location": est})


def test_in_process_and_service_answers_give_the_same_figures_under_the_same_keys(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    rows = np.arange(3)
    local = ev.evaluate(_in_process, ds, rows, "all", ranked_by=ev.IN_PROCESS, scored=True).summary
    with httpx.Client(transport=httpx.MockTransport(_service)) as client:
        rank = ev.service_ranker(client, "http://service", ds, 50)
        remote = ev.evaluate(rank, ds, rows, "all", ranked_by=ev.HTTP, concurrency=2).summary
    assert local.keys() == remote.keys()  # one shape, wherever it is printed
    assert (
        local["n_queries"] == remote["n_queries"] == 2 and local["queries_rejected"] == remote["queries_rejected"] == 1
    )
    assert local["recall@1"] == 0.5 and local["recall@5"] == 1.0 and local["precision@5"] == pytest.approx(0.3)
    assert local["mAP"] == pytest.approx((1 + (1 / 2 + 2 / 3) / 2) / 2)
    for key in local.keys() - {"ranked_by", "computed_at", "latency_ms_p50", "latency_ms_mean"}:
        if not key.startswith("accuracy_within_"):
            assert remote[key] == local[key], key
    # Only in process is every map image scored; over HTTP that figure is not measured, so None.
    assert local["accuracy_within_0.1"] is not None and remote["accuracy_within_0.1"] is None
    assert local["localisation_median_m"] == 10.0 and local["localisation_answered"] == pytest.approx(1 / 3)
    assert (local["ranked_by"], remote["ranked_by"]) == (ev.IN_PROCESS, ev.HTTP)


def test_rows_that_are_no_map_image_or_repeat_one_never_count(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    out = ev.evaluate(lambda q: ev.Answer([9, 1, 1, -1, 2], None), ds, np.arange(2), "test", ranked_by="x")
    assert out.ranked[:, :5].tolist() == [[-1, 1, -1, -1, 2]] * 2  # in place: ranks do not move up
    assert out.summary["precision@5"] == pytest.approx(0.2)  # one relevant row each
    assert out.summary["localisation_answered"] == 0.0 and out.summary["latency_ms_p50"] is not None


def test_a_ranking_alone_has_the_figures_it_can_have(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    s = ev.summary(np.array([[1, -1], [3, 2]]), ds, np.arange(2), "test", ranked_by="bench")
    assert s["recall@1"] == 1.0 and s["queries_total"] == 2
    assert s["localisation_median_m"] is None and s["latency_ms_p50"] is None and s["accuracy_within_0.01"] is None
    no_truth = Dataset(tmp_path, ds.database, ds.queries, None, None)
    with pytest.raises(ValueError, match="ground truth"):
        ev.summary(np.zeros((0, 1), np.int64), no_truth, np.arange(0), "test", ranked_by="x")


def test_held_out_rows(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    assert ev.held_out_rows(ds, "all", None).tolist() == [0, 1, 2]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [ds.queries.paths[2]], "val": [], "test": ds.queries.paths[:2]}))
    assert ev.held_out_rows(ds, "test", split).tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"split\.json"):
        ev.held_out_rows(ds, "test", None)


def test_imgsearch_evaluate_url_prints_the_service_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli import main as cli

    ds = _dataset(tmp_path)
    seen = {}

    def fake_service(url: str, dataset: Dataset, rows: np.ndarray, split: str, concurrency: int) -> ev.Evaluation:
        seen.update(url=url, rows=rows.tolist(), split=split, concurrency=concurrency)
        return ev.evaluate(_in_process, dataset, rows, split, ranked_by=ev.HTTP)

    monkeypatch.setattr(cli, "_dataset", lambda s: ds)
    monkeypatch.setattr(ev, "evaluate_service", fake_service)
    args = ["evaluate", "--url", "http://service:1", "--split", "all", "--json", "--concurrency", "3"]
    assert cli.main([*args, "--data", str(tmp_path), "--artifacts", str(tmp_path / "a")]) == 0
    assert seen == {"url": "http://service:1", "rows": [0, 1, 2], "split": "all", "concurrency": 3}
    assert json.loads(capsys.readouterr().out)["n_queries"] == 2
    assert cli.main([*args[:-2], "--concurrency", "0", "--data", str(tmp_path)]) == 2


def test_imgsearch_evaluate_url_refuses_an_empty_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli import main as cli

    ds = _dataset(tmp_path)
    split = tmp_path / "split.json"  # a served model that learned from every labelled query
    split.write_text(json.dumps({"train": ds.queries.paths, "val": [], "test": []}))
    monkeypatch.setattr(cli, "_dataset", lambda s: ds)
    args = ["evaluate", "--url", "http://service:1", "--split", "test", "--split-file", str(split)]
    assert cli.main([*args, "--data", str(tmp_path), "--artifacts", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "no test queries" in err and "cross-validated" in err and "Traceback" not in err
