"""Crash states of a real program: record its file-system calls with strace, replay them on a model
that keeps what the running program sees apart from what a power cut would leave, and materialise
every state a crash could leave behind (the approach of ALICE and CrashMonkey).

A kill -9 test cannot show a missing fsync: the page cache outlives the process. Here the program
runs once under `strace -f`; `record` turns the calls that touch files under `root` into events,
and `crash_states` replays them on an inode model started from a copy of `root` taken before the
run, yielding each distinct durable state.

The model is the strict one, what POSIX promises and nothing more:
- a file's bytes become durable only by fsync/fdatasync of a descriptor on it, by a write through a
  descriptor opened with O_SYNC/O_DSYNC (or pwritev2 with RWF_SYNC/RWF_DSYNC), or by sync()/syncfs();
  sync_file_range promises nothing and is not even traced;
- a directory entry (a create, mkdir, rename in or out, unlink, rmdir, link, symlink) becomes durable
  only by an fsync of that directory. A rename shows in the target folder once the target is synced
  and leaves the source once the source is synced, so a state may show both names (real journaling
  file systems never do; the model is allowed to be stricter than they are);
- a file whose entry is durable but whose bytes never were is there with its durable bytes (empty
  for a new file): what ext4 with delalloc leaves after a rename without fsync.

Deliberately not modelled: writes through mmap (a memory store is no system call; msync is ignored),
splice/vmsplice/tee, io_uring and AIO, O_DIRECT (treated as an ordinary write: it still needs an fsync
for the metadata and the device cache), file modes, owners and times, hard links across the durable
tree (each name is materialised as its own file), special files (fifos, devices), other file systems
mounted below `root`. Each state is the least a crash can leave, what was promised: states in which
writeback happened to flush more (some of the unsynced writes or renames, a torn write) are not
generated, where ALICE would explore those subsets too.
Paths are normalised lexically (`a/../b` is `b`); symlinks inside `root` are followed by the model.
A program that renames a file into `root` from outside gets an empty file there (its bytes are not
known) and a warning in `Trace.warnings`.

Usage:

    before = tmp / "before"
    shutil.copytree(root, before)  # everything in it counts as durable at the start
    trace = record([sys.executable, "op.py", str(root)], root)  # op.py prints "MARK ack 7" when acked
    for point in crash_states(trace, before):
        state = point.materialise(tmp / f"crash{point.ordinal}")
        check_recovers(state, acked=point.after("ack 7"))
"""

from __future__ import annotations

import binascii
import os
import posixpath
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CrashPoint",
    "Event",
    "ModelError",
    "StraceMissing",
    "Trace",
    "TracedProgramError",
    "crash_states",
    "parse_strace",
    "record",
]

# The calls the model follows. `?` keeps strace quiet on architectures without the legacy ones (open,
# creat, rename, ... do not exist on arm64).
CALLS = (
    "open", "openat", "openat2", "creat", "close", "close_range", "dup", "dup2", "dup3", "fcntl", "ioctl",
    "lseek", "read", "readv", "write", "pwrite64", "writev", "pwritev", "pwritev2", "ftruncate", "truncate",
    "fallocate", "sendfile", "copy_file_range", "fsync", "fdatasync", "sync", "syncfs", "mkdir", "mkdirat",
    "rename", "renameat", "renameat2", "unlink", "unlinkat", "rmdir", "link", "linkat", "symlink",
    "symlinkat", "chdir", "fchdir", "clone", "clone3", "fork", "vfork", "execve", "execveat",
)  # fmt: skip

AT_FDCWD = -100


class StraceMissing(FileNotFoundError):
    """strace is not installed."""


class TracedProgramError(RuntimeError):
    """The recorded program exited with a non-zero status (the trace is attached)."""

    def __init__(self, trace: Trace) -> None:
        tail = trace.stderr.decode(errors="replace")[-4000:]
        super().__init__(f"{trace.argv} exited with {trace.returncode} under strace; its stderr ends:\n{tail}")
        self.trace = trace


class ModelError(RuntimeError):
    """The replay disagrees with what the program saw (a call succeeded that the model cannot do):
    the snapshot is not the folder the program started from, or the model lacks a call."""


@dataclass(frozen=True, slots=True)
class Event:
    """One effect on the files under root (or a mark), in the order strace reported it.

    `ofd` names an open file description: the thing descriptors share after dup and fork, with its
    own position. Paths are relative to root ("." is root itself); None is a path outside root."""

    index: int
    pid: int
    call: str  # the system call, or "mark"
    # open write seek advance truncate fallocate copy setfl fsync sync mkdir rename unlink rmdir link symlink mark
    op: str
    path: str | None = None
    path2: str | None = None
    ofd: int | None = None
    ofd2: int | None = None  # the source of a copy
    offset: int | None = None  # a write's explicit offset (None: the description's position); a seek's target
    offset2: int | None = None  # a copy's source offset (None: the source's position, which advances)
    size: int | None = None
    data: bytes | None = None
    flags: frozenset[str] = frozenset()
    text: str | None = None  # a mark's text, a symlink's target

    def __str__(self) -> str:
        parts = [f"#{self.index} pid {self.pid} {self.call}->{self.op}"]
        for name in ("path", "path2", "ofd", "ofd2", "offset", "offset2", "size", "text"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value!r}")
        if self.data is not None:
            parts.append(f"data={self.data[:40]!r}{'...' if len(self.data) > 40 else ''} ({len(self.data)} B)")
        if self.flags:
            parts.append("flags=" + "|".join(sorted(self.flags)))
        return " ".join(parts)


@dataclass
class Trace:
    """What `record` saw: the events in strace's order, the program's exit status and output, and
    warnings about what the model had to guess (check they are empty)."""

    argv: list[str]
    root: Path
    events: list[Event]
    warnings: list[str] = field(default_factory=list)
    returncode: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    lines: int = 0  # strace lines read
    # calls strace printed split over an <unfinished ...> and a <... resumed> line, by name
    resumed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # running the program under strace
    parse_seconds: float = 0.0

    @property
    def marks(self) -> list[Event]:
        return [e for e in self.events if e.op == "mark"]

    def mark_index(self, text: str) -> int:
        """The event index of the first mark with this text."""
        for e in self.events:
            if e.op == "mark" and e.text == text:
                return e.index
        raise KeyError(f"no mark {text!r} in the trace (marks: {[e.text for e in self.marks]})")


# --- running strace -----------------------------------------------------------------------------------


