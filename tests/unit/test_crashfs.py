"""The crash-state harness (tests/crashfs.py) on small programs whose crash states are known: each test
shows the harness telling a durable write from one that only looks done."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.crashfs import CrashPoint, Trace, TracedProgramError, crash_states, parse_strace, record

REPO = Path(__file__).resolve().parents[2]

# Put before every traced program: the folder it works in, and a folder fsync.
PRELUDE = """\
import os, sys
from pathlib import Path
root = Path(sys.argv[1])

def fsync_dir(p):
    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)

def mark(text):
    print("MARK " + text, flush=True)
"""


@pytest.fixture(scope="module")
def strace() -> str:
    """strace; in CI its absence is a failure, elsewhere a visible skip."""
    path = shutil.which("strace")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but strace is not installed (.ci/run installs it)")
        pytest.skip("strace is not installed")
    return path


def run(tmp: Path, body: str, files: dict[str, bytes] | None = None) -> tuple[Trace, list[CrashPoint], Path]:
    """Record `body` (after PRELUDE) working in a fresh root holding `files`; its crash states."""
    root = tmp / "root"
    root.mkdir()
    for rel, data in (files or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    before = tmp / "before"
    shutil.copytree(root, before, symlinks=True)
    prog = tmp / "prog.py"
    prog.write_text(PRELUDE + textwrap.dedent(body))
    trace = record([sys.executable, str(prog), str(root)], root, cwd=REPO)
    return trace, list(crash_states(trace, before)), root


def event_index(trace: Trace, op: str, path: str) -> int:
    """The index of the first event `op` on `path`."""
    return next(e.index for e in trace.events if e.op == op and e.path == path)


OLD, NEW = b"old contents\n", b"new contents, longer than the old ones\n" * 50

WRITE_TMP = """
fd = os.open(root / "final.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for i in range(0, len(NEW), 700):  # several writes: a torn copy would show
    os.write(fd, NEW[i : i + 700])
os.fsync(fd)
os.close(fd)
os.rename(root / "final.tmp", root / "final")
"""


@pytest.mark.parametrize("existed", [True, False])
def test_rename_without_folder_fsync_is_not_durable(strace: str, tmp_path: Path, existed: bool) -> None:
    # another file's fsync after the rename: a crash state after it, in which the rename must not show
    other = 'o = os.open(root / "other", os.O_WRONLY)\nos.write(o, b"later")\nos.fsync(o)\n'
    body = f"NEW = {NEW!r}\n" + WRITE_TMP + 'mark("renamed")\n' + other
    _, points, root = run(tmp_path, body, {"final": OLD, "other": b""} if existed else {"other": b""})
    assert (root / "final").read_bytes() == NEW  # what the program saw
    final = points[-1]
    assert final.after("renamed") and final.read("other") == b"later"
    assert final.read("final") == (OLD if existed else None)
    assert not final.exists("final.tmp")  # its entry was never made durable either
    assert all(p.read("final") == (OLD if existed else None) for p in points)


@pytest.mark.parametrize("existed", [True, False])
def test_rename_with_folder_fsync_is_durable_and_never_torn(strace: str, tmp_path: Path, existed: bool) -> None:
    body = f"NEW = {NEW!r}\n" + WRITE_TMP + "fsync_dir(root)\nmark('durable')\n"
    trace, points, _ = run(tmp_path, body, {"final": OLD} if existed else {})
    assert points[-1].read("final") == NEW
    assert points[0].read("final") == (OLD if existed else None)
    for p in points:
        assert p.read("final") in ((OLD, NEW) if existed else (None, NEW)), p
        if p.after("durable"):
            assert p.read("final") == NEW
    # the new bytes became durable at the folder's fsync, not at the rename
    dir_sync = event_index(trace, "fsync", ".")
    assert next(p.index for p in points if p.read("final") == NEW) == dir_sync


ATOMIC_WRITE_PROGRAM = """
import tempfile
sys.path.insert(0, {repo!r})
from common.files import atomic_write, fsync_directory

def atomic_write_without_file_fsync(path, data):
    # common.files.atomic_write with the file's own fsync left out
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{{path.name}}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    fsync_directory(path.parent)

write = atomic_write if sys.argv[2] == "real" else atomic_write_without_file_fsync
write(root / "final", {new!r})
mark("done")
atomic_write(root / "other", b"later")  # durable states after the acknowledgement
mark("other")
"""


def record_atomic_write(tmp: Path, variant: str) -> tuple[Trace, list[CrashPoint], Path]:
    root = tmp / "root"
    root.mkdir()
    (root / "final").write_bytes(OLD)
    before = tmp / "before"
    shutil.copytree(root, before)
    prog = tmp / "prog.py"
    prog.write_text(PRELUDE + ATOMIC_WRITE_PROGRAM.format(repo=str(REPO), new=NEW))
    trace = record([sys.executable, str(prog), str(root), variant], root, cwd=REPO)
    return trace, list(crash_states(trace, before)), root


def test_atomic_write_leaves_old_or_new_bytes(strace: str, tmp_path: Path) -> None:
    trace, points, _ = record_atomic_write(tmp_path, "real")
    assert [m.text for m in trace.marks] == ["done", "other"]
    assert {p.read("final") for p in points} == {OLD, NEW}
    after = [p for p in points if p.after("done")]
    assert len(after) >= 2  # "other" became durable after the mark
    assert all(p.read("final") == NEW for p in after)
    assert points[-1].read("other") == b"later"


def test_atomic_write_without_file_fsync_leaves_an_empty_file(strace: str, tmp_path: Path) -> None:
    _, points, root = record_atomic_write(tmp_path, "broken")
    assert (root / "final").read_bytes() == NEW  # the program cannot tell
    torn = [p for p in points if p.read("final") not in (OLD, NEW)]
    assert torn, "the harness missed the missing fsync"
    assert torn[0].read("final") == b""
    assert any(p.after("done") for p in torn)  # even after the acknowledgement


def test_appends_and_a_new_folder(strace: str, tmp_path: Path) -> None:
    body = """
    fd = os.open(root / "log", os.O_WRONLY | os.O_APPEND)
    for i in range(5):
        os.write(fd, f"line {i}\\n".encode())
        os.fsync(fd)
        mark(f"line {i}")
    os.mkdir(root / "sub")
    with open(root / "sub" / "f", "wb") as f:
        f.write(b"inside")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(root / "sub")
    mark("sub ready")
    fsync_dir(root)
    mark("parent synced")
    """
    trace, points, _ = run(tmp_path, body, {"log": b""})
    lines = [f"line {i}\n".encode() for i in range(5)]
    for p in points:
        log = p.read("log")
        assert log is not None
        n = log.count(b"\n")
        assert log == b"".join(lines[:n])  # whole lines only, in order
        for i in range(5):
            if f"line {i}" in p.marks:  # the crash comes after line i was acknowledged
                assert n >= i + 1
    root_sync = event_index(trace, "fsync", ".")
    for p in points:
        assert p.exists("sub") == (p.index >= root_sync), p
    assert not any(p.exists("sub") for p in points if p.after("sub ready") and not p.after("parent synced"))
    assert points[-1].read("sub/f") == b"inside"
    assert points[-1].read("log") == b"".join(lines)


def test_threads_children_and_inherited_descriptors(strace: str, tmp_path: Path) -> None:
    body = """
    import subprocess, threading
    fd = os.open(root / "data", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    fsync_dir(root)
    mark("created")
    # One write at a time: two appends racing in the kernel may be logged by strace in the other
    # order, and the replay follows the log.
    lock = threading.Lock()
    def work(k):
        for j in range(3):
            with lock:
                os.write(fd, f"thread {k} {j}\\n".encode())
    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pid = os.fork()
    if pid == 0:
        os.write(fd, b"forked child\\n")
        os._exit(0)
    os.waitpid(pid, 0)
    os.set_inheritable(fd, True)
    subprocess.run(["sh", "-c", f"echo exec child >&{fd}"], check=True, pass_fds=(fd,))
    dup = os.dup(fd)
    os.fsync(dup)
    mark("synced")
    """
    trace, points, root = run(tmp_path, body)
    assert not trace.warnings  # every descriptor was known: none adopted from strace's path
    real = (root / "data").read_bytes()
    expected = {f"thread {k} {j}".encode() for k in range(3) for j in range(3)} | {b"forked child", b"exec child"}
    assert set(real.splitlines()) == expected
    writers = {e.pid for e in trace.events if e.op == "write" and e.path == "data"}
    assert len(writers) == 5  # three threads, the forked child and the exec'd shell
    assert points[-1].read("data") == real
    for p in points:
        assert p.read("data") in (None, b"", real)
        if p.after("synced"):
            assert p.read("data") == real


def test_a_write_split_by_another_thread(strace: str, tmp_path: Path) -> None:
    """Two threads writing 1 MB blocks at once: strace prints some writes as <unfinished ...> and
    <... resumed>, which must come back together as one write."""
    body = """
    import threading
    fd = os.open(root / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    fsync_dir(root)
    def work(k):
        for j in range(4):
            os.pwrite(fd, bytes([65 + k]) * (1 << 20), (2 * j + k) << 20)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.fsync(fd)
    """
    for attempt in range(5):  # the interleaving is the scheduler's: a few tries
        (tmp_path / str(attempt)).mkdir()
        trace, points, root = run(tmp_path / str(attempt), body)
        if trace.resumed.get("pwrite64"):
            break
    assert trace.resumed.get("pwrite64"), f"no write was split in 5 runs: {trace.resumed}"
    expected = b"".join(bytes([65 + (i % 2)]) * (1 << 20) for i in range(8))
    assert (root / "big").read_bytes() == expected
    assert points[-1].read("big") == expected


def test_marks_fall_between_the_calls_around_them(strace: str, tmp_path: Path) -> None:
    body = """
    fd = os.open(root / "f", os.O_WRONLY)
    os.write(fd, b"v2")
    mark("written")
    os.fsync(fd)
    mark("synced")
    print("not a mark", flush=True)
    print("MARK split ", end="", flush=True)
    print("line", flush=True)
    print("MARK on stderr", file=sys.stderr, flush=True)
    os.write(fd, b"v3")
    os.fsync(fd)
    """
    trace, points, _ = run(tmp_path, body, {"f": b"v1"})
    assert [m.text for m in trace.marks] == ["written", "synced", "split line"]
    write1, write2 = (e.index for e in trace.events if e.op == "write")
    sync1, sync2 = (e.index for e in trace.events if e.op == "fsync")
    assert write1 < trace.mark_index("written") < sync1 < trace.mark_index("synced") < write2 < sync2
    assert [(p.read("f"), p.marks, p.marks_during) for p in points] == [
        (b"v1", (), ("written",)),
        (b"v2", ("written",), ("synced", "split line")),
        (b"v2v3", ("written", "synced", "split line"), ()),
    ]
    assert [(p.index, p.end) for p in points] == [(-1, sync1), (sync1, sync2), (sync2, len(trace.events))]
    assert not points[0].after("synced") and points[1].after("synced")


def test_what_makes_bytes_durable(strace: str, tmp_path: Path) -> None:
    """O_SYNC, RWF_DSYNC, fdatasync and syncfs do; sync_file_range does not."""
    body = """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def put(name, data, flags=0):
        fd = os.open(root / name, os.O_WRONLY | os.O_TRUNC | flags)
        os.write(fd, data)
        return fd
    put("osync", b"osync", os.O_SYNC)
    put("odsync", b"odsync", os.O_DSYNC)
    fd = os.open(root / "rwf", os.O_WRONLY)
    os.pwritev(fd, [b"rwf"], 0, os.RWF_DSYNC)
    os.fdatasync(put("datasync", b"datasync"))
    fd = put("range", b"range")
    assert libc.sync_file_range(fd, 0, 0, 7) == 0  # wait before, write, wait after: still no promise
    fd = put("plain", b"plain")
    mark("before syncfs")
    assert libc.syncfs(fd) == 0
    """
    names = ["osync", "odsync", "rwf", "datasync", "range", "plain"]
    trace, points, _ = run(tmp_path, body, {n: b"x" for n in names})
    syncfs = next(e.index for e in trace.events if e.call == "syncfs")
    last_before = next(p for p in points if p.end == syncfs)
    assert {n: last_before.read(n) for n in names} == {
        "osync": b"osync", "odsync": b"odsync", "rwf": b"rwf", "datasync": b"datasync", "range": b"x", "plain": b"x",
    }  # fmt: skip
    assert points[-1].read("range") == b"range" and points[-1].read("plain") == b"plain"


# Everything the model follows, in one program; after sync() the final state must be the folder itself.
EVERYTHING = r"""
import ctypes, fcntl, shutil, subprocess, threading
src = Path(sys.argv[2])
os.chdir(root)
fd = os.open("x", os.O_CREAT | os.O_RDWR | os.O_APPEND, 0o644)
os.writev(fd, [b"ab", b"cd"])
os.pwrite(fd, b"zz", 1)  # appends: O_APPEND wins on Linux
os.lseek(fd, 0, os.SEEK_SET)
os.read(fd, 3)
os.dup2(fd, 9)
fcntl.fcntl(fd, fcntl.F_SETFL, 0)  # no longer appending: writes at the position the read left
os.write(9, b"Q")
shutil.copyfile(src, "copy")  # sendfile from outside root
s = os.open(src, os.O_RDONLY)
d = os.open("z", os.O_CREAT | os.O_WRONLY)
os.copy_file_range(s, d, 5)
os.copy_file_range(s, d, 5, 2, 3)
os.sendfile(d, s, 1, 4)
os.read(s, 2)
os.sendfile(d, s, None, 3)
os.ftruncate(d, 12)
os.truncate("z", 11)
os.posix_fallocate(d, 0, 20)
inside = os.open("copy", os.O_RDONLY)
os.copy_file_range(inside, d, 4, 3)  # from a file under root: the model's bytes
os.rename("z", "w")
os.link("w", "v")
os.symlink("w", "u")
os.unlink("v")
os.mkdir("gone")
os.rmdir("gone")
t = os.open(".", os.O_TMPFILE | os.O_WRONLY)
os.write(t, b"anonymous")
libc = ctypes.CDLL(None, use_errno=True)
assert libc.linkat(-100, f"/proc/self/fd/{t}".encode(), -100, b"named", 0x400) == 0  # AT_SYMLINK_FOLLOW
th = threading.Thread(target=lambda: os.write(fd, b"thread"))
th.start()
th.join()
os.set_inheritable(fd, True)
subprocess.run(["sh", "-c", f"printf shell >&{fd}"], check=True, pass_fds=(fd,))
# every descriptor kept but the close-on-exec ones, whose numbers the shell's own opens then take
subprocess.run(["sh", "-c", "cat /dev/null"], check=True, close_fds=False)
pid = os.fork()
if pid == 0:
    os.write(fd, b"child")
    os._exit(0)
os.waitpid(pid, 0)
os.mkdir("e")
dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
os.rename("e", "f", src_dir_fd=dfd, dst_dir_fd=dfd)
os.chdir("f")
Path("inner").write_text("inner")
os.chdir("..")
os.unlink("f/../u")
os.replace("w", "replaced")
with open("log", "a") as f:
    f.write("more\n")
odd = os.fsencode("odd name, with \"quotes\" <angles> (parens) [brackets]\n\t") + b"\xff"
with open(odd, "wb") as f:
    f.write(b"odd")
os.makedirs("deep/er/still")
Path("deep/er/still/leaf").write_bytes(bytes(range(256)) * 10)
shutil.rmtree("deep/er")
os.sync()
"""


def test_after_sync_the_final_state_is_the_folder(strace: str, tmp_path: Path) -> None:
    src = tmp_path / "outside.bin"
    src.write_bytes(b"0123456789" * 3)
    root = tmp_path / "root"
    root.mkdir()
    (root / "log").write_text("kept\n")
    (root / "replaced").write_text("old")
    before = tmp_path / "before"
    shutil.copytree(root, before)
    prog = tmp_path / "prog.py"
    prog.write_text(PRELUDE + EVERYTHING)
    trace = record([sys.executable, str(prog), str(root), str(src)], root)
    assert not trace.warnings
    points = list(crash_states(trace, before))
    assert len(points) == 2  # nothing durable until the sync
    assert sorted(points[0].paths()) == ["log", "replaced"]
    state = points[-1].materialise(tmp_path / "state")
    diff = subprocess.run(["diff", "-r", "--no-dereference", str(root), str(state)], capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    # the read moved the shared position to 3, where the write through the dup landed
    assert (state / "x").read_bytes() == b"abcQzz"[:3] + b"Q" + b"threadshellchild"


def test_a_failing_program_is_reported(strace: str, tmp_path: Path) -> None:
    prog = tmp_path / "fail.py"
    prog.write_text("import sys\nprint('something broke', file=sys.stderr)\nsys.exit(3)\n")
    with pytest.raises(TracedProgramError, match=r"exited with 3(.|\n)*something broke") as e:
        record([sys.executable, str(prog)], tmp_path)
    assert e.value.trace.returncode == 3
    trace = record([sys.executable, str(prog)], tmp_path, check=False)
    assert trace.returncode == 3 and b"something broke" in trace.stderr


def test_materialise(strace: str, tmp_path: Path) -> None:
    body = 'os.write(os.open(root / "a", os.O_WRONLY | os.O_APPEND), b"+")\nos.sync()\n'
    _, points, _ = run(tmp_path, body, {"a": b"a", "d/b": b"b", "d/e/c": b"c"})
    first, last = points[0].materialise(tmp_path / "s0"), points[-1].materialise(tmp_path / "s1", link_unchanged=True)
    assert {str(p.relative_to(first)) for p in first.rglob("*")} == {"a", "d", "d/b", "d/e", "d/e/c"}
    assert (first / "a").read_bytes() == b"a" and (last / "a").read_bytes() == b"a+"
    assert (last / "d/e/c").stat().st_ino == (tmp_path / "before/d/e/c").stat().st_ino  # linked, not copied
    assert (first / "d/e/c").stat().st_ino != (tmp_path / "before/d/e/c").stat().st_ino
    with pytest.raises(FileExistsError):
        points[0].materialise(tmp_path / "s0")


def _hex(s: str | bytes) -> str:
    b = s.encode() if isinstance(s, str) else s
    return "".join(f"\\x{c:02x}" for c in b)


def test_parser_joins_split_calls_and_follows_early_children(tmp_path: Path) -> None:
    """strace's own text, written out: a write split by another process's line, a child whose first
    call is printed before its parent's clone returns, a deleted file's annotation, odd names."""
    root = tmp_path / "r"
    name = 'a "b", <c>\n' + "\udcff"  # a byte that is not UTF-8
    path = f"{root}/{name}"
    mark = _hex("MARK x\n")
    lines = [
        f'100  openat(AT_FDCWD<{_hex(str(tmp_path))}>, "{_hex(os.fsencode(path))}", O_WRONLY|O_CREAT, 0644) '
        f"= 3<{_hex(os.fsencode(path))}>",
        "100  clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|SIGCHLD <unfinished ...>",
        f"101  lseek(3<{_hex(os.fsencode(path))}>, 0, SEEK_END) = 0",
        "100  <... clone resumed>, child_tidptr=0x7f) = 101",
        f'100  write(3<{_hex(os.fsencode(path))}>, "{_hex("hello ")}", 6 <unfinished ...>',
        f'101  write(3<{_hex(os.fsencode(path))}>(deleted), "{_hex("child")}", 5) = 5',
        "100  <... write resumed>) = 6",
        "101  +++ exited with 0 +++",
        f'100  write(1<{_hex(str(tmp_path / "out"))}>, "{mark}", 7) = 7',
        f"100  fsync(3<{_hex(os.fsencode(path))}>) = -1 EIO (Input/output error)",
        f"100  fdatasync(3<{_hex(os.fsencode(path))}>) = 0",
    ]
    trace = parse_strace((line + "\n" for line in lines), root, cwd=tmp_path, stdout=tmp_path / "out")
    assert trace.resumed == {"write": 1, "clone": 1}
    assert not trace.warnings
    got = [(e.pid, e.op, e.path, e.data, e.text) for e in trace.events]
    assert got == [
        (100, "open", name, None, None),
        (101, "seek", name, None, None),
        (101, "write", name, b"child", None),  # the child's copy of descriptor 3
        (100, "write", name, b"hello ", None),
        (100, "mark", None, None, "x"),
        (100, "fsync", name, None, None),  # the failed fsync has no effect
    ]
    root.mkdir()
    points = list(crash_states(trace, root))
    assert points[-1].paths() == []  # the file's bytes are durable, its name is not
