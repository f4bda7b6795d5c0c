"""A disk that refuses: every durable operation with a write failing at its k-th file-system call, for
every k (no space, I/O error, read-only). Each must raise StorageError (StorageFullError for no
space), leave what a fresh process serves exactly as it was, and work when tried again.

tests/service/test_disk.py does the same over HTTP on a real, small, full and read-only file system."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from common.files import StorageError, StorageFullError
from dataset.layout import Location
from indexer import store
from retrieval.live import LiveIndex, compact, condense_log, open_version

LOC = Location(700010.5, 5710003.25, 42.5)


class Faults:
    """Counts the calls that write under `root` (open for writing, mkdir, write, fsync, ftruncate,
    replace) and makes the `fail_at`-th fail with `err`."""

    CALLS = ("open", "mkdir", "write", "fsync", "ftruncate", "replace")

    def __init__(self, root: Path, fail_at: int | None, err: int) -> None:
        self.root, self.fail_at, self.err = str(root.resolve()), fail_at, err
        self.count = 0
        self.real = {name: getattr(os, name) for name in self.CALLS}

    def _under(self, where: object) -> bool:
        if isinstance(where, int):
            try:
                where = os.readlink(f"/proc/self/fd/{where}")
            except OSError:
                return False
        return isinstance(where, str | os.PathLike) and os.path.abspath(os.fspath(where)).startswith(self.root)

    def _hit(self, where: object) -> None:
        if self._under(where):
            self.count += 1
            if self.count == self.fail_at:
                raise OSError(self.err, os.strerror(self.err))

    @contextmanager
    def active(self) -> Iterator[Faults]:
        real = self.real

        def open_(path, flags, mode=0o777, *args, **kw):  # os.open's own signature
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                self._hit(path)
            return real["open"](path, flags, mode, *args, **kw)

        def mkdir(path, *args, **kw):
            self._hit(path)
            return real["mkdir"](path, *args, **kw)

        def on_fd(name: str) -> Callable[..., object]:
            def call(fd, *args, **kw):
                self._hit(fd)
                return real[name](fd, *args, **kw)

            return call

        def replace(src, dst, *args, **kw):
            self._hit(dst)
            return real["replace"](src, dst, *args, **kw)

        patched = {"open": open_, "mkdir": mkdir, "replace": replace}
        patched |= {n: on_fd(n) for n in ("write", "fsync", "ftruncate")}
        for name, fn in patched.items():
            setattr(os, name, fn)
        try:
            yield self
        finally:
            for name, fn in real.items():
                setattr(os, name, fn)


def served(family: Path) -> tuple[str, dict[int, tuple[str, tuple[float, ...]]], bytes]:
    """What a fresh process serves from `family` (version, images) and the change log's bytes."""
    s, _ = open_version(family, store.current_version(family))
    log = family / "changes.log"
    images = {i: (r.path, tuple(r.loc.as_list())) for i, r in s.images.items()}
    return s.version, images, log.read_bytes() if log.is_file() else b""


def query(tiny_data: Path, i: int) -> bytes:
    return sorted((tiny_data / "query" / "images").iterdir())[i].read_bytes()


def add(tiny_data: Path) -> Callable[[Path], object]:
    def run(family: Path) -> object:
        live = LiveIndex(family)
        live.load_now()
        return live.add(query(tiny_data, 5), LOC)

    return run


def delete(image_id: int) -> Callable[[Path], object]:
    def run(family: Path) -> object:
        live = LiveIndex(family)
        live.load_now()
        return live.delete(image_id)

    return run


def condense(family: Path) -> object:
    s, _ = open_version(family, store.current_version(family))
    return condense_log(family, s.applied.seq, s.applied.max_id)


@pytest.fixture()
def base(tiny_artifacts: Path, tiny_data: Path, tmp_path: Path) -> Path:
    """A family with online changes: two images added, one map image deleted, a published copy."""
    artifacts = Path(shutil.copytree(tiny_artifacts, tmp_path / "base"))
    family = store.index_family(artifacts, tiny_data, "paper")
    live = LiveIndex(family)
    live.load_now()
    for i in (1, 2):
        live.add(query(tiny_data, i), LOC)
    live.delete(3)
    compact(family)  # a second version: something to roll back to
    live.add(query(tiny_data, 3), LOC)
    return family


def copy(family: Path, to: Path) -> Path:
    shutil.rmtree(to, ignore_errors=True)
    return Path(shutil.copytree(family, to))


