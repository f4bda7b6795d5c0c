"""Index persistence: ids survive save/load, corrupt or mismatched versions are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dataset.layout import Location
from indexer import store
from model.encoder import NumpyEncoder
from model.vectorize import Vectorizer


def encoder_file(tmp_path: Path, dim: int = 4) -> Path:
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(256, dim)).astype(np.float32)]
    enc = NumpyEncoder(weights, [np.zeros(dim, np.float32)], ["linear"], -1.0, 2.0)
    return enc.save(tmp_path / "encoder.npz")


VECTOR_CONF = {"name": "concat", "n_descriptors": 1}  # 256 values, the test encoder's input


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
    return store.publish(tmp_path / "family", index, images, files, {"preset": "t", "conf": {"vector": VECTOR_CONF}})


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