def record(
    argv: list[str],
    root: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 300,
    *,
    check: bool = True,
    max_write: int = 1 << 28,
) -> Trace:
    """Run `argv` under `strace -f` and return the events on files under `root`, with the marks: a
    line the program writes to its stdout starting with `MARK ` (Python: print(..., flush=True);
    PYTHONUNBUFFERED=1 is set unless `env` says otherwise). A non-zero exit raises TracedProgramError
    unless `check` is false. A single write larger than `max_write` bytes is refused (strace would cut
    it short)."""
    strace = shutil.which("strace")
    if strace is None:
        raise StraceMissing("strace is not installed (Debian: apt-get install strace)")
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(root)
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    start_cwd = Path(os.path.realpath(cwd if cwd is not None else os.getcwd()))
    with tempfile.TemporaryDirectory(prefix="crashfs-") as tmp:
        log, out, err = Path(tmp, "trace"), Path(os.path.realpath(tmp)) / "stdout", Path(tmp, "stderr")
        # -q, not -qq: the "+++ exited" lines say which calls will never be resumed. read and readv
        # raw: only how far they moved the position matters, not the bytes, which would fill the log.
        cmd = [
            strace, "-f", "-q", "-y", "-xx", "-s", str(max_write), "-e", "signal=none", "-e", "raw=read,readv",
            "-e", "trace=" + ",".join("?" + c for c in CALLS), "--seccomp-bpf", "-o", str(log), "--", *argv,
        ]  # fmt: skip
        t0 = time.monotonic()
        with open(out, "wb") as fo, open(err, "wb") as fe:
            # A session of its own: on a timeout the whole group (strace and every tracee) is killed,
            # as a killed strace would let its tracees run on detached.
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, cwd=start_cwd, env=env, start_new_session=True
            )
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        seconds = time.monotonic() - t0
        with open(log, encoding="latin-1") as f:
            trace = parse_strace(f, root, cwd=start_cwd, stdout=out)
        trace.argv, trace.returncode, trace.seconds = list(argv), rc, seconds
        trace.stdout, trace.stderr = out.read_bytes(), err.read_bytes()
    if check and rc != 0:
        raise TracedProgramError(trace)
    return trace


# --- reading strace's lines --------------------------------------------------------------------------

# With -xx every string and every -y path is \xNN escapes, so no quote, comma, bracket or angle bracket
# of the program's data can appear outside a token.
_TOKEN = re.compile(r'"[^"]*"(?:\.\.\.)?|<[^>]*>|[\[\]{}(),]|[^"<\[\]{}(),]+')
_FDARG = re.compile(r"(AT_FDCWD|-?\d+|0x[0-9a-f]+)(?:<([^>]*)>)?(\(deleted\))?")
_PID = re.compile(r"(\d+)\s+")
_FLAGS = re.compile(r"flags=([\w|]+)")
_IOV = re.compile(r'iov_base=("[^"]*"(?:\.\.\.)?)')
_PROC_FD = re.compile(r"/proc/(self|thread-self|\d+)(?:/task/\d+)?/fd/(\d+)")


def _unescape(s: str) -> bytes:
    """The bytes of an escaped string body (strace -xx prints every byte as \\xNN)."""
    raw = s.encode("latin-1")
    if b"\\" not in raw:
        return raw
    digits = raw.translate(None, b"\\x")  # bytes.translate runs in C: str.replace was the parse's main cost
    if len(digits) * 2 == len(raw):
        return binascii.unhexlify(digits)
    return raw.decode("unicode_escape").encode("latin-1")


def _string(arg: str) -> bytes:
    if arg.endswith("..."):
        raise ValueError("strace cut a string short: raise record(max_write=...)")
    if not (arg.startswith('"') and arg.endswith('"')):
        raise ValueError(f"not a string argument: {arg[:80]!r}")
    return _unescape(arg[1:-1])


