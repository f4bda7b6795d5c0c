"""Index persistence: ids survive save/load, corrupt or mismatched versions are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.pipeline import FeaturesConf, IdentityConf, IndexConf, Pipeline, VectorConf
from dataset.layout import Location
from indexer import store
from model.encoder import NumpyEncoder
from model.vectorize import Vectorizer


def encoder_file(tmp_path: Path, dim: int = 4) -> Path:
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(256, dim)).astype(np.float32)]
    enc = NumpyEncoder(weights, [np.zeros(dim, np.float32)], ["linear"], -1.0, 2.0)
    return enc.save(tmp_path / "encoder.npz")


VECTOR_CONF = VectorConf(name="concat", n_descriptors=1)  # 256 values, the test encoder's input


def version_pipeline(index: IndexConf | None = None) -> Pipeline:
    """The pipeline a test version's manifest names: VECTOR_CONF's vectors, exact search unless `index`."""
    return Pipeline(
        name="t",
        features=FeaturesConf(),
        vector=VECTOR_CONF,
        encoder=IdentityConf(),
        index=index or IndexConf(kind="exact"),
    )


def publish_some(tmp_path: Path, ids: list[int], dim: int = 4) -> Path:
    rng = np.random.default_rng(len(ids))
    index = store.new_flat_index(dim)
    vecs = rng.normal(size=(len(ids), dim)).astype(np.float32)
    index.add_with_ids(vecs, np.array(ids, dtype=np.int64))
    images = [store.ImageRecord(i, f"database/images/{i}.jpg", Location(1.0 * i, 2.0, 90.0)) for i in ids]
    files = {
        "encoder.npz": encoder_file(tmp_path, dim),
        "vectorizer.npz": Vectorizer(VECTOR_CONF).save(tmp_path / "vectorizer.npz"),
    }
    return store.publish(
        tmp_path / "family", index, images, files, {"preset": "t", "conf": version_pipeline().to_json()}
    )


def test_save_load_keeps_ids(tmp_path: Path) -> None:
    ids = [42, 7, 1000, 3]
    version = publish_some(tmp_path, ids)
    loaded = store.load(store.current_version(tmp_path / "family"))
    assert loaded.version == version.name
    assert sorted(loaded.images) == sorted(ids)
    assert loaded.images[1000].path == "database/images/1000.jpg"
    # Searching with a stored vector returns that vector's own id first, not its row number.
    vec = loaded.index.reconstruct(1000)[None, :]
    _, found = loaded.index.search(vec, 1)
    assert found[0, 0] == 1000
    assert loaded.manifest["count"] == 4 and loaded.manifest["dim"] == 4


def test_current_points_at_newest_and_old_versions_are_pruned(tmp_path: Path) -> None:
    first = publish_some(tmp_path, [1, 2])
    second = publish_some(tmp_path, [1, 2, 3])
    third = publish_some(tmp_path, [1, 2, 3, 4])
    family = tmp_path / "family"
    assert store.current_version(family) == third
    assert second.exists() and not first.exists()  # the previous one is kept for rollback
    assert not list(family.glob(".*tmp*"))


def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    version = publish_some(tmp_path, [1, 2, 3])
    with open(version / "index.faiss", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(store.IndexLoadError, match="checksum mismatch"):
        store.load(version)


def test_count_mismatch_is_refused(tmp_path: Path) -> None:
    version = publish_some(tmp_path, [1, 2, 3])
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["count"] = 5
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(store.IndexLoadError, match="manifest 5"):
        store.load(version)


def test_encoder_dimension_mismatch_is_refused(tmp_path: Path) -> None:
    version = publish_some(tmp_path, [1, 2, 3], dim=4)
    (tmp_path / "other").mkdir()
    (version / "encoder.npz").write_bytes(encoder_file(tmp_path / "other", dim=5).read_bytes())
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["checksums"]["encoder.npz"] = store.sha256_file(version / "encoder.npz")
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(store.IndexLoadError, match="dimension mismatch"):
        store.load(version)


def test_missing_or_bad_pointer(tmp_path: Path) -> None:
    family = tmp_path / "family"
    family.mkdir()
    with pytest.raises(store.IndexLoadError, match="no index built yet"):
        store.current_version(family)
    (family / "CURRENT").write_text("../../etc")
    with pytest.raises(store.IndexLoadError, match="not an index version"):
        store.current_version(family)


def test_files_are_hashed_once_per_machine_until_they_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    version = publish_some(tmp_path, [1, 2, 3])
    names = sorted(json.loads((version / "manifest.json").read_text())["checksums"])
    hashed: list[str] = []
    real = store.sha256_file

    def counting(path: Path) -> str:
        hashed.append(path.name)
        return real(path)

    def age(name: str) -> None:  # as if written a minute ago
        t = (version / name).stat().st_mtime - 60
        os.utime(version / name, (t, t))

    monkeypatch.setattr(store, "sha256_file", counting)
    store.load(version)
    # Just written: a hash taken in the same clock tick could miss a write, so they are hashed again.
    assert sorted(hashed) == names
    for name in names:
        age(name)
    store.load(version)  # changed times: hashed, and now vouched for
    hashed.clear()
    store.load(version)
    assert hashed == []
    # A file written again (even with the same bytes) is hashed again.
    (version / "index.faiss").write_bytes((version / "index.faiss").read_bytes())
    store.load(version)
    assert hashed == ["index.faiss"]
    # Without the record (another machine, a read-only copy), every file is hashed.
    (version / store.CHECKED).unlink()
    hashed.clear()
    store.load(version)
    assert sorted(hashed) == names
    # Altered behind the record's back, same size, time set back: the inode or time still differ.
    for name in names:
        age(name)
    store.load(version)
    data = bytearray((version / "encoder.npz").read_bytes())
    data[-1] ^= 0xFF
    (version / "encoder.npz").write_bytes(bytes(data))
    with pytest.raises(store.IndexLoadError, match="checksum mismatch"):
        store.load(version)


def test_versions_of_earlier_layouts_are_refused_with_a_rebuild(tmp_path: Path) -> None:
    import shutil

    family = tmp_path / "family"
    v1 = publish_some(tmp_path, [1, 2])
    manifest = json.loads((v1 / "manifest.json").read_text())
    # A manifest without a key that publish writes (earlier builds wrote neither seq nor previous).
    for key in ("seq", "previous", "index_kinds", "shards", "checksums"):
        (v1 / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != key}))
        with pytest.raises(store.IndexLoadError, match=rf"has no {key}: .*rebuild the index \(`imgsearch build`\)"):
            store.load(v1)
    (v1 / "manifest.json").write_text(json.dumps(manifest))
    assert store.load(v1).version == v1.name
    # A version named as earlier builds named them (v<time>, no sequence number) is no version: not
    # listed, not a fallback, and CURRENT naming it asks for a rebuild.
    old = family / "v20240101-120000"
    shutil.copytree(v1, old)
    assert store.versions(family) == [v1] and store.fallbacks(family, old.name) == [v1]
    with pytest.raises(ValueError, match="not the name of an index version"):
        store.version_seq(old.name)
    (family / "CURRENT").write_text(old.name)
    with pytest.raises(store.IndexLoadError, match=r"earlier build: .*\(`imgsearch build`\)"):
        store.current_version(family)
    # A rollback from a version that does not load (its manifest of an earlier layout) goes to the
    # newest version that does.
    (family / "CURRENT").write_text(v1.name)
    v2 = publish_some(tmp_path, [1, 2, 3])
    assert store.current_version(family) == v2 and old.exists()  # not a version: never pruned either
    m2 = json.loads((v2 / "manifest.json").read_text())
    (v2 / "manifest.json").write_text(json.dumps({k: v for k, v in m2.items() if k != "previous"}))
    assert store.rollback(family) == (v2.name, v1)


# The version lifecycle ----------------------------------------------------------------------------


def test_a_build_after_a_rollback_keeps_the_version_rolled_back_to(tmp_path: Path) -> None:
    family = tmp_path / "family"
    v1 = publish_some(tmp_path, [1])
    v2 = publish_some(tmp_path, [1, 2])
    assert store.rollback(family) == (v2.name, v1)
    assert store.current_version(family) == v1
    v3 = publish_some(tmp_path, [1, 2, 3])
    # The version the operator chose to serve stays; the one they rejected goes.
    assert v1.exists() and not v2.exists() and store.current_version(family) == v3
    assert store.rollback(family) == (v3.name, v1)
    with pytest.raises(store.RollbackError, match="first"):
        store.rollback(family)  # v1 was the first: nothing before it


def test_version_order_does_not_follow_the_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    family = tmp_path / "family"
    v1 = publish_some(tmp_path, [1])
    v2 = publish_some(tmp_path, [1, 2])
    real = time.gmtime
    monkeypatch.setattr(store.time, "gmtime", lambda *a: real(0) if not a else real(*a))  # the clock stepped back
    v3 = publish_some(tmp_path, [1, 2, 3])
    assert v3.name.endswith("-19700101-000000") and v3.name > v1.name  # the sequence number leads
    assert [v.name for v in store.versions(family)] == [v2.name, v3.name]
    assert store.current_version(family) == v3 and not v1.exists()
    assert [store.version_seq(v.name) for v in (v2, v3)] == [2, 3]


def test_rollback_and_publish_take_turns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    family = tmp_path / "family"
    v1 = publish_some(tmp_path, [1])
    v2 = publish_some(tmp_path, [1, 2])
    checked, go_on = threading.Event(), threading.Event()
    real_load = store.load

    def slow_load(directory: Path, *args: object) -> store.LoadedIndex:
        out = real_load(directory, *args)
        checked.set()  # the rollback has checked its target and is about to point CURRENT at it
        assert go_on.wait(30)
        return out

    monkeypatch.setattr(store, "load", slow_load)
    rolled = threading.Thread(target=store.rollback, args=(family,))
    rolled.start()
    assert checked.wait(30)
    published: list[Path] = []
    publisher = threading.Thread(target=lambda: published.append(publish_some(tmp_path, [1, 2, 3])))
    publisher.start()
    publisher.join(1.0)
    # The publish waits for the rollback: it must not prune the version the rollback checked.
    assert publisher.is_alive() and store.read_pointer(family) == v2.name and v1.exists()
    go_on.set()
    rolled.join(30)
    publisher.join(30)
    v3 = published[0]
    assert store.current_version(family) == v3
    assert v1.exists() and not v2.exists()  # v3 follows v1, the version served when it was published
    assert json.loads((v3 / "manifest.json").read_text())["previous"] == v1.name


def test_a_dangling_or_corrupt_current_falls_back_and_rolls_back(tmp_path: Path) -> None:
    family = tmp_path / "family"
    v1 = publish_some(tmp_path, [1])
    v2 = publish_some(tmp_path, [1, 2])
    for garbage in ("v999999-20990101-000000", "\x00\xff garbage", ""):
        (family / "CURRENT").write_bytes(garbage.encode("latin-1"))
        with pytest.raises(store.IndexLoadError):
            store.current_version(family)
        assert store.fallbacks(family, store.read_pointer(family)) == [v2, v1]
    # A rollback mends it: to the newest version that loads.
    assert store.rollback(family)[1] == v2 and store.current_version(family) == v2
    # With CURRENT naming a corrupt version, the newest other one that loads is the target.
    with open(v2 / "index.faiss", "r+b") as f:
        f.write(b"\x00" * 8)
    (family / "CURRENT").write_text("v999999-20990101-000000")
    assert store.rollback(family)[1] == v1


def test_publishing_sweeps_what_killed_writers_left(tmp_path: Path) -> None:
    import fcntl
    import os
    import time

    family = tmp_path / "family"
    publish_some(tmp_path, [1])
    dead = family / ".v-1-deadbeef.tmp"  # a publisher killed mid-write: its owner lock is free
    dead.mkdir()
    (dead / store.OWNER).touch()
    (dead / "index.faiss").write_bytes(b"half")
    live = family / ".v-2-cafebabe.tmp"  # a publisher at work: it holds its owner lock
    live.mkdir()
    owner = open(live / store.OWNER, "w")  # noqa: SIM115
    fcntl.flock(owner, fcntl.LOCK_EX)
    uploads = family / "uploads"
    uploads.mkdir()
    old_tmp, new_tmp = uploads / ".a.jpg.x1.tmp", uploads / ".b.jpg.x2.tmp"
    for f in (old_tmp, new_tmp):
        f.write_bytes(b"x")
    t = time.time() - store.TMP_GRACE_S - 60
    os.utime(old_tmp, (t, t))
    try:
        publish_some(tmp_path, [1, 2])
        assert not dead.exists() and live.exists()
        assert not old_tmp.exists() and new_tmp.exists()
    finally:
        owner.close()


def test_published_files_are_readable_by_others_whatever_the_temporary_mode(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        version = publish_some(tmp_path, [1, 2])
        for f in [*version.iterdir(), tmp_path / "family" / "CURRENT"]:
            if f.is_file():
                assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, f
    finally:
        os.umask(old)


def test_a_write_faiss_could_not_make_is_the_os_error_it_was() -> None:
    full = "Error: 'ret == (size * 4)' failed: write error in /a/x: 65491 != 512000 (No space left on device)"
    ro = "Error in FileIOWriter(const char*): 'f' failed: could not open /a/x for writing: Read-only file system"
    assert (store._faiss_os_error(full).errno, store._faiss_os_error(ro).errno) == (28, 30)
    assert store._faiss_os_error("Error: 'd == index->d' failed") is None
