"""What the benchmarks read about the server's processes from /proc (Linux): its process tree
(uvicorn's supervisor and workers), their CPU time and resident memory (RSS, and PSS, which counts a
page shared by several processes once in all)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (uvicorn's supervisor and its worker processes)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def pss_mb(pid: int) -> float:
    """Proportional set size: the process's private memory plus its share of pages it maps with
    others (memory-mapped index files shared by the workers count once over the tree, not per worker
    as in RSS)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def tree_rss_mb(pid: int) -> float:
    """Resident memory of pid and all its descendants, in MB."""
    return round(sum(rss_mb(p) for p in process_tree(pid)), 1)


def stop_server(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the server (uvicorn stops its workers), SIGKILL if it has not exited in `timeout` s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