def _split(args: str) -> list[str]:
    """Top-level arguments of a call."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for m in _TOKEN.finditer(args):
        t = m.group()
        if len(t) == 1 and t in "[{(":
            depth += 1
        elif len(t) == 1 and t in "]})":
            depth -= 1
        elif t == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(t)
    if cur or out:
        out.append("".join(cur).strip())
    return out


def _num(s: str) -> int:
    s = s.strip()
    neg = s.startswith("-")
    body = s[1:] if neg else s
    v = int(body, 16) if body.startswith("0x") else int(body)
    return -v if neg else v


@dataclass(slots=True)
class _Fd:
    """A descriptor argument or return value: its number and the path strace printed for it."""

    num: int
    path: str | None
    deleted: bool


def _fd(arg: str) -> _Fd:
    m = _FDARG.match(arg.strip())
    if m is None:
        raise ValueError(f"not a descriptor: {arg[:80]!r}")
    num = AT_FDCWD if m.group(1) == "AT_FDCWD" else _num(m.group(1))
    path = os.fsdecode(_unescape(m.group(2))) if m.group(2) is not None else None
    return _Fd(num, path, m.group(3) is not None)


def _flagset(s: str) -> set[str]:
    return set(s.strip().split("|"))


# --- following processes and descriptors ------------------------------------------------------------


@dataclass(eq=False)
class _Ofd:
    """An open file description: shared by dup, fork and threads; holds the position."""

    id: int
    path: str | None  # absolute path when opened
    rel: str | None  # path under root when opened; None outside root
    pos: int = 0  # followed here for files outside root (copy sources); the model follows root's own


@dataclass(eq=False)
class _Fs:
    cwd: str


@dataclass(eq=False)
class _Proc:
    fds: dict[int, tuple[_Ofd, bool]]  # descriptor -> (description, close-on-exec); shared by threads
    fs: _Fs  # shared with CLONE_FS


_CLONES = ("clone", "clone3", "fork", "vfork")
# Calls a thread may be left inside when its process exits, without a change to any file.
_HARMLESS = ("read", "readv", "lseek", "ioctl", "fcntl", "close", "execve", "execveat", *_CLONES)


class _Parser:
    def __init__(self, root: Path, cwd: Path, stdout: Path | None) -> None:
        real = os.path.realpath(root)
        given = posixpath.normpath(os.path.abspath(root))
        if real == "/":
            raise ValueError("root cannot be /")
        self.roots = [real] if given == real else [real, given]
        self.cwd = str(cwd)
        self.stdout = str(stdout) if stdout is not None else None
        self.events: list[Event] = []
        self.warnings: list[str] = []
        self.procs: dict[int, _Proc] = {}
        self.pending: list[list] = []  # clones under way: [parent pid, flags, child pid or None]
        self.unfinished: dict[int, tuple[str, str]] = {}
        self.next_ofd = 0
        self.outbuf = bytearray()  # the program's stdout, for its MARK lines
        self.lines = 0
        self.resumed: dict[str, int] = {}
        self.line_no = 0

    # paths

    def rel(self, path: str | None) -> str | None:
        if path is None:
            return None
        for r in self.roots:
            if path == r:
                return "."
            if path.startswith(r) and path[len(r)] == "/":
                return path[len(r) + 1 :]
        return None

    def abspath(self, proc: _Proc, dirfd: str | None, arg: str) -> str | None:
        """The absolute path a call names (None when it cannot be told: a deleted directory)."""
        p = os.fsdecode(_string(arg))
        if not p.startswith("/"):
            if dirfd is None:
                base = proc.fs.cwd
            else:
                d = _fd(dirfd)
                if d.num == AT_FDCWD:
                    if d.path is not None:
                        proc.fs.cwd = d.path  # -y prints the cwd: better than following chdir
                    base = proc.fs.cwd
                elif d.deleted:
                    return None
                elif d.path is not None:
                    base = d.path
                elif d.num in proc.fds and proc.fds[d.num][0].path is not None:
                    base = proc.fds[d.num][0].path
                else:
                    return None
            p = posixpath.join(base, p) if p else base
        p = posixpath.normpath(p)
        return "/" + p.lstrip("/") if p.startswith("//") else p

    # processes

    def proc(self, pid: int) -> _Proc:
        p = self.procs.get(pid)
        if p is not None:
            return p
        if not self.procs:
            p = _Proc({}, _Fs(self.cwd))
        else:
            # A child can speak before its parent's clone returns: it is the oldest clone under way.
            entry = next((e for e in self.pending if e[2] is None and e[0] in self.procs), None)
            if entry is None:
                self.warn(f"pid {pid} appeared without a clone: its descriptors are not known")
                p = _Proc({}, _Fs(self.cwd))
            else:
                entry[2] = pid
                p = self.child(self.procs[entry[0]], entry[1])
        self.procs[pid] = p
        return p

    @staticmethod
    def child(parent: _Proc, flags: str) -> _Proc:
        fl = _flagset(flags) if flags else set()
        fds = parent.fds if "CLONE_FILES" in fl else dict(parent.fds)
        fs = parent.fs if "CLONE_FS" in fl else _Fs(parent.fs.cwd)
        return _Proc(fds, fs)

    def warn(self, text: str) -> None:
        self.warnings.append(f"strace line {self.line_no}: {text}")

    def emit(self, pid: int, call: str, op: str, **kw: object) -> None:
        self.events.append(Event(len(self.events), pid, call, op, **kw))  # type: ignore[arg-type]

    def new_ofd(self, path: str | None, rel: str | None) -> _Ofd:
        self.next_ofd += 1
        return _Ofd(self.next_ofd, path, rel)

    def lookup(self, pid: int, proc: _Proc, arg: str) -> tuple[_Fd, _Ofd | None]:
        """A descriptor argument and its description; one under root that was opened before the
        trace began (not in the table) is adopted, its position unknown."""
        d = _fd(arg)
        entry = proc.fds.get(d.num)
        if entry is not None:
            return d, entry[0]
        rel = None if d.deleted else self.rel(d.path)
        if rel is None:
            return d, None
        ofd = self.new_ofd(d.path, rel)
        proc.fds[d.num] = (ofd, False)
        self.warn(f"descriptor {d.num} on {rel} was opened before the trace: its position is taken as 0")
        self.emit(pid, "?", "open", path=rel, ofd=ofd.id)
        return d, ofd

    # lines

    def feed(self, line: str) -> None:
        self.line_no += 1
        m = _PID.match(line)
        if m is None:
            return
        self.lines += 1
        pid = int(m.group(1))
        rest = line[m.end() :].rstrip("\n")
        if rest.startswith("+++"):  # exited or killed
            name = self.unfinished.pop(pid, ("",))[0]
            if name and name not in _HARMLESS:
                self.warn(f"pid {pid} ended inside {name}: its effect is not modelled")
            self.procs.pop(pid, None)
            return
        if rest.startswith("---"):
            return
        if rest.startswith("<... "):
            end = rest.index(" resumed>")
            name = rest[5:end]
            entry = self.unfinished.pop(pid, None)
            if entry is None or entry[0] != name:
                self.warn(f"a resumed {name} that never started")
                return
            self.resumed[name] = self.resumed.get(name, 0) + 1
            text = entry[1] + rest[end + len(" resumed>") :]
        else:
            i = rest.find("(")
            if i <= 0:
                return
            name = rest[:i]
            if rest.endswith("<unfinished ...>"):
                body = rest[i + 1 : -len("<unfinished ...>")].rstrip()
                if pid in self.unfinished:
                    self.warn(f"pid {pid} started {name} inside {self.unfinished[pid][0]}")
                self.unfinished[pid] = (name, body)
                if name in _CLONES:
                    m2 = _FLAGS.search(body)
                    self.pending.append([pid, m2.group(1) if m2 else "", None])
                return
            text = rest[i + 1 :]
        k = text.rfind(" = ")
        if k < 0:
            return
        args_text = text[:k].rstrip()
        if not args_text.endswith(")"):
            self.warn(f"cannot read {name}: {text[:200]!r}")
            return
        ret = text[k + 3 :].strip().split(" ", 1)[0]
        handler = getattr(self, "on_" + name, None)
        if name in _CLONES:
            self.on_clone(pid, name, args_text[:-1], ret)
            return
        if ret == "?" or ret.startswith("-1"):
            if name == "close" and "EBADF" not in text[k:]:
                ret = "0"  # Linux frees the descriptor even when close reports EINTR or EIO
            else:
                return  # failed or unknown: no effect
        if handler is not None:
            proc = self.proc(pid)
            handler(pid, proc, _split(args_text[:-1]), ret)

    def finish(self) -> None:
        if self.outbuf.startswith(b"MARK "):
            self.emit(0, "write", "mark", text=self.outbuf[5:].decode(errors="replace").strip())
        for pid, (name, _) in self.unfinished.items():
            if name not in _HARMLESS:
                self.warn(f"pid {pid} never finished {name}")

    # processes

    def on_clone(self, pid: int, name: str, args: str, ret: str) -> None:
        entry = next((e for e in self.pending if e[0] == pid), None)
        if entry is not None:
            self.pending.remove(entry)
        if ret == "?" or ret.startswith("-1"):
            return
        child = _num(ret.split("<", 1)[0])
        if entry is not None and entry[2] is not None and entry[2] != child:
            self.warn(f"pid {entry[2]} was taken for the child of {pid}, which is {child}")
        if child not in self.procs:
            m = _FLAGS.search(args)
            self.procs[child] = self.child(self.proc(pid), m.group(1) if m else "")

    def on_execve(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        # exec gives the process a table of its own without the close-on-exec descriptors
        proc.fds = {fd: (o, False) for fd, (o, cloexec) in proc.fds.items() if not cloexec}
        proc.fs = _Fs(proc.fs.cwd)

    on_execveat = on_execve

    def on_chdir(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        path = self.abspath(proc, None, args[0])
        if path is not None:
            proc.fs.cwd = path

    def on_fchdir(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        d = _fd(args[0])
        if d.path is not None:
            proc.fs.cwd = d.path

    # descriptors

    def opened(self, pid: int, proc: _Proc, call: str, path: str | None, flags: set[str], ret: str) -> None:
        r = _fd(ret)
        tmpfile = "O_TMPFILE" in flags
        # The returned descriptor's path is where the kernel ended up (symlinks resolved).
        where = path if (tmpfile or r.path is None or r.deleted) else r.path
        rel = self.rel(where)
        # an O_TMPFILE file is named after the inode in later events ("#1234"); its open names the folder
        ofd = self.new_ofd(where, self.rel(r.path) or rel if tmpfile else rel)
        old = proc.fds.get(r.num)
        if old is not None:
            self.warn(f"descriptor {r.num} reused without a close")
        proc.fds[r.num] = (ofd, "O_CLOEXEC" in flags)
        if rel is None:
            return
        names = {
            "O_CREAT": "creat", "O_EXCL": "excl", "O_TRUNC": "trunc", "O_APPEND": "append", "O_SYNC": "sync",
            "O_DSYNC": "sync", "O_DIRECTORY": "directory", "O_TMPFILE": "tmpfile", "O_NOFOLLOW": "nofollow",
        }  # fmt: skip
        self.emit(pid, call, "open", path=rel, ofd=ofd.id, flags=frozenset(names[f] for f in flags if f in names))

    def on_open(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        self.opened(pid, proc, "open", self.abspath(proc, None, args[0]), _flagset(args[1]), ret)

    def on_openat(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        self.opened(pid, proc, "openat", self.abspath(proc, args[0], args[1]), _flagset(args[2]), ret)

    def on_openat2(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        m = _FLAGS.search(args[2])
        flags = _flagset(m.group(1)) if m else set()
        self.opened(pid, proc, "openat2", self.abspath(proc, args[0], args[1]), flags, ret)

    def on_creat(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        flags = {"O_CREAT", "O_WRONLY", "O_TRUNC"}
        self.opened(pid, proc, "creat", self.abspath(proc, None, args[0]), flags, ret)

    def on_close(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        proc.fds.pop(_fd(args[0]).num, None)

    def on_close_range(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        first, last, flags = _num(args[0]), _num(args[1]), args[2]
        if "CLOSE_RANGE_UNSHARE" in flags:
            proc.fds = dict(proc.fds)
        for fd in [fd for fd in proc.fds if first <= fd <= last]:
            if "CLOSE_RANGE_CLOEXEC" in flags:
                proc.fds[fd] = (proc.fds[fd][0], True)
            else:
                del proc.fds[fd]

    def dup(self, proc: _Proc, old: str, ret: str, cloexec: bool) -> None:
        src = proc.fds.get(_fd(old).num)
        new = _fd(ret).num
        if src is None:
            proc.fds.pop(new, None)
        else:
            proc.fds[new] = (src[0], cloexec)

    def on_dup(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        self.dup(proc, args[0], ret, False)

    def on_dup2(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        if _fd(args[0]).num != _fd(ret).num:
            self.dup(proc, args[0], ret, False)

    def on_dup3(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        self.dup(proc, args[0], ret, "O_CLOEXEC" in args[2])

    def on_fcntl(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        cmd = args[1]
        if cmd in ("F_DUPFD", "F_DUPFD_CLOEXEC"):
            self.dup(proc, args[0], ret, cmd == "F_DUPFD_CLOEXEC")
            return
        fd = _fd(args[0]).num
        if cmd == "F_SETFD" and fd in proc.fds:
            proc.fds[fd] = (proc.fds[fd][0], "FD_CLOEXEC" in args[2])
        elif cmd == "F_SETFL":
            ofd = self.lookup(pid, proc, args[0])[1]
            if ofd is not None and ofd.rel is not None:
                append = frozenset({"append"} if "O_APPEND" in args[2] else ())
                self.emit(pid, "fcntl", "setfl", path=ofd.rel, ofd=ofd.id, flags=append)

    def on_ioctl(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        # os.set_inheritable uses these rather than fcntl
        if len(args) >= 2 and args[1] in ("FIOCLEX", "FIONCLEX"):
            fd = _fd(args[0]).num
            if fd in proc.fds:
                proc.fds[fd] = (proc.fds[fd][0], args[1] == "FIOCLEX")

    # positions

    def on_lseek(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        ofd = self.lookup(pid, proc, args[0])[1]
        if ofd is None:
            return
        pos = _num(ret)
        if ofd.rel is None:
            ofd.pos = pos
        else:
            self.emit(pid, "lseek", "seek", path=ofd.rel, ofd=ofd.id, offset=pos)

    def on_read(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        # traced raw (-e raw=read): what was read is not needed, only how far the position moved
        entry = proc.fds.get(_num(args[0]))
        n = _num(ret)
        if entry is None or n <= 0:
            return
        ofd = entry[0]
        if ofd.rel is None:
            ofd.pos += n
        else:
            self.emit(pid, "read", "advance", path=ofd.rel, ofd=ofd.id, size=n)

    on_readv = on_read

    # writes

    def wrote(
        self, pid: int, proc: _Proc, call: str, fdarg: str, data: bytes, offset: int | None, flags: frozenset[str]
    ) -> None:
        d, ofd = self.lookup(pid, proc, fdarg)
        if ofd is None or ofd.rel is None:
            if self.stdout is not None and (d.path == self.stdout or (ofd is not None and ofd.path == self.stdout)):
                self.mark(pid, call, data)
            if ofd is not None and offset is None:
                ofd.pos += len(data)
            return
        self.emit(pid, call, "write", path=ofd.rel, ofd=ofd.id, data=data, offset=offset, flags=flags)

    def mark(self, pid: int, call: str, data: bytes) -> None:
        self.outbuf += data
        while (nl := self.outbuf.find(b"\n")) >= 0:
            line = bytes(self.outbuf[:nl])
            del self.outbuf[: nl + 1]
            if line.startswith(b"MARK "):
                self.emit(pid, call, "mark", text=line[5:].decode(errors="replace").strip())

    def on_write(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        self.wrote(pid, proc, "write", args[0], _string(args[1])[: _num(ret)], None, frozenset())

    def on_pwrite64(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        self.wrote(pid, proc, "pwrite64", args[0], _string(args[1])[: _num(ret)], _num(args[3]), frozenset())

    @staticmethod
    def iov(arg: str, n: int) -> bytes:
        return b"".join(_string(m.group(1)) for m in _IOV.finditer(arg))[:n]

    def on_writev(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        self.wrote(pid, proc, "writev", args[0], self.iov(args[1], _num(ret)), None, frozenset())

    def on_pwritev(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        self.wrote(pid, proc, "pwritev", args[0], self.iov(args[1], _num(ret)), _num(args[3]), frozenset())

    def on_pwritev2(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        off = _num(args[3])
        rwf = args[4] if len(args) > 4 else ""
        flags = frozenset(
            ({"sync"} if ("RWF_SYNC" in rwf or "RWF_DSYNC" in rwf) else set())
            | ({"append"} if "RWF_APPEND" in rwf else set())
        )
        data = self.iov(args[1], _num(ret))
        self.wrote(pid, proc, "pwritev2", args[0], data, None if off == -1 else off, flags)

    def copied(
        self, pid: int, proc: _Proc, call: str, src: str, src_off: str, dst: str, dst_off: str | None, n: int
    ) -> None:
        sd, s = self.lookup(pid, proc, src)
        d = self.lookup(pid, proc, dst)[1]
        soff = None if src_off == "NULL" else _num(src_off.strip("[").split("]", 1)[0])
        doff = None if dst_off is None or dst_off == "NULL" else _num(dst_off.strip("[").split("]", 1)[0])
        if d is not None and d.rel is not None:
            if s is not None and s.rel is not None:
                self.emit(
                    pid, call, "copy", path=d.rel, path2=s.rel, ofd=d.id, ofd2=s.id, offset=doff, offset2=soff, size=n
                )
                return
            at = soff if soff is not None else (s.pos if s is not None else 0)
            data = self.read_outside(s.path if s is not None else sd.path, at, n)
            self.emit(pid, call, "write", path=d.rel, ofd=d.id, data=data, offset=doff)
        elif s is not None and s.rel is not None and soff is None:
            self.emit(pid, call, "advance", path=s.rel, ofd=s.id, size=n)
        if s is not None and s.rel is None and soff is None:
            s.pos += n

    def read_outside(self, path: str | None, at: int, n: int) -> bytes:
        """Bytes copied from a file outside root: read from the file itself, which is taken not to have
        changed since."""
        try:
            with open(path or "", "rb") as f:
                f.seek(at)
                data = f.read(n)
        except OSError as e:
            self.warn(f"cannot read the copy source {path}: {e}; zeros instead")
            data = b""
        if len(data) < n:
            data += bytes(n - len(data))
        return data

    def on_sendfile(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        self.copied(pid, proc, "sendfile", args[1], args[2], args[0], None, _num(ret))

    def on_copy_file_range(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        self.copied(pid, proc, "copy_file_range", args[0], args[1], args[2], args[3], _num(ret))

    def on_ftruncate(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        ofd = self.lookup(pid, proc, args[0])[1]
        if ofd is not None and ofd.rel is not None:
            self.emit(pid, "ftruncate", "truncate", path=ofd.rel, ofd=ofd.id, size=_num(args[1]))

    def on_truncate(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        rel = self.rel(self.abspath(proc, None, args[0]))
        if rel is not None:
            self.emit(pid, "truncate", "truncate", path=rel, size=_num(args[1]))

    def on_fallocate(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        ofd = self.lookup(pid, proc, args[0])[1]
        if ofd is None or ofd.rel is None:
            return
        mode = {f.removeprefix("FALLOC_FL_").lower() for f in _flagset(args[1])} - {"0"}
        self.emit(
            pid, "fallocate", "fallocate", path=ofd.rel, ofd=ofd.id, offset=_num(args[2]), size=_num(args[3]),
            flags=frozenset(mode),
        )  # fmt: skip

    # durability

    def on_fsync(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        ofd = self.lookup(pid, proc, args[0])[1]
        if ofd is not None and ofd.rel is not None:
            self.emit(pid, "fsync", "fsync", path=ofd.rel, ofd=ofd.id)

    def on_fdatasync(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        ofd = self.lookup(pid, proc, args[0])[1]
        if ofd is not None and ofd.rel is not None:
            self.emit(pid, "fdatasync", "fsync", path=ofd.rel, ofd=ofd.id)

    def on_sync(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        self.emit(pid, "sync", "sync")

    def on_syncfs(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        d, ofd = self.lookup(pid, proc, args[0])
        same = ofd is not None and ofd.rel is not None
        if not same and d.path is not None:
            try:
                same = os.stat(d.path).st_dev == os.stat(self.roots[0]).st_dev
            except OSError:
                same = False  # cannot tell: the strict answer
        if same:
            self.emit(pid, "syncfs", "sync")

    # names

    def on_mkdir(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        rel = self.rel(self.abspath(proc, None, args[0]))
        if rel is not None:
            self.emit(pid, "mkdir", "mkdir", path=rel)

    def on_mkdirat(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        rel = self.rel(self.abspath(proc, args[0], args[1]))
        if rel is not None:
            self.emit(pid, "mkdirat", "mkdir", path=rel)

    def renamed(self, pid: int, call: str, old: str | None, new: str | None, flags: str = "") -> None:
        src, dst = self.rel(old), self.rel(new)
        if src is None and dst is None:
            return
        if src is None:
            self.warn(f"{old} was renamed into root as {dst}: its bytes are not known, modelled as empty")
        fl = frozenset(n for f, n in (("RENAME_EXCHANGE", "exchange"), ("RENAME_NOREPLACE", "noreplace")) if f in flags)
        self.emit(pid, call, "rename", path=src, path2=dst, flags=fl, text=old if src is None else None)

    def on_rename(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        self.renamed(pid, "rename", self.abspath(proc, None, args[0]), self.abspath(proc, None, args[1]))

    def on_renameat(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        old, new = self.abspath(proc, args[0], args[1]), self.abspath(proc, args[2], args[3])
        self.renamed(pid, "renameat", old, new)

    def on_renameat2(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        old, new = self.abspath(proc, args[0], args[1]), self.abspath(proc, args[2], args[3])
        self.renamed(pid, "renameat2", old, new, args[4])

    def removed(self, pid: int, call: str, path: str | None, op: str) -> None:
        rel = self.rel(path)
        if rel is not None:
            self.emit(pid, call, op, path=rel)

    def on_unlink(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        self.removed(pid, "unlink", self.abspath(proc, None, args[0]), "unlink")

    def on_rmdir(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        self.removed(pid, "rmdir", self.abspath(proc, None, args[0]), "rmdir")

    def on_unlinkat(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        op = "rmdir" if "AT_REMOVEDIR" in args[2] else "unlink"
        self.removed(pid, "unlinkat", self.abspath(proc, args[0], args[1]), op)

    def linked(
        self, pid: int, proc: _Proc, call: str, olddir: str | None, old: str, new: str | None, follow: bool, empty: bool
    ) -> None:
        dst = self.rel(new)
        src_ofd: _Ofd | None = None
        src_path = None
        if empty:  # AT_EMPTY_PATH: the descriptor itself
            src_ofd = self.lookup(pid, proc, olddir or "")[1]
        else:
            src_path = self.abspath(proc, olddir, old)
            m = _PROC_FD.fullmatch(src_path or "")
            if m is not None and follow:  # how O_TMPFILE files get a name without CAP_DAC_READ_SEARCH
                owner = proc if m.group(1) in ("self", "thread-self") else self.procs.get(int(m.group(1)))
                entry = owner.fds.get(int(m.group(2))) if owner is not None else None
                src_ofd = entry[0] if entry is not None else None
                src_path = None
        if dst is None:
            return
        if src_ofd is not None and src_ofd.rel is not None:
            self.emit(pid, call, "link", path=src_ofd.rel, path2=dst, ofd=src_ofd.id)
            return
        src = self.rel(src_path)
        if src is None:
            self.warn(f"{src_path or 'a file outside root'} was linked into root as {dst}: modelled as empty")
        self.emit(pid, call, "link", path=src, path2=dst, flags=frozenset({"follow"} if follow else ()))

    def on_link(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        self.linked(pid, proc, "link", None, args[0], self.abspath(proc, None, args[1]), False, False)

    def on_linkat(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        flags = args[4]
        empty = "AT_EMPTY_PATH" in flags and _string(args[1]) == b""
        new = self.abspath(proc, args[2], args[3])
        self.linked(pid, proc, "linkat", args[0], args[1], new, "AT_SYMLINK_FOLLOW" in flags, empty)

    def on_symlink(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        rel = self.rel(self.abspath(proc, None, args[1]))
        if rel is not None:
            self.emit(pid, "symlink", "symlink", path=rel, text=os.fsdecode(_string(args[0])))

    def on_symlinkat(self, pid: int, proc: _Proc, args: list[str], ret: str) -> None:
        rel = self.rel(self.abspath(proc, args[1], args[2]))
        if rel is not None:
            self.emit(pid, "symlinkat", "symlink", path=rel, text=os.fsdecode(_string(args[0])))


def parse_strace(lines: Iterable[str], root: Path, *, cwd: Path, stdout: Path | None = None) -> Trace:
    """Events from the output of `strace -f -y -xx -e raw=read,readv` (what `record` runs): the calls
    on files under `root`, relative paths taken from `cwd` where strace does not print it, and the
    MARK lines written to the file `stdout`."""
    t0 = time.monotonic()
    p = _Parser(root, cwd, stdout)
    for line in lines:
        try:
            p.feed(line)
        except (ValueError, IndexError) as e:
            raise ValueError(f"strace line {p.line_no}: {e}: {line[:300]!r}") from e
    p.finish()
    return Trace(
        argv=[], root=Path(root), events=p.events, warnings=p.warnings, lines=p.lines, resumed=p.resumed,
        parse_seconds=time.monotonic() - t0,
    )  # fmt: skip


# --- the model --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SnapChunk:
    """The whole of a file in the snapshot, not read into memory."""

    path: Path


_Chunks = tuple[bytes | _SnapChunk, ...]
_MERGE_AT = 64


class _File:
    __slots__ = ("data", "dirty_from", "durable", "durable_len", "snap", "snap_size")

    def __init__(self, snap: Path | None = None, size: int = 0) -> None:
        self.snap = snap
        self.snap_size = size
        self.data: bytearray | None = None if snap is not None else bytearray()  # None: as in the snapshot
        self.durable: _Chunks = (_SnapChunk(snap),) if snap is not None else ()
        self.durable_len = size
        self.dirty_from: int | None = None  # lowest offset changed since the last fsync

    def load(self) -> bytearray:
        if self.data is None:
            assert self.snap is not None
            self.data = bytearray(self.snap.read_bytes())
        return self.data

    def size(self) -> int:
        return self.snap_size if self.data is None else len(self.data)

    def touched(self, at: int) -> None:
        self.dirty_from = at if self.dirty_from is None else min(self.dirty_from, at)

    def write(self, at: int, b: bytes) -> None:
        data = self.load()
        if at > len(data):
            data.extend(bytes(at - len(data)))
        data[at : at + len(b)] = b
        self.touched(at)

    def truncate(self, n: int) -> None:
        if n == 0 and self.data is None:  # O_TRUNC of a snapshot file: no need to read it first
            self.data = bytearray()
            self.touched(0)
            return
        data = self.load()
        self.touched(min(n, len(data)))
        if n < len(data):
            del data[n:]
        else:
            data.extend(bytes(n - len(data)))

    def fsync(self) -> bool:
        if self.dirty_from is None:
            return False
        data = self.load()
        if self.durable and self.dirty_from >= self.durable_len and len(data) >= self.durable_len:
            # Only appended to since the last fsync: share the durable prefix instead of copying the
            # file at every fsync of a growing log.
            chunks = (*self.durable, bytes(memoryview(data)[self.durable_len :]))
            if len(chunks) > _MERGE_AT:
                head = chunks[:1] if isinstance(chunks[0], _SnapChunk) else ()
                chunks = (*head, b"".join(c for c in chunks[len(head) :] if isinstance(c, bytes)))
        else:
            chunks = (bytes(data),)
        self.durable, self.durable_len, self.dirty_from = chunks, len(data), None
        return True

    def volatile(self, at: int, n: int) -> bytes:
        if self.data is None:
            assert self.snap is not None
            with open(self.snap, "rb") as f:
                f.seek(at)
                return f.read(n)
        return bytes(self.data[at : at + n])


class _Dir:
    __slots__ = ("dentries", "entries")

    def __init__(self) -> None:
        self.entries: dict[str, _Node] = {}  # what the program sees
        self.dentries: dict[str, _Node] = {}  # what survives a crash

    def fsync(self) -> bool:
        if self.entries == self.dentries:  # values compare by identity
            return False
        self.dentries = dict(self.entries)
        return True


class _Link:
    __slots__ = ("target",)

    def __init__(self, target: str) -> None:
        self.target = target

    def fsync(self) -> bool:
        return False


_Node = _File | _Dir | _Link


@dataclass(slots=True)
class _Open:
    node: _Node
    pos: int
    append: bool
    sync: bool


# A frozen durable tree: relative path -> ("d",) | ("f", chunks, size) | ("l", target), parents first.
_Tree = dict[str, tuple]


class _Model:
    def __init__(self, snapshot: Path) -> None:
        self.root = _Dir()
        self.nodes: list[_Node] = [self.root]
        self.opens: dict[int, _Open] = {}
        self.load(self.root, Path(snapshot))
        self.root.dentries = dict(self.root.entries)

    def load(self, d: _Dir, path: Path) -> None:
        with os.scandir(path) as it:
            for e in it:
                node: _Node
                if e.is_symlink():
                    node = _Link(os.readlink(e.path))
                elif e.is_dir():
                    node = _Dir()
                    self.load(node, Path(e.path))
                    node.dentries = dict(node.entries)
                elif e.is_file():
                    node = _File(Path(e.path), e.stat().st_size)
                else:
                    continue
                d.entries[e.name] = node
                self.nodes.append(node)

    def new(self, node: _Node) -> _Node:
        self.nodes.append(node)
        return node

    # paths

    def walk(self, rel: str, follow: bool, ev: Event) -> tuple[_Dir | None, str, _Node | None]:
        """(parent folder, last name, node or None when absent) of a path under root."""
        for _ in range(40):
            if rel == ".":
                return None, ".", self.root
            parts = rel.split("/")
            d = self.root
            restart = None
            for i, name in enumerate(parts[:-1]):
                node = d.entries.get(name)
                if isinstance(node, _Link):
                    restart = self.through(node.target, "/".join(parts[:i]), "/".join(parts[i + 1 :]), ev)
                    break
                if not isinstance(node, _Dir):
                    raise ModelError(f"{ev}: {'/'.join(parts[: i + 1])} is missing or not a folder in the model")
                d = node
            if restart is None:
                last = d.entries.get(parts[-1])
                if follow and isinstance(last, _Link):
                    restart = self.through(last.target, "/".join(parts[:-1]), "", ev)
                else:
                    return d, parts[-1], last
            rel = restart
        raise ModelError(f"{ev}: too many symlinks")

    def through(self, target: str, base: str, rest: str, ev: Event) -> str:
        if target.startswith("/"):
            raise ModelError(f"{ev}: an absolute symlink ({target}) is not followed by the model")
        path = posixpath.normpath(posixpath.join(base, target, rest))
        if path == ".." or path.startswith("../"):
            raise ModelError(f"{ev}: a symlink leads out of root ({target})")
        return path

    def node(self, rel: str, follow: bool, ev: Event) -> _Node:
        node = self.walk(rel, follow, ev)[2]
        if node is None:
            raise ModelError(f"{ev}: {rel} does not exist in the model")
        return node

    def parent(self, rel: str, ev: Event) -> tuple[_Dir, str]:
        d, name, _ = self.walk(rel, False, ev)
        if d is None:
            raise ModelError(f"{ev}: cannot change root itself")
        return d, name

    def opened(self, ev: Event) -> _Open:
        o = self.opens.get(ev.ofd) if ev.ofd is not None else None
        if o is None:
            raise ModelError(f"{ev}: no such open file in the model")
        return o

    def file(self, o: _Open, ev: Event) -> _File:
        if not isinstance(o.node, _File):
            raise ModelError(f"{ev}: not a file in the model")
        return o.node

    # events; each returns whether the durable state may have changed

    def apply(self, ev: Event) -> bool:
        return getattr(self, "op_" + ev.op)(ev)

    def op_open(self, ev: Event) -> bool:
        assert ev.path is not None and ev.ofd is not None
        fl = ev.flags
        if "tmpfile" in fl:
            if not isinstance(self.node(ev.path, True, ev), _Dir):
                raise ModelError(f"{ev}: O_TMPFILE in something that is not a folder")
            node: _Node = self.new(_File())
        else:
            follow = not ("nofollow" in fl or {"creat", "excl"} <= fl)
            d, name, found = self.walk(ev.path, follow, ev)
            if found is None:
                if "creat" not in fl or d is None:
                    raise ModelError(f"{ev}: {ev.path} does not exist in the model")
                found = d.entries[name] = self.new(_File())
            elif "trunc" in fl and isinstance(found, _File):
                found.truncate(0)
            node = found
        self.opens[ev.ofd] = _Open(node, 0, "append" in fl, "sync" in fl)
        return False

    def op_write(self, ev: Event) -> bool:
        assert ev.data is not None
        o = self.opened(ev)
        f = self.file(o, ev)
        # Linux appends on O_APPEND even with an explicit offset (pwrite's documented bug).
        at = f.size() if (o.append or "append" in ev.flags) else (ev.offset if ev.offset is not None else o.pos)
        f.write(at, ev.data)
        if ev.offset is None:
            o.pos = at + len(ev.data)
        return f.fsync() if (o.sync or "sync" in ev.flags) else False

    def op_copy(self, ev: Event) -> bool:
        assert ev.size is not None and ev.ofd2 is not None
        src_open = self.opens.get(ev.ofd2)
        if src_open is None:
            raise ModelError(f"{ev}: the copy source is not open in the model")
        src = self.file(src_open, ev)
        at = ev.offset2 if ev.offset2 is not None else src_open.pos
        data = src.volatile(at, ev.size)
        if ev.offset2 is None:
            src_open.pos += ev.size
        return self.op_write(Event(ev.index, ev.pid, ev.call, "write", ofd=ev.ofd, offset=ev.offset, data=data))

    def op_seek(self, ev: Event) -> bool:
        assert ev.offset is not None
        self.opened(ev).pos = ev.offset
        return False

    def op_advance(self, ev: Event) -> bool:
        assert ev.size is not None
        self.opened(ev).pos += ev.size
        return False

    def op_setfl(self, ev: Event) -> bool:
        self.opened(ev).append = "append" in ev.flags
        return False

    def op_truncate(self, ev: Event) -> bool:
        assert ev.size is not None
        if ev.ofd is not None:
            f = self.file(self.opened(ev), ev)
        else:
            assert ev.path is not None
            node = self.node(ev.path, True, ev)
            if not isinstance(node, _File):
                raise ModelError(f"{ev}: not a file in the model")
            f = node
        f.truncate(ev.size)
        return False

    def op_fallocate(self, ev: Event) -> bool:
        assert ev.offset is not None and ev.size is not None
        o = self.opened(ev)
        f = self.file(o, ev)
        fl, at, n = ev.flags, ev.offset, ev.size
        data = f.load()
        if "collapse_range" in fl:
            del data[at : at + n]
            f.touched(at)
        elif "insert_range" in fl:
            data[at:at] = bytes(n)
            f.touched(at)
        elif "punch_hole" in fl or "zero_range" in fl:
            end = min(at + n, len(data)) if "keep_size" in fl or "punch_hole" in fl else at + n
            if end > at:
                f.write(at, bytes(end - at))
        elif "keep_size" not in fl and at + n > len(data):
            f.truncate(at + n)
        return False

    def op_fsync(self, ev: Event) -> bool:
        return self.opened(ev).node.fsync()

    def op_sync(self, ev: Event) -> bool:
        changed = False
        for node in self.nodes:
            changed = node.fsync() or changed
        return changed

    def op_mkdir(self, ev: Event) -> bool:
        assert ev.path is not None
        d, name = self.parent(ev.path, ev)
        d.entries[name] = self.new(_Dir())
        return False

    def op_rename(self, ev: Event) -> bool:
        src = self.parent(ev.path, ev) if ev.path is not None else None
        dst = self.parent(ev.path2, ev) if ev.path2 is not None else None
        if src is not None:
            node = src[0].entries.get(src[1])
            if node is None:
                raise ModelError(f"{ev}: {ev.path} does not exist in the model")
        else:
            node = self.new(_File())  # from outside root: bytes unknown
        if dst is None:
            assert src is not None
            del src[0].entries[src[1]]
            return False
        old = dst[0].entries.get(dst[1])
        if old is node:
            return False  # two names of one file: rename does nothing
        if "exchange" in ev.flags:
            if src is None or old is None:
                raise ModelError(f"{ev}: RENAME_EXCHANGE without both names in the model")
            src[0].entries[src[1]], dst[0].entries[dst[1]] = old, node
            return False
        if src is not None:
            del src[0].entries[src[1]]
        dst[0].entries[dst[1]] = node
        return False

    def op_unlink(self, ev: Event) -> bool:
        assert ev.path is not None
        d, name = self.parent(ev.path, ev)
        if d.entries.pop(name, None) is None:
            raise ModelError(f"{ev}: {ev.path} does not exist in the model")
        return False

    op_rmdir = op_unlink

    def op_link(self, ev: Event) -> bool:
        assert ev.path2 is not None
        if ev.ofd is not None:
            node = self.opened(ev).node
        elif ev.path is not None:
            node = self.node(ev.path, "follow" in ev.flags, ev)
        else:
            node = self.new(_File())  # from outside root: bytes unknown
        d, name = self.parent(ev.path2, ev)
        d.entries[name] = node
        return False

    def op_symlink(self, ev: Event) -> bool:
        assert ev.path is not None and ev.text is not None
        d, name = self.parent(ev.path, ev)
        d.entries[name] = self.new(_Link(ev.text))
        return False

    def op_mark(self, ev: Event) -> bool:
        return False

    # the durable tree

    def freeze(self) -> _Tree:
        out: _Tree = {}
        self._freeze(self.root, "", {id(self.root)}, out)
        return out

    def _freeze(self, d: _Dir, prefix: str, ancestors: set[int], out: _Tree) -> None:
        for name, node in d.dentries.items():
            rel = f"{prefix}/{name}" if prefix else name
            if isinstance(node, _File):
                out[rel] = ("f", node.durable, node.durable_len)
            elif isinstance(node, _Link):
                out[rel] = ("l", node.target)
            elif id(node) not in ancestors:  # durable entries can form a loop no real tree has
                out[rel] = ("d",)
                self._freeze(node, rel, ancestors | {id(node)}, out)


def _join(chunks: _Chunks) -> bytes:
    return b"".join(c.path.read_bytes() if isinstance(c, _SnapChunk) else c for c in chunks)


def _same(a: _Tree, b: _Tree) -> bool:
    """Equal trees; files compared by bytes where their chunks differ (a rewrite of the same bytes)."""
    if a == b:
        return True
    if a.keys() != b.keys():
        return False
    for k, va in a.items():
        vb = b[k]
        if va == vb:
            continue
        if va[0] != "f" or vb[0] != "f" or va[2] != vb[2] or _join(va[1]) != _join(vb[1]):
            return False
    return True


@dataclass(frozen=True)
class CrashPoint:
    """A durable state: what a power cut right after event `index` (up to, not including, event `end`)
    leaves. index -1 is the state before the program ran; the last point is the final state."""

    ordinal: int
    index: int
    end: int
    marks: tuple[str, ...]  # printed before this state became durable: a crash here comes after them
    marks_during: tuple[str, ...]  # printed while it was the durable state: a crash may come before or after
    tree: Mapping[str, tuple] = field(repr=False, compare=False)

    def after(self, mark: str) -> bool:
        """Whether a crash leaving this state can happen after `mark` was printed."""
        return mark in self.marks or mark in self.marks_during

    def paths(self) -> list[str]:
        """Every file, folder and symlink, relative to root, parents first."""
        return list(self.tree)

    def exists(self, rel: str) -> bool:
        return rel in self.tree

    def read(self, rel: str) -> bytes | None:
        """A file's durable bytes, or None when the name is not durable."""
        node = self.tree.get(rel)
        if node is None:
            return None
        if node[0] != "f":
            raise IsADirectoryError(rel) if node[0] == "d" else OSError(f"{rel} is a symlink")
        return _join(node[1])

    def materialise(self, dest: Path, *, link_unchanged: bool = False) -> Path:
        """Write this state to the empty or missing folder `dest` (the layout of root) and return it.
        `link_unchanged` hard-links files untouched since the snapshot instead of copying them: faster,
        but whatever then writes to them writes to the snapshot."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise FileExistsError(f"{dest} is not empty")
        for rel, node in self.tree.items():
            p = dest / rel
            if node[0] == "d":
                p.mkdir()
            elif node[0] == "l":
                os.symlink(node[1], p)
            else:
                chunks: _Chunks = node[1]
                if chunks and isinstance(chunks[0], _SnapChunk):
                    if link_unchanged and len(chunks) == 1:
                        os.link(chunks[0].path, p)
                        continue
                    shutil.copyfile(chunks[0].path, p)
                    chunks = chunks[1:]
                with open(p, "ab") as f:
                    for c in chunks:
                        f.write(c)  # type: ignore[arg-type]
        return dest


def crash_states(trace: Trace, snapshot: Path) -> Iterator[CrashPoint]:
    """Every distinct durable state of `trace`, replayed from `snapshot` (a copy of root made before
    the program ran): the initial state, one per event after which the durable state differs, the
    last being the final state. A point is yielded once the next change is seen (its `end`). Raises
    ModelError where the replay cannot do what the program did."""
    model = _Model(Path(snapshot))
    tree = model.freeze()
    start, marks, during = -1, (), []
    seen: list[str] = []
    ordinal = 0
    for ev in trace.events:
        if ev.op == "mark":
            assert ev.text is not None
            seen.append(ev.text)
            during.append(ev.text)
            continue
        if not model.apply(ev):
            continue
        new = model.freeze()
        if _same(new, tree):
            continue
        yield CrashPoint(ordinal, start, ev.index, marks, tuple(during), tree)
        ordinal += 1
        tree, start, marks, during = new, ev.index, tuple(seen), []
    if not _same(model.freeze(), tree):  # only fsync, sync and O_SYNC writes may change it
        raise ModelError("the durable state changed outside a durability event")
    yield CrashPoint(ordinal, start, len(trace.events), marks, tuple(during), tree)
