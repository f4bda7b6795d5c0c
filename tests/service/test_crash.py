"""Crash consistency of every durable operation, under the strict model of tests/crashfs.py: each
operation runs once under strace in its own process; every state a power cut could leave at any of
its system calls is materialised and opened as a fresh server process would open it. Then:
- the index loads (CURRENT's version, or a fallback that says so);
- before the operation was acknowledged, the served state is the old one or the new one, never a
  mix (nothing half-applied, nothing unacknowledged served in part);
- after it was acknowledged, the new state, with every change present exactly once.

The number of crash points each operation was cut at is printed (`pytest -s`) and kept in
test-artifacts/crash-points.json."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from indexer import store
from indexer.changes import ChangeLog
from indexer.kinds import index_ids
from tests.conftest import ROOT
from tests.crashfs import crash_states, record

# What a traced process runs: one operation on a family, then "MARK ack ..." on stdout right after
# it returned (what a server answers a client with).
DRIVER = """
import json, sys
from pathlib import Path
from dataset.layout import Location
from indexer import store
from retrieval.live import LiveIndex, compact, republish
from retrieval.searcher import Searcher

op, family = sys.argv[1], Path(sys.argv[2])
if op == "add":
    live = LiveIndex(family)
    live.load_now()
    rec, _ = live.add(Path(sys.argv[3]).read_bytes(), Location(700010.5, 5710003.25, 42.5))
    print("MARK ack", rec.id, flush=True)
elif op == "delete":
    live = LiveIndex(family)
    live.load_now()
    live.delete(int(sys.argv[3]))
    print("MARK ack", sys.argv[3], flush=True)
elif op == "publish":
    loaded = store.load(store.current_version(family))
    out = republish(Searcher(loaded), family, 1, {"copied_from": loaded.version})
    print("MARK ack", out.name, flush=True)
elif op == "compact":
    print("MARK ack", compact(family).name, flush=True)
elif op == "rollback":
    print("MARK ack", store.rollback(family)[1].name, flush=True)
"""

REPORT = ROOT / "test-artifacts" / "crash-points.json"


def served(family: Path) -> tuple[str, frozenset[tuple[int, str, tuple[float, ...]]]]:
    """What a fresh process serves from `family`: (version, images); fails the test on anything
    half-applied (an index that does not load, ids in the index and the id map that differ, a change
    numbered twice)."""
    from retrieval.live import LiveIndex

    live = LiveIndex(family)
    s = live.load_now()
    ids = index_ids(s.index).tolist()
    assert len(ids) == len(set(ids)) and set(ids) == set(s.images), "index and id map differ"
    records = ChangeLog(family).read(0).records
    seqs = [r["seq"] for r in records]
    assert len(seqs) == len(set(seqs)), f"a change numbered twice: {seqs}"
    # Every image the log still adds has its bytes (a new build or another model embeds them again).
    deleted = {(r["id"], r["path"]) for r in records if r["op"] == "delete"}
    for r in records:
        if r["op"] == "add" and (r["id"], r["path"]) not in deleted:
            assert (family / r["path"]).is_file(), f"image {r['id']} is in the log, its bytes are gone"
    return s.version, frozenset((r.id, r.path, tuple(r.loc.as_list())) for r in s.images.values())


def run_op(op: str, family: Path, tmp: Path, *args: str) -> dict[str, int]:
    """Run `op` once under strace on `family`, then open every crash state; returns the counts."""
    before = tmp / "before"
    shutil.copytree(family, before, symlinks=True)
    old = served(before)
    trace = record([sys.executable, "-c", DRIVER, op, str(family), *args], family, cwd=ROOT)
    assert not trace.warnings, trace.warnings
    (ack,) = [m.text for m in trace.marks if m.text and m.text.startswith("ack")]
    new = served(family)
    assert new != old or op in ("publish", "compact"), f"{op} changed nothing"
    points = 0
    for point in crash_states(trace, before):
        state = point.materialise(tmp / f"crash-{point.ordinal}")
        got = served(state)
        if point.after(ack):
            assert got[1] == new[1], f"{op}: crash point {point.ordinal} (event {point.index}) lost an acked change"
            if op in ("publish", "compact", "rollback"):
                assert got[0] == new[0], f"{op}: crash point {point.ordinal} serves {got[0]}, not {new[0]}"
        else:
            assert got[1] in (old[1], new[1]), f"{op}: crash point {point.ordinal} is half-applied"
            if op == "compact":
                assert got[1] == old[1]  # compaction changes what a version holds, not what is served
        shutil.rmtree(state)
        points += 1
    assert points >= 2, f"{op}: only {points} crash point: was anything recorded?"
    return {"events": len(trace.events), "crash_points": points}


def query_path(tiny_data: Path, i: int) -> Path:
    q = json.loads((tiny_data / "query" / "query.json").read_text())
    return tiny_data / q["im_paths"][i]


def prepare(family: Path, tiny_data: Path) -> int:
    """Online changes to start from: two images added, one map image deleted; returns an added id."""
    from dataset.layout import Location
    from retrieval.live import LiveIndex

    live = LiveIndex(family)
    live.load_now()
    loc = Location(700020.0, 5710010.0, 10.0)
    first, _ = live.add(query_path(tiny_data, 1).read_bytes(), loc)
    live.add(query_path(tiny_data, 2).read_bytes(), loc)
    live.delete(3)
    return first.id


def report(op: str, counts: dict[str, int]) -> None:
    print(f"{op}: {counts['events']} file-system events, cut at {counts['crash_points']} crash points")
    REPORT.parent.mkdir(exist_ok=True)
    data = json.loads(REPORT.read_text()) if REPORT.is_file() else {}
    REPORT.write_text(json.dumps(data | {op: counts}, indent=1))


# first-add: the family's first add (after a delete made the log), which creates uploads/ and changes/.
@pytest.mark.parametrize("op", ["first-add", "add", "delete", "publish", "compact", "rollback"])
def test_every_crash_point_of_an_operation_recovers(op: str, family: Path, tiny_data: Path, tmp_path: Path) -> None:
    if shutil.which("strace") is None:
        import os

        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but strace is missing (.ci/run installs it)")
        pytest.skip("strace not installed")
    if op == "first-add":
        from retrieval.live import LiveIndex

        live = LiveIndex(family)
        live.load_now()
        live.delete(3)
        assert (family / "changes.log").is_file() and not (family / "uploads").exists()
        report(op, run_op("add", family, tmp_path, str(query_path(tiny_data, 4))))
        return
    added = prepare(family, tiny_data)
    if op == "rollback":
        subprocess.run(
            [sys.executable, "-c", DRIVER, "publish", str(family)], cwd=ROOT, check=True, capture_output=True
        )
        assert len(store.versions(family)) == 2
    args = {"add": [str(query_path(tiny_data, 4))], "delete": [str(added)]}.get(op, [])
    report(op, run_op(op, family, tmp_path, *args))
