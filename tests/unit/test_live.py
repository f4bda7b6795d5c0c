"""The living index without a server: the change log's lines, the verifier's online additions, and
replay in the follower thread, never in the request that notices a change."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from common.clock import utc_timestamp
from features.orb import OrbFeatures
from indexer import store
from indexer.changes import ChangeLog
from model.verify import MapFeatures, Verifier
from retrieval.live import LiveIndex
from retrieval.searcher import Searcher


def test_verifier_treats_added_images_like_stored_ones() -> None:
    rng = np.random.default_rng(1)

    def image() -> tuple[OrbFeatures, np.ndarray]:
        xy = rng.uniform(0, 300, (80, 2)).astype(np.float32)
        return OrbFeatures(xy, rng.integers(0, 256, (80, 32), dtype=np.uint8)), rng.integers(0, 8, 80)

    stored = [image(), image()]
    base = MapFeatures.build([0, 1], [f for f, _ in stored], [w for _, w in stored])
    conf = {"max_hamming": 64, "ratio": 0.9, "ransac_px": 8.0, "ransac_iters": 200}
    verifier = Verifier(conf, base, 8, [-2.0, 1.0, 0.0]).with_extra({2: stored[1], 3: image()})
    f1, w1 = stored[1]
    query = OrbFeatures(f1.xy + np.float32([5, 3]), f1.descriptors)  # image 1, shifted
    inl = verifier.inliers(query, w1, [0, 1, 2, 3])
    assert inl[1] == inl[2] > 60 and inl[0] < 10 and inl[3] < 10  # the added copy scores as the original
    merged = verifier.features([1, 2])  # what a compacted version stores
    assert merged.ids.tolist() == [1, 2]
    a, b = merged.offsets[:2], merged.offsets[1:]
    assert np.array_equal(merged.descriptors[a[0] : b[0]], merged.descriptors[a[1] : b[1]])


def test_change_log_reads_whole_checksummed_lines_only(tmp_path: Path) -> None:
    changelog = ChangeLog(tmp_path)
    assert changelog.key() is None
    rec = {"op": "delete", "seq": 1, "id": 4, "path": "database/images/4.jpg"}
    with changelog.locked():
        changelog.append(rec)
    whole = (tmp_path / "changes.log").stat().st_size
    key = changelog.key()
    assert key is not None and key[0] == whole
    assert changelog.read(0).records == [rec]
    line = (tmp_path / "changes.log").read_bytes()
    with open(tmp_path / "changes.log", "ab") as f:
        f.write(line.replace(b'"id":4', b'"id":5') + line[:-5])  # a forged id, then a torn line
    assert changelog.key() != key  # a reader can tell the log changed, torn line or not
    tail = changelog.read(0)
    assert tail.records == [rec] and tail.bad_lines == 1 and tail.offset == 2 * whole
    assert changelog.read(tail.offset).records == []  # the torn line is not consumed
    with changelog.locked():
        changelog.append(rec | {"seq": 2})
    tail = changelog.read(0)
    assert [r["seq"] for r in tail.records] == [1, 2] and tail.offset == (tmp_path / "changes.log").stat().st_size


@pytest.fixture()
def family(tiny_artifacts: Path, tiny_data: Path, tmp_path: Path) -> Path:
    artifacts = Path(shutil.copytree(tiny_artifacts, tmp_path / "artifacts"))
    return store.index_family(artifacts, tiny_data, "paper")


def test_replay_of_another_models_add_runs_in_the_follower(
    family: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = LiveIndex(family)
    assert live.settled() is None  # nothing loaded yet
    before = live.load_now()
    assert live.settled() is before  # nothing published or logged since: no need to sync
    # An add logged by a process serving another model: its stored embedding does not fit this
    # index, so replay must embed the stored image again, through the feature pipeline.
    img = sorted((tiny_data / "query" / "images").iterdir())[0].read_bytes()
    changelog = ChangeLog(family)
    rel = changelog.store_upload(img, "jpg")
    new_id = before.applied.max_id + 1
    with changelog.locked():
        changelog.append(
            {
                "op": "add",
                "seq": 1,
                "id": new_id,
                "path": rel,
                "loc": [700010.5, 5710003.25, 42.5],
                "key": "another-model",
                "arrays": "changes/none.npz",
                "arrays_sha256": "0" * 64,
                "time": utc_timestamp(),
            }
        )
    callers: list[str] = []
    analyze = Searcher.analyze

    def recording_analyze(self: Searcher, data: bytes, timings: dict[str, float] | None = None):
        callers.append(threading.current_thread().name)
        return analyze(self, data, timings)

    monkeypatch.setattr(Searcher, "analyze", recording_analyze)
    assert live.settled() is None  # the event loop's fast path sees the logged change and steps aside
    after = live.sync()  # what a request calls first
    assert callers == ["index-follower"], "the request thread ran the feature pipeline"
    assert after is not None and after is not before
    assert new_id in after.images and after.size == before.size + 1
    assert after.applied.seq == 1 and new_id not in before.images  # the old snapshot is unchanged
    assert live.sync() is after and callers == ["index-follower"]  # nothing new: nothing replayed
    assert live.settled() is after
