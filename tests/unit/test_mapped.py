"""Index files memory-mapped read-only (common/files.py: mapped_npz): the same arrays as np.load, no
private copy, so the server's workers share one copy of the encoder and keypoints in the page cache."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from common.files import atomic_savez, mapped_npz
from features.orb import OrbFeatures
from model.encoder import NumpyEncoder
from model.verify import MapFeatures


def test_every_kind_of_member_reads_back_equal(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.random((300, 7), np.float32),
        "fortran": np.asfortranarray(rng.random((5, 4))),
        "text": np.array(["relu", "sigmoid"]),
        "empty": np.zeros((0, 32), np.uint8),
        "scalar": np.array(3),
    }
    path = atomic_savez(tmp_path / "a.npz", **arrays)
    mapped = mapped_npz(path)
    assert set(mapped) == set(arrays)
    with np.load(path) as z:
        for name, want in arrays.items():
            got = mapped[name]
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, z[name]), name
    assert isinstance(mapped["w"], np.memmap) and Path(mapped["w"].filename) == path.resolve()
    assert not mapped["w"].flags.writeable  # read-only: no process can change what the others see
    with pytest.raises(ValueError):
        mapped["w"][0, 0] = 1.0


def test_a_compressed_member_is_read_and_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez_compressed(path, x=np.arange(10))
    assert np.array_equal(mapped_npz(path)["x"], np.arange(10))
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(tmp_path / "o.npz", "w") as zf:
        zf.writestr("o.npy", buf.getvalue())
    with pytest.raises(ValueError, match="objects"):
        mapped_npz(tmp_path / "o.npz")


def test_encoder_and_keypoints_load_mapped_and_compute_as_before(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    enc = NumpyEncoder([rng.random((64, 16), np.float32)], [rng.random(16, np.float32)], ["linear"], -2.0, 1.0)
    loaded = NumpyEncoder.load(enc.save(tmp_path / "encoder.npz"))
    w = loaded.weights[0]
    assert not w.flags.owndata and not w.flags.writeable  # a view of the read-only mapping, not a copy
    x = rng.random((3, 64), np.float32)
    assert np.array_equal(loaded.embed(x), enc.embed(x))
    feats = [OrbFeatures(rng.random((n, 2), np.float32), rng.integers(0, 255, (n, 32), np.uint8)) for n in (4, 6)]
    kp = MapFeatures.build([7, 9], feats, [rng.integers(0, 5, 4), rng.integers(0, 5, 6)])
    back = MapFeatures.load(kp.save(tmp_path / "verify.npz"))
    assert not back.descriptors.flags.owndata and not back.descriptors.flags.writeable
    for field in ("ids", "offsets", "xy", "descriptors", "words"):
        assert np.array_equal(getattr(back, field), getattr(kp, field)), field


def test_rows_of_a_mapped_file_are_read_from_it_not_through_the_mapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from common.files import read_rows

    rng = np.random.default_rng(0)
    arrays = {
        "xy": rng.random((1000, 2)).astype(np.float32),
        "descriptors": rng.integers(0, 256, (1000, 32), dtype=np.uint8),
        "angles": rng.random(1000).astype(np.float16),
    }
    mapped = mapped_npz(atomic_savez(tmp_path / "k.npz", **arrays))
    starts, ends = np.array([5, 0, 990, 400, 7]), np.array([9, 3, 1000, 400, 8])  # one empty range
    reads: list[int] = []
    real = os.preadv

    def counting(fd: int, buffers: list, offset: int, *flags: int) -> int:
        got = real(fd, buffers, offset, *flags)  # a read from the cache alone may raise: not counted
        if got > 0:
            reads.append(offset)
        return got

    monkeypatch.setattr(os, "preadv", counting)
    for name, a in arrays.items():
        expected = np.concatenate([a[s:e] for s, e in zip(starts, ends, strict=True)])
        assert np.array_equal(read_rows(mapped[name], starts, ends), expected)
        assert np.array_equal(read_rows(a, starts, ends), expected)  # an array in memory: indexed
    # one read that brings data per non-empty range of a mapped array (from the cache alone where the
    # file system offers such reads, else a plain one)
    assert len(reads) == 4 * len(arrays)
    assert read_rows(mapped["xy"], np.array([3]), np.array([3])).shape == (0, 2)


def test_rows_are_read_through_a_descriptor_opened_with_the_mapping_and_closed_with_it(tmp_path: Path) -> None:
    import gc
    import os

    from common.files import read_rows

    def open_files() -> list[str]:
        out = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                out.append(os.readlink(f"/proc/self/fd/{fd}"))
            except FileNotFoundError:  # the listing's own descriptor, closed since
                continue
        return out

    a = np.arange(600, dtype=np.int64).reshape(200, 3)
    path = atomic_savez(tmp_path / "v.npz", rows=a, other=np.ones((4, 4), np.float32))
    z = mapped_npz(path)
    assert [f for f in open_files() if f.startswith(str(path))]
    path.unlink()  # a version's folder removed while a worker still serves it: reads go on
    assert np.array_equal(read_rows(z["rows"], np.array([5, 190]), np.array([7, 191])), a[[5, 6, 190]])
    del z
    gc.collect()
    assert not [f for f in open_files() if f.startswith(str(path))]  # closed with the mapping


def test_rows_the_page_cache_lacks_are_asked_of_the_disk_together_then_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import common.files
    from common.files import read_rows

    a = np.arange(4000, dtype=np.float32).reshape(1000, 4)
    path = atomic_savez(tmp_path / "v.npz", vectors=a)
    starts, ends = np.array([900, 10, 500, 7]), np.array([903, 11, 502, 9])
    events: list[tuple[str, int]] = []
    real = os.preadv

    def cache_holds_half(fd: int, buffers: list, offset: int, *flags: int) -> int:
        # A read that must not wait gets the first 8 bytes of a range (a page half cached) or none of
        # it; a blocking read returns at most 12 bytes at a time (reads may come back short).
        size = len(buffers[0])
        if flags:
            events.append(("nowait", offset))
            if offset // 16 % 2:
                raise BlockingIOError(11, "not cached")
            return real(fd, [buffers[0][: min(8, size)]], offset)
        events.append(("read", offset))
        return real(fd, [buffers[0][: min(12, size)]], offset)

    def advise(fd: int, offset: int, length: int, advice: int) -> None:
        names = {os.POSIX_FADV_WILLNEED: "willneed", os.POSIX_FADV_RANDOM: "random"}
        events.append((names[advice], offset))

    monkeypatch.setattr(os, "preadv", cache_holds_half)
    monkeypatch.setattr(os, "posix_fadvise", advise)
    monkeypatch.setattr(common.files, "_NOWAIT", 8)  # as Linux's RWF_NOWAIT, wherever the test runs
    mapped = mapped_npz(path)["vectors"]
    # no read-ahead past a row: advised once, on the descriptor opened with the mapping
    assert events == [("random", 0)]
    expected = np.concatenate([a[s:e] for s, e in zip(starts, ends, strict=True)])
    for _ in range(2):
        events.clear()
        assert np.array_equal(read_rows(mapped, starts, ends), expected)
        kinds = [k for k, _ in events]
        # every range tried from the cache first, then the disk asked for all that is missing, then
        # read; the file is not opened or advised again
        assert kinds[:4] == ["nowait"] * 4
        assert kinds[4:8] == ["willneed"] * 4 and set(kinds[8:]) == {"read"}
    base = mapped.offset
    half = {base + s * 16 + (0 if (base + s * 16) // 16 % 2 else 8) for s in starts.tolist()}
    assert {at for k, at in events if k == "willneed"} == half  # from where the cached part ended


def test_the_files_a_query_reads_are_read_ahead_whole_within_a_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from common.files import read_ahead

    rng = np.random.default_rng(2)
    feats = [OrbFeatures(rng.random((n, 2), np.float32), rng.integers(0, 255, (n, 32), np.uint8)) for n in (40, 60)]
    kp = MapFeatures.build([1, 2], feats, [rng.integers(0, 5, 40), rng.integers(0, 5, 60)])
    assert kp.on_demand_files() == []  # built in memory: nothing to read from disk
    path = kp.save(tmp_path / "verify.npz")
    assert MapFeatures.load(path).on_demand_files() == [path]  # its four arrays, one file
    other = atomic_savez(tmp_path / "vectors.npz", vectors=rng.random((5000, 64), np.float32))
    sizes = path.stat().st_size + other.stat().st_size
    read: dict[int, int] = {}
    real = os.readv

    def counting(fd: int, buffers: list) -> int:
        n = real(fd, buffers)
        read[fd] = read.get(fd, 0) + n
        return n

    monkeypatch.setattr(os, "readv", counting)
    # Every byte of both files, through a buffer smaller than either; a missing file is skipped.
    assert read_ahead([path, tmp_path / "gone.npz", other], budget=sizes, chunk=4096) == sizes
    assert sum(read.values()) == sizes
    read.clear()
    # Over the budget: nothing is read (they would only push each other out of the cache).
    assert read_ahead([path, other], budget=sizes - 1) == 0 and not read
    assert read_ahead([]) == 0
