"""Index lifecycle over real HTTP: online adds and deletes (durable across restart and kill -9, visible
at once in every server process), hot swap under load, refusal of a corrupt version, rollback,
compaction, and an indexer killed mid-write.

Every test works on its own copy of the tiny artifacts (the session fixture is shared)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from indexer import store
from indexer.changes import ChangeLog
from tests.conftest import ADMIN, LOC, ROOT, Server


def query_bytes(data: Path, i: int) -> bytes:
    q = json.loads((data / "query" / "query.json").read_text())
    return (data / q["im_paths"][i]).read_bytes()


def add(srv: Server, img: bytes, **loc: str) -> httpx.Response:
    return httpx.post(srv.url + "/images", headers=ADMIN, files={"file": ("x.jpg", img)}, data=LOC | loc, timeout=30)


def search(srv: Server, img: bytes, k: int = 5) -> dict:
    r = httpx.post(srv.url + "/search", params={"k": k}, files={"file": ("q.jpg", img)}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def ready(srv: Server) -> dict:
    return httpx.get(srv.url + "/readyz", timeout=10).json()


def wait_for(cond: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.1)


def kill9(srv: Server) -> None:
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(timeout=10)


def imgsearch(data: Path, artifacts: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cli.main", "index", "--data", str(data), "--artifacts", str(artifacts)]
    cmd += ["--preset", "paper", "--jobs", "1", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


# Online changes ---------------------------------------------------------------------------------


def test_add_is_searchable_at_once_in_every_process(serve, tiny_data: Path, family: Path) -> None:
    a, b = serve(), serve()  # two processes on the same files, as uvicorn workers would be
    size = ready(b)["size"]
    img = query_bytes(tiny_data, 3)
    r = add(a, img)
    assert r.status_code == 201, r.text
    body = r.json()
    new_id = body["id"]
    assert body["uploaded"] is True and body["path"].startswith("uploads/") and new_id >= size
    assert body["location"] == {"easting": 700010.5, "northing": 5710003.25, "heading": 42.5}
    # The other process answers with it straight away, first, with the given location.
    top = search(b, img)["results"][0]
    assert top["id"] == new_id and top["distance"] == pytest.approx(0.0, abs=1e-4)
    assert top["location"] == body["location"]
    assert httpx.get(f"{b.url}/images/{new_id}").json() == body
    assert ready(b)["size"] == size + 1 and ready(b)["last_change"] == 1
    # The stored upload is the image itself, under the index family.
    assert (family / body["path"]).read_bytes() == img


def test_delete_is_gone_at_once_in_every_process(serve, tiny_data: Path) -> None:
    a, b = serve(), serve()
    db = json.loads((tiny_data / "database" / "database.json").read_text())
    img = (tiny_data / db["im_paths"][5]).read_bytes()
    assert search(b, img)["results"][0]["id"] == 5
    r = httpx.delete(f"{a.url}/images/5", headers=ADMIN)
    assert r.status_code == 204 and r.content == b""
    assert 5 not in [h["id"] for h in search(b, img, k=20)["results"]]
    assert httpx.get(f"{b.url}/images/5").status_code == 404
    again = httpx.delete(f"{b.url}/images/5", headers=ADMIN)
    assert again.status_code == 404 and again.json()["code"] == "not_found"
    # An added image can be deleted as well, and its id is never given out again.
    new_id = add(a, query_bytes(tiny_data, 4)).json()["id"]
    assert httpx.delete(f"{b.url}/images/{new_id}", headers=ADMIN).status_code == 204
    assert add(b, query_bytes(tiny_data, 4)).json()["id"] == new_id + 1


def test_concurrent_adds_in_two_processes_get_distinct_ids(serve, tiny_data: Path) -> None:
    a, b = serve(), serve()
    ids: list[int] = []

    def writer(srv: Server, start: int) -> None:
        for i in range(start, start + 4):
            r = add(srv, query_bytes(tiny_data, i))
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])

    threads = [threading.Thread(target=writer, args=(srv, n * 4)) for n, srv in enumerate((a, b, a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(ids) == 16 and len(set(ids)) == 16
    for srv in (a, b):
        assert ready(srv)["last_change"] == 16
        assert all(httpx.get(f"{srv.url}/images/{i}").status_code == 200 for i in ids)


def test_online_changes_are_admin_only_and_validated(serve, tiny_data: Path) -> None:
    srv = serve()
    img = query_bytes(tiny_data, 0)
    assert httpx.post(srv.url + "/images", files={"file": ("x.jpg", img)}, data=LOC).status_code == 401
    wrong = {"X-API-Key": "x" * 32}
    assert httpx.post(srv.url + "/images", headers=wrong, files={"file": ("x.jpg", img)}, data=LOC).status_code == 403
    assert httpx.delete(srv.url + "/images/1").status_code == 401
    assert httpx.post(srv.url + "/index/rollback").status_code == 401
    for bad in ({"heading": "360"}, {"heading": "-1"}, {"easting": "nan"}, {"northing": "inf"}, {"easting": "east"}):
        r = add(srv, img, **bad)
        assert r.status_code == 422 and r.json()["code"] == "invalid_request", (bad, r.text)
    missing = httpx.post(srv.url + "/images", headers=ADMIN, files={"file": ("x.jpg", img)}, data={"easting": "1"})
    assert missing.status_code == 422 and "heading" in missing.json()["detail"]
    not_image = add(srv, b"<svg xmlns='http://www.w3.org/2000/svg'/>")
    assert not_image.status_code in (400, 415) and not_image.json()["code"] in ("invalid_image", "unsupported_format")
    assert httpx.delete(srv.url + "/images/-3", headers=ADMIN).status_code == 422
    assert httpx.delete(srv.url + "/images/999999", headers=ADMIN).status_code == 404
    # Nothing of that was recorded.
    assert ready(srv)["last_change"] == 0


# Durability -------------------------------------------------------------------------------------


def test_changes_survive_restart_and_kill9_right_after_the_answer(serve, tiny_data: Path) -> None:
    srv = serve()
    img = query_bytes(tiny_data, 6)
    new_id = add(srv, img).json()["id"]
    assert httpx.delete(f"{srv.url}/images/7", headers=ADMIN).status_code == 204
    srv.stop()
    srv = serve()
    assert search(srv, img)["results"][0]["id"] == new_id
    assert httpx.get(f"{srv.url}/images/7").status_code == 404
    # kill -9 straight after the 201: the change was on disk before the answer.
    img2 = query_bytes(tiny_data, 8)
    r = add(srv, img2)
    assert r.status_code == 201
    kill9(srv)
    srv = serve()
    assert search(srv, img2)["results"][0]["id"] == r.json()["id"]
    assert httpx.get(f"{srv.url}/images/{new_id}").status_code == 200


def test_kill9_during_a_stream_of_adds_loses_no_acknowledged_change(serve, tiny_data: Path, family: Path) -> None:
    acked: list[int] = []
    for round_ in range(2):
        srv = serve()
        stop = threading.Event()
        first_ack = threading.Event()

        def writer(
            k: int,
            srv: Server = srv,
            stop: threading.Event = stop,
            first_ack: threading.Event = first_ack,
            round_: int = round_,
        ) -> None:
            i = 0
            while not stop.is_set():
                # Bytes of their own after the JPEG's end (decoders ignore them): adds are idempotent by
                # content, and a repeated picture would be answered 200 with the first add.
                img = query_bytes(tiny_data, i % 10) + f"{round_} {k} {i}".encode()
                try:
                    r = add(srv, img)
                except httpx.TransportError:
                    return  # the server was killed mid-request: that change was never acknowledged
                if r.status_code == 201:
                    acked.append(r.json()["id"])
                    first_ack.set()
                i += 1

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        assert first_ack.wait(30)
        time.sleep(random.uniform(0.1, 0.8))
        kill9(srv)
        stop.set()
        for t in threads:
            t.join(30)
    srv = serve()
    assert len(acked) >= 2 and len(set(acked)) == len(acked)
    for i in acked:
        assert httpx.get(f"{srv.url}/images/{i}").status_code == 200, i
    # The log holds only whole, checksummed records, and writing goes on after the crashes.
    tail = ChangeLog(family).read(0)
    assert tail.bad_lines == 0 and {r["id"] for r in tail.records} >= set(acked)
    assert add(srv, query_bytes(tiny_data, 11)).status_code == 201


def test_torn_and_garbage_log_lines_are_ignored(serve, tiny_data: Path, family: Path) -> None:
    srv = serve()
    img = query_bytes(tiny_data, 2)
    new_id = add(srv, img).json()["id"]
    srv.stop()
    log_path = family / "changes.log"
    good = log_path.read_bytes()
    # A line with a wrong checksum, then a half-written line, as a crash mid-append leaves it.
    record = json.loads(good.splitlines()[0])
    forged = json.dumps(record | {"id": 5, "op": "delete", "path": "database/images/x.jpg"}).encode()
    with open(log_path, "ab") as f:
        f.write(forged + b"\n" + b"not json at all\n" + good[: len(good) // 2])
    srv = serve()
    assert search(srv, img)["results"][0]["id"] == new_id
    assert httpx.get(f"{srv.url}/images/5").status_code == 200  # the forged delete was not applied
    # Skipped lines are counted where an operator looks: /readyz and /metrics.
    r = ready(srv)
    assert r["corrupt_log_lines"] == 2 and "2 corrupt line(s)" in r["warning"]
    assert "imgsearch_changelog_corrupt_lines 2.0" in httpx.get(srv.url + "/metrics").text
    r = add(srv, query_bytes(tiny_data, 9))
    assert r.status_code == 201 and r.json()["id"] == new_id + 1
    # The torn tail was cut off before appending, so the new record is whole and readable.
    tail = ChangeLog(family).read(0)
    assert [x["id"] for x in tail.records] == [new_id, new_id + 1] and tail.bad_lines == 2
    assert log_path.read_bytes().endswith(b"\n")
    srv.stop()
    srv = serve()
    assert httpx.get(f"{srv.url}/images/{new_id + 1}").status_code == 200


# Versions: hot swap, corrupt version, rollback, compaction ---------------------------------------


def test_hot_swap_under_load_fails_no_request(serve, tiny_data: Path, artifacts: Path, family: Path) -> None:
    srv = serve(workers=2)
    old = ready(srv)["index_version"]
    added_img = query_bytes(tiny_data, 5)
    added = add(srv, added_img).json()["id"]
    statuses: list[int] = []
    versions: list[str] = []
    stop = threading.Event()

    def load(i: int) -> None:
        img = query_bytes(tiny_data, i)
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post(srv.url + "/search", params={"k": 5}, files={"file": ("q.jpg", img)})
                except httpx.TransportError as e:
                    statuses.append(-1)
                    versions.append(repr(e))
                    continue
                statuses.append(r.status_code)
                if r.status_code == 200:
                    versions.append(r.json()["index_version"])

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    out = imgsearch(tiny_data, artifacts, "--force")
    assert out.returncode == 0, out.stderr
    new = Path(out.stdout.strip().splitlines()[-1]).name
    assert new != old and store.read_pointer(family) == new
    # Both workers swap; keep the load on while they do, and a little after.
    wait_for(lambda: all(ready(srv)["index_version"] == new for _ in range(6)))
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(30)
    assert statuses and set(statuses) == {200}, [s for s in statuses if s != 200][:5]
    assert old in versions and versions[-1] == new
    # The online change lives in the family's log, so the new version serves it too.
    top = search(srv, added_img)
    assert top["index_version"] == new and top["results"][0]["id"] == added


def copy_as_new_version(family: Path, corrupt: bool) -> str:
    """A new version that looks complete, published after the current one; with `corrupt`, one of its
    files no longer matches its checksum."""
    current = store.current_version(family)
    seq = max(store.version_seq(v.name) for v in store.versions(family)) + 1
    name = f"v{seq:06d}-99990101-000000"
    shutil.copytree(current, family / name)
    manifest = json.loads((family / name / "manifest.json").read_text())
    manifest |= {"version": name, "seq": seq, "previous": current.name}
    (family / name / "manifest.json").write_text(json.dumps(manifest))
    if corrupt:
        with open(family / name / "index.faiss", "r+b") as f:
            f.seek(-8, os.SEEK_END)
            f.write(b"\xff" * 8)
    (family / ".CURRENT.new").write_text(name)
    os.replace(family / ".CURRENT.new", family / "CURRENT")
    return name


def test_corrupt_new_version_is_refused_and_old_one_keeps_serving(
    serve, tiny_data: Path, artifacts: Path, family: Path
) -> None:
    srv = serve()
    old = ready(srv)["index_version"]
    bad = copy_as_new_version(family, corrupt=True)
    wait_for(lambda: ready(srv).get("warning") is not None)
    r = ready(srv)
    assert r["status"] == "ready" and r["index_version"] == old
    assert bad in r["warning"] and "checksum" in r["warning"]
    assert search(srv, query_bytes(tiny_data, 1))["index_version"] == old
    # A process started now cannot serve the corrupt version CURRENT names: it serves the newest that
    # loads, and says so.
    fresh = serve()
    nr = ready(fresh)
    assert nr["status"] == "ready" and nr["index_version"] == old
    assert bad in nr["warning"] and "checksum" in nr["warning"] and old in nr["warning"]
    # Rolling back from the command line: both processes serve the old version again, no warning.
    out = imgsearch(tiny_data, artifacts, "--rollback")
    assert out.returncode == 0, out.stderr
    assert store.read_pointer(family) == old
    wait_for(lambda: ready(fresh).get("warning") is None)
    assert ready(fresh)["index_version"] == old
    assert ready(srv)["index_version"] == old and ready(srv)["warning"] is None


def test_rollback_endpoint(serve, tiny_data: Path, family: Path) -> None:
    srv = serve()
    old = ready(srv)["index_version"]
    img = query_bytes(tiny_data, 4)
    added = add(srv, img).json()["id"]
    new = copy_as_new_version(family, corrupt=False)
    wait_for(lambda: ready(srv)["index_version"] == new)
    r = httpx.post(srv.url + "/index/rollback", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json() == {"index_version": old, "previous": new}
    wait_for(lambda: ready(srv)["index_version"] == old)
    assert search(srv, img)["results"][0]["id"] == added  # changes are kept across a rollback
    again = httpx.post(srv.url + "/index/rollback", headers=ADMIN)
    assert again.status_code == 409 and again.json()["code"] == "rollback_failed"


def test_a_build_after_a_rollback_keeps_what_the_operator_chose(tiny_data: Path, artifacts: Path, family: Path) -> None:
    v1 = store.read_pointer(family)
    builds = []
    for args in (["--force"], ["--rollback"], ["--force"]):
        out = imgsearch(tiny_data, artifacts, *args)
        assert out.returncode == 0, out.stderr
        builds.append(Path(out.stdout.strip().splitlines()[-1]).name)
    v2, rolled_back_to, v3 = builds
    assert rolled_back_to == v1 and store.read_pointer(family) == v3
    # The version the operator rolled back to stays; the one they rejected is gone.
    assert [v.name for v in store.versions(family)] == [v1, v3] and v2 not in {v1, v3}
    out = imgsearch(tiny_data, artifacts, "--rollback")
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1].endswith(v1)


def test_compaction_folds_changes_into_a_new_version(serve, tiny_data: Path, artifacts: Path, family: Path) -> None:
    srv = serve()
    img = query_bytes(tiny_data, 7)
    added = add(srv, img).json()["id"]
    assert httpx.delete(f"{srv.url}/images/3", headers=ADMIN).status_code == 204
    out = imgsearch(tiny_data, artifacts, "--compact")
    assert out.returncode == 0, out.stderr
    version = Path(out.stdout.strip().splitlines()[-1])
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["changes_seq"] == 2 and manifest["count"] == ready(srv)["size"]
    wait_for(lambda: ready(srv)["index_version"] == version.name)
    srv.stop()
    srv = serve()
    assert ready(srv)["index_version"] == version.name
    assert search(srv, img)["results"][0]["id"] == added
    assert httpx.get(f"{srv.url}/images/3").status_code == 404
    # Ids keep counting after compaction; the thumbnail-side file of an added image resolves.
    assert add(srv, query_bytes(tiny_data, 8)).json()["id"] == added + 1
    from retrieval.live import open_version

    s, _ = open_version(family, version)
    assert store.image_file(s.images[added], family, tiny_data) == (family / s.images[added].path).resolve()
    assert store.image_file(s.images[0], family, tiny_data) == (tiny_data / s.images[0].path).resolve()


# The indexer killed mid-write --------------------------------------------------------------------

# Runs `imgsearch index --force` with a pause at one point of publishing, announced on stdout, so the
# test can SIGKILL it exactly there.
HOOKED_INDEXER = """
import os, shutil, sys, time
from indexer import store
point = sys.argv[1]
def pause():
    print("PAUSED", flush=True)
    time.sleep(120)
