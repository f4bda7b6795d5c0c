"""The living index without a server: the change log's lines, the verifier's online additions, and
replay in the follower thread, never in the request that notices a change."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from common.clock import utc_timestamp
from common.files import StorageError, StorageFullError
from common.pipeline import VerifyConf
from dataset.layout import Location
from features.orb import OrbFeatures
from indexer.changes import ChangeLog, condense
from model.verify import MapFeatures, Verifier
from retrieval.live import IdempotencyConflictError, LiveIndex, compact
from retrieval.searcher import Searcher


def test_verifier_treats_added_images_like_stored_ones() -> None:
    rng = np.random.default_rng(1)

    def image() -> tuple[OrbFeatures, np.ndarray]:
        xy = rng.uniform(0, 300, (80, 2)).astype(np.float32)
        return OrbFeatures(xy, rng.integers(0, 256, (80, 32), dtype=np.uint8)), rng.integers(0, 8, 80)

    stored = [image(), image()]
    base = MapFeatures.build([0, 1], [f for f, _ in stored], [w for _, w in stored])
    conf = VerifyConf(max_hamming=64, ratio=0.9, ransac_px=8.0, ransac_iters=200)
    verifier = Verifier(conf, None, base, 8, [-2.0, 1.0, 0.0]).with_extra({2: stored[1], 3: image()})
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
    assert key is not None and key[1] == whole
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


# Changes that cannot be lost ----------------------------------------------------------------------


def query_image(tiny_data: Path, i: int) -> bytes:
    return sorted((tiny_data / "query" / "images").iterdir())[i].read_bytes()


LOC = Location(700010.5, 5710003.25, 42.5)


def test_numbering_continues_after_the_log_is_lost(family: Path, tiny_data: Path) -> None:
    live = LiveIndex(family)
    live.load_now()
    first, _ = live.add(query_image(tiny_data, 0), LOC)
    live.delete(first.id)
    second, _ = live.add(query_image(tiny_data, 1), LOC)
    compacted = compact(family)
    manifest = json.loads((compacted / "manifest.json").read_text())
    assert manifest["changes_seq"] == 3 and manifest["max_id"] == second.id
    (family / "changes.log").unlink()  # rotated away, or lost
    fresh = LiveIndex(family)
    fresh.load_now()
    third, added = fresh.add(query_image(tiny_data, 2), LOC)
    assert added and third.id == second.id + 1  # the deleted image's id is not handed out again
    lines = ChangeLog(family).read(0).records
    assert [r["seq"] for r in lines] == [4]  # numbered after what the version holds: applied, not skipped
    assert third.id in fresh.sync().images and second.id in fresh.sync().images
    other = LiveIndex(family)  # another process, started now
    assert third.id in other.load_now().images


def test_adds_are_idempotent_by_content_and_by_key(family: Path, tiny_data: Path) -> None:
    live = LiveIndex(family)
    size = live.load_now().size
    img, other = query_image(tiny_data, 0), query_image(tiny_data, 1)
    rec, added = live.add(img, LOC)
    again, added_again = live.add(img, Location(1.0, 2.0, 3.0))
    assert added and not added_again and again == rec  # the same bytes: the same image, as first added
    keyed, _ = live.add(other, LOC, "batch-7/1")
    assert live.add(other, LOC, "batch-7/1") == (keyed, False)
    with pytest.raises(IdempotencyConflictError, match="batch-7/1"):
        live.add(query_image(tiny_data, 2), LOC, "batch-7/1")
    assert live.sync().size == size + 2
    assert [r["op"] for r in ChangeLog(family).read(0).records] == ["add", "add"]
    # Another process (a worker started later) knows the key too, also once it is compacted in.
    compact(family)
    later = LiveIndex(family)
    later.load_now()
    assert later.add(other, LOC, "batch-7/1") == (keyed, False)
    # Deleted, the same bytes make a new image.
    later.delete(rec.id)
    readded, added = later.add(img, LOC)
    assert added and readded.id > keyed.id


def test_a_delete_leaves_no_bytes_of_the_image(family: Path, tiny_data: Path) -> None:
    live = LiveIndex(family)
    live.load_now()
    img = query_image(tiny_data, 3)
    rec, _ = live.add(img, LOC)
    assert (family / rec.path).read_bytes() == img and list((family / "changes").iterdir())
    live.delete(rec.id)
    leftovers = [f for f in family.rglob("*") if f.is_file() and img[:4096] in f.read_bytes()]
    assert leftovers == [] and list((family / "changes").iterdir()) == []
    assert rec.id not in live.sync().images


def test_a_failed_fsync_takes_the_line_back_before_any_reader_sees_it(
    family: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    from indexer import changes

    writer, reader = LiveIndex(family), LiveIndex(family)  # two workers on one family
    writer.load_now()
    before = reader.load_now()
    log_path = family / "changes.log"
    in_fsync, fail = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if log_path.exists() and os.path.samefile(f"/proc/self/fd/{fd}", log_path) and not fail.is_set():
            in_fsync.set()  # the line is written to the file, not yet durable
            assert fail.wait(30)
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(changes.os, "fsync", failing_fsync)  # the os module: every fsync passes here
    errors: list[Exception] = []

    def add() -> None:
        try:
            writer.add(query_image(tiny_data, 4), LOC)
        except StorageError as e:
            errors.append(e)

    t = threading.Thread(target=add)
    t.start()
    assert in_fsync.wait(60)
    assert log_path.stat().st_size > 0  # the line is in the file ...
    seen: list[Searcher | None] = []
    r = threading.Thread(target=lambda: seen.append(reader.sync(wait=30)))
    r.start()
    r.join(1.0)
    assert r.is_alive()  # ... but a reader waits rather than read what may be taken back
    fail.set()
    t.join(30)
    r.join(30)
    assert len(errors) == 1 and not isinstance(errors[0], StorageFullError) and "Input/output" in str(errors[0])
    assert seen[0] is not None and seen[0].size == before.size and log_path.stat().st_size == 0
    # The next add is numbered as if the failed one never was.
    rec, added = writer.add(query_image(tiny_data, 4), LOC)
    assert added and [r["seq"] for r in ChangeLog(family).read(0).records] == [1]
    assert rec.id in reader.sync().images


def test_condense_keeps_what_a_kept_version_or_a_new_build_needs() -> None:
    def add(seq: int, i: int) -> dict:
        return {"op": "add", "seq": seq, "id": i, "path": f"uploads/{i}.jpg", "loc": [0, 0, 0]}

    def delete(seq: int, i: int, path: str | None = None) -> dict:
        return {"op": "delete", "seq": seq, "id": i, "path": path or f"uploads/{i}.jpg"}

    records = [
        add(1, 10),
        add(2, 11),
        delete(3, 10),  # 10: added and deleted up to 5, held by no version: both go
        delete(4, 2, "database/images/2.jpg"),  # a map image of the data folder: a new build has it again
        add(5, 12),
        delete(6, 11),  # 11: held by the version of changes_seq 2, which replays this delete
        delete(7, 12),
        add(8, 13),
    ]
    previous = (2, {(11, "uploads/11.jpg")})  # a kept version with the changes up to 2 folded in
    compacted = (6, {(12, "uploads/12.jpg")})
    kept = condense(records, 6, [previous, compacted])
    assert [r["seq"] for r in kept] == [4, 5, 6]
    # Without the older version, 11's add and delete both go; 12 is deleted only after 6: its add stays.
    assert [r["seq"] for r in condense(records, 6, [compacted])] == [4, 5]
    assert condense(records, 0, [previous]) == []


def test_a_condensed_log_is_read_again_from_a_version(family: Path, tiny_data: Path) -> None:
    behind, writer = LiveIndex(family), LiveIndex(family)
    behind.load_now()
    writer.load_now()
    a, _ = writer.add(query_image(tiny_data, 5), LOC)
    assert a.id in behind.sync().images  # applied the add ...
    b, _ = writer.add(query_image(tiny_data, 6), LOC)
    writer.delete(a.id)  # ... but not yet these
    compact(family)  # the add and the delete of a are condensed away
    records = ChangeLog(family).read(0)
    assert all(r["id"] != a.id for r in records.records) and records.base_seq == 3
    after = behind.sync()
    assert after is not None and a.id not in after.images and b.id in after.images
    c, _ = behind.add(query_image(tiny_data, 7), LOC)
    assert c.id == b.id + 1 and c.id in writer.sync().images
