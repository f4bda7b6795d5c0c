"""The one results writer: each script's section of bench/results.json, and of BENCHMARKS.md.

A section records what it was measured by and on (command, machine, git commit, date), so that a
section kept from an earlier run (one skipped this time) still says where its figures come from.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.clock import utc_timestamp
from common.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.json"
MARKDOWN = ROOT / "BENCHMARKS.md"
# bench/run.py's figures are the top level of results.json (the layout BENCHMARKS.md and its
# --report-only read); every other script has a key of its own, which the suite's record keeps.
SUITE = ""
SECTIONS = ("ann", "served_1m", "ray", "soak", "slow_clients", "cold_rows", "search_parts", "shortlist")


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM and the load at the start. Hosts of one model name differ in speed: the
    family, model number, clock and cache tell them apart."""
    keys = {"model name": "model", "cpu family": "family", "model": "model_number", "cpu MHz": "mhz"}
    keys["cache size"] = "cache"
    cpu: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in keys and keys[key.strip()] not in cpu:
                cpu[keys[key.strip()]] = value.strip()
            if not line.strip():  # the first processor's block is enough
                break
    return {
        "cpu": cpu.pop("model", platform.processor() or "unknown"),
        "cpu_details": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
    }


def describe(m: dict[str, Any]) -> str:
    """One line of a machine() record, for a report."""
    return f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB"


def git_commit() -> str | None:
    """The commit measured, "-dirty" when the work tree differs from it; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def started(script: str, argv: list[str] | None) -> dict[str, Any]:
    """What a section records of its run, taken when it starts: the command, machine and commit."""
    args = sys.argv[1:] if argv is None else argv
    return {"command": shlex.join(["python", script, *args]), "machine": machine(), "commit": git_commit()}


def load(path: Path = RESULTS) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One writer at a time (the suite's subprocesses record beside it): a lock on the folder."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def record(section: str, data: dict[str, Any], path: Path = RESULTS, stamp: bool = True) -> dict[str, Any]:
    """Merge `data` (with started()'s fields) as `section` of the results file, atomically: readers
    never see half a file, and other sections stay as they were. `stamp`: a new measure, dated, with
    the load at its end (not for a report rewritten from recorded figures). Returns the whole file."""
    if section != SUITE and section not in SECTIONS:
        raise ValueError(f"unknown results section {section!r}: add it to bench/report.py SECTIONS")
    if stamp:
        data = dict(data, created=utc_timestamp())
        if isinstance(data.get("machine"), dict):
            data["machine"] = dict(data["machine"], load_avg_end=[round(v, 2) for v in os.getloadavg()])
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent):
        results = load(path)
        if section == SUITE:
            results = {k: v for k, v in results.items() if k in SECTIONS} | data
        else:
            results[section] = data
        atomic_write_text(path, json.dumps(results, indent=1) + "\n", durable=False)
    return results


def replace_section(text: str, begin: str, end: str, body: str, before: str | None = None) -> str:
    """`text` with the part between its `begin` and `end` markers replaced by `body`; without them,
    the section goes before the `before` marker, or at the end."""
    section = f"{begin}\n{body}\n{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        return text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    if before is not None and before in text:
        i = text.index(before)
        return text[:i] + section + "\n\n" + text[i:]
    return text.rstrip("\n") + "\n\n" + section + "\n"


def write_markdown(begin: str, end: str, body: str, path: Path = MARKDOWN, before: str | None = None) -> None:
    """A script's section of BENCHMARKS.md (or `path`), the rest of the file untouched."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    atomic_write_text(path, replace_section(text, begin, end, body, before), durable=False)