if point == "copying-files":  # index.faiss and images.json written, the rest not yet: a half version
    copy = shutil.copyfile
    def hooked_copy(a, b):
        pause()
        return copy(a, b)
    store.shutil.copyfile = hooked_copy
else:
    replace = os.replace
    def hooked_replace(a, b):
        is_version = os.path.isdir(a) and os.path.basename(a).startswith(".v") and str(a).endswith(".tmp")
        if (point == "before-rename" and is_version) or (point == "before-pointer" and str(b).endswith("CURRENT")):
            pause()
        return replace(a, b)
    os.replace = hooked_replace  # the one os module: store's rename and common.files' atomic writes
from cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("point", ["copying-files", "before-rename", "before-pointer"])
def test_indexer_killed_mid_write_leaves_old_version_serving(
    serve, tiny_data: Path, artifacts: Path, family: Path, point: str
) -> None:
    srv = serve()
    old = store.read_pointer(family)
    img = query_bytes(tiny_data, 2)
    args = ["index", "--force", "--data", str(tiny_data), "--artifacts", str(artifacts), "--preset", "paper"]
    proc = subprocess.Popen(
        [sys.executable, "-c", HOOKED_INDEXER, point, *args, "--jobs", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "PAUSED":
                break
        else:
            pytest.fail(f"indexer exited ({proc.wait()}) before reaching {point}")
        assert search(srv, img)["index_version"] == old  # serving while the indexer writes
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert store.read_pointer(family) == old
    if point == "copying-files":
        assert list(family.glob(".v*.tmp")), "the half-written version should be left as a temporary"
    time.sleep(1)  # past any pointer check the servers would make
    r = ready(srv)
    assert r["index_version"] == old and r["warning"] is None
    assert search(srv, img)["index_version"] == old
    restarted = serve()
    assert ready(restarted)["index_version"] == old
    # The next complete run publishes normally, clears the leftover, and the servers swap to it.
    out = imgsearch(tiny_data, artifacts, "--force")
    assert out.returncode == 0, out.stderr
    new = store.read_pointer(family)
    assert new != old and not list(family.glob(".v*.tmp"))
    wait_for(lambda: ready(srv)["index_version"] == new and ready(restarted)["index_version"] == new)
