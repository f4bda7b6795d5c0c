"""A real disk that fills up and turns read-only under a running server: its artifacts on a small
tmpfs in a mount namespace of its own (as root, or unprivileged through a user namespace), filled,
freed and remounted read-only while the test talks to the server over loopback. Every answer is a
clean 507/503 or a success, searches go on, and nothing half-applied is left: ids continue as if the
refused changes never were.

tests/unit/test_storage.py injects the same failures at every single call."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN, ADMIN_KEY, LOC, Server

# Runs in the new mount namespace: a small tmpfs at $1 holding a copy of $2, the server (the rest of
# the arguments) in the background, and commands read from the fifo $3, each answered on stdout.
WRAPPER = r"""
set -u
mnt=$1 src=$2 ctl=$3; shift 3
mount -t tmpfs -o size=24m tmpfs "$mnt" && cp -a "$src"/. "$mnt"/ || exit 97
"$@" &
srv=$!
trap 'kill "$srv" 2>/dev/null; wait "$srv"; exit 0' TERM INT
while :; do
    read -r cmd < "$ctl" || continue
    case "$cmd" in
        fill) dd if=/dev/zero of="$mnt/filler" bs=4096 2>/dev/null; sync; rc=0 ;;
        free) rm -f "$mnt/filler"; rc=$? ;;
        ro) mount -o remount,ro "$mnt"; rc=$? ;;
        rw) mount -o remount,rw "$mnt"; rc=$? ;;
        compact) "$1" -m cli.main index --compact --jobs 1 > "$mnt/../compact.log" 2>&1; rc=$? ;;
        *) rc=127 ;;
    esac
    echo "CONTROL $cmd done, exit $rc"
done
"""


def namespace() -> list[str]:
    """unshare's arguments for a mount namespace of our own: plain as root, in a user namespace else."""
    if shutil.which("unshare") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but unshare (util-linux) is missing")
        pytest.skip("unshare is missing")
    own = ["unshare", "--mount", "--propagation", "private"]
    user = ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]
    for cmd in (own, user) if os.geteuid() == 0 else (user,):
        if subprocess.run([*cmd, "true"], capture_output=True).returncode == 0:
            return cmd
    if os.environ.get("CI") == "true":
        pytest.fail("no mount namespace can be made here (unshare --mount refused)")
    pytest.skip("mount namespaces are not allowed here")


class Disk:
    def __init__(self, srv: Server, ctl: Path) -> None:
        self.srv, self.ctl = srv, ctl

    def do(self, cmd: str, timeout: float = 120) -> int:
        """Run a command of the wrapper inside the namespace; its exit code."""
        done = re.compile(rf"CONTROL {cmd} done, exit (\d+)")
        seen = len(done.findall(self.srv.output()))
        self.ctl.write_text(cmd + "\n")
        deadline = time.monotonic() + timeout
        while len(codes := done.findall(self.srv.output())) == seen:
            assert time.monotonic() < deadline, f"{cmd} not done:\n{self.srv.output()[-2000:]}"
            time.sleep(0.1)
        return int(codes[-1])


def test_a_full_then_read_only_disk_refuses_cleanly(tiny_data: Path, tiny_artifacts: Path, tmp_path: Path) -> None:
    wrap = namespace()
    mnt, ctl = tmp_path / "mnt", tmp_path / "ctl"
    mnt.mkdir()
    os.mkfifo(ctl)
    env = {
        "IMGSEARCH_DATA": str(tiny_data),
        "IMGSEARCH_ARTIFACTS": str(mnt),
        "IMGSEARCH_PRESET": "paper",
        "IMGSEARCH_ADMIN_KEY": ADMIN_KEY,
    }
    srv = Server(env, wrap=(*wrap, "bash", "-c", WRAPPER, "wrapper", str(mnt), str(tiny_artifacts), str(ctl)))
    try:
        srv.wait("/readyz", timeout=120)
        disk = Disk(srv, ctl)
        q = json.loads((tiny_data / "query" / "query.json").read_text())["im_paths"]

        def add(i: int) -> httpx.Response:
            img = (tiny_data / q[i]).read_bytes()
            return httpx.post(srv.url + "/images", headers=ADMIN, files={"file": ("x.jpg", img)}, data=LOC, timeout=60)

        def search(i: int) -> httpx.Response:
            return httpx.post(srv.url + "/search", files={"file": ("q.jpg", (tiny_data / q[i]).read_bytes())})

        first = add(0)
        assert first.status_code == 201, first.text
        new_id = first.json()["id"]

        assert disk.do("fill") == 0
        full = add(1)
        assert full.status_code == 507 and full.json()["code"] == "storage_full", full.text
        assert "No space left" in full.json()["detail"]
        for r in (
            httpx.delete(f"{srv.url}/images/0", headers=ADMIN),
            httpx.post(srv.url + "/index/rollback", headers=ADMIN),
        ):
            assert r.status_code in (204, 409, 507), r.text  # a line may still fit in a page the log has
        assert search(2).status_code == 200
        # The command line: a message and exit code 2, no traceback, nothing published.
        assert disk.do("compact") == 2
        compact_log = (tmp_path / "compact.log").read_text()
        assert "No space left on device" in compact_log and "Traceback" not in compact_log, compact_log
        assert disk.do("free") == 0
        second = add(1)
        assert second.status_code == 201 and second.json()["id"] == new_id + 1  # the refused add took no id

        assert disk.do("ro") == 0
        for r in (
            add(3),
            httpx.delete(f"{srv.url}/images/{new_id}", headers=ADMIN),
            httpx.post(srv.url + "/index/rollback", headers=ADMIN),
        ):
            assert r.status_code == 503 and r.json()["code"] == "storage_unavailable", r.text
            assert "Read-only file system" in r.json()["detail"]
        assert search(2).status_code == 200 and httpx.get(srv.url + "/readyz").status_code == 200
        assert disk.do("rw") == 0
        assert httpx.delete(f"{srv.url}/images/{new_id}", headers=ADMIN).status_code == 204
        third = add(3)
        assert third.status_code == 201 and third.json()["id"] == new_id + 2
        ready = httpx.get(srv.url + "/readyz").json()
        assert ready["corrupt_log_lines"] == 0
        assert "Traceback" not in srv.output() and '"status": 500' not in srv.output()
    finally:
        srv.stop()