def temporaries(family: Path) -> list[Path]:
    return [p for p in family.rglob("*") if p.name.endswith(".tmp")]


# Each: (tiny data, ids of the images served before) -> the operation on a family.
OPS: dict[str, Callable[[Path, list[int]], Callable[[Path], object]]] = {
    "add": lambda data, ids: add(data),
    "first-add": lambda data, ids: add(data),
    "delete-added": lambda data, ids: delete(max(ids)),
    "delete-map-image": lambda data, ids: delete(0),
    "rollback": lambda data, ids: store.rollback,
    "condense": lambda data, ids: condense,
}


def without_changes(family: Path, to: Path) -> Path:
    """A copy of `family` with no online change yet (no log, no uploads/ or changes/ folder)."""
    family = copy(family, to)
    for name in ("uploads", "changes"):
        shutil.rmtree(family / name)
    (family / "changes.log").unlink()
    return family


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO, errno.EROFS], ids=["full", "io-error", "read-only"])
@pytest.mark.parametrize("op", list(OPS))
def test_a_write_refused_at_any_call_changes_nothing(
    op: str, err: int, base: Path, tiny_data: Path, tmp_path: Path
) -> None:
    family = without_changes(base, tmp_path / "first") if op == "first-add" else base
    before = served(family)
    run = OPS[op](tiny_data, list(before[1]))
    # How many calls the operation makes, and what it leaves when none fails.
    clean = copy(family, tmp_path / "clean")
    with Faults(clean, None, err).active() as counted:
        run(clean)
    after = served(clean)
    assert after != before and counted.count >= 2
    refusals = 0
    for k in range(1, counted.count + 1):
        trial = copy(family, tmp_path / "trial")
        try:
            with Faults(trial, k, err).active():
                run(trial)
        except StorageError as e:
            refusals += 1
            assert isinstance(e, StorageFullError) == (err == errno.ENOSPC), e
            got = served(trial)
            # A condensed log that became visible, though not known durable, serves as the old one.
            logs = (before[2], after[2]) if op == "condense" else (before[2],)
            assert got[:2] == before[:2] and got[2] in logs, f"call {k} of {counted.count} left a half-applied {op}"
            assert temporaries(trial) == [], f"call {k} left temporaries"
            run(trial)  # the disk is fine again: the same operation goes through
        # Refused or not (a cache's write may fail quietly), the operation is whole.
        assert served(trial)[:2] == after[:2], f"{op} after call {k} failed"
    assert refusals >= 2, f"{op}: only {refusals} of {counted.count} calls were essential"
    report(f"{op}/{errno.errorcode[err]}", {"calls": counted.count, "refused": refusals})


REPORT = Path(__file__).resolve().parents[2] / "test-artifacts" / "storage-faults.json"


def report(case: str, counts: dict[str, int]) -> None:
    """Calls tried per operation (`pytest -s` prints them; test-artifacts/storage-faults.json keeps them)."""
    print(f"{case}: a write refused at each of {counts['calls']} calls, {counts['refused']} refused the operation")
    REPORT.parent.mkdir(exist_ok=True)
    data = json.loads(REPORT.read_text()) if REPORT.is_file() else {}
    REPORT.write_text(json.dumps(data | {case: counts}, indent=1))


def test_a_publish_refused_at_any_call_changes_nothing(base: Path, tmp_path: Path) -> None:
    from retrieval.live import republish
    from retrieval.searcher import Searcher

    before = served(base)

    def publish(family: Path) -> object:
        return republish(Searcher(store.load(store.current_version(family))), family, 1, {})

    clean = copy(base, tmp_path / "clean")
    with Faults(clean, None, errno.ENOSPC).active() as counted:
        publish(clean)
    refusals = 0
    for k in range(1, counted.count + 1):
        trial = copy(base, tmp_path / "trial")
        try:
            with Faults(trial, k, errno.ENOSPC).active():
                publish(trial)
        except StorageFullError:
            refusals += 1
            assert served(trial) == before, f"call {k} of {counted.count}"
        else:  # only what comes after CURRENT (pruning) may fail without failing the publish
            assert store.read_pointer(trial) != before[0]
        versions = [json.loads((v / "manifest.json").read_text())["version"] for v in store.versions(trial)]
        assert store.read_pointer(trial) in versions and temporaries(trial) == []
        assert not [p for p in trial.iterdir() if p.name.startswith(".v")], "a half-written version was left"
    report("publish/ENOSPC", {"calls": counted.count, "refused": refusals})
