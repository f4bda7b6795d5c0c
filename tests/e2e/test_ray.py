"""The Ray engine on a real two-node Ray cluster on loopback, with London map images: `imgsearch index
--engine ray`, whose workers write the shards, publishes the vectors, keypoints and heads the embedded
engine does; `imgsearch serve --engine ray` (Ray Serve) answers as the embedded service does; a killed
shard replica costs no search, and a shard with every replica killed at most clean 503s
(bench/ray_faults.py); an add through one ingress replica is found through another; a new version
reaches every replica without a failed request.

Ray's nodes bind the machine's network address unless told otherwise: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
(set in tests/conftest.py, before Ray is imported) and ray.cluster_utils.Cluster keep both nodes, the
drivers and Serve's HTTP proxies on 127.0.0.1; the cluster fixture checks it before anything is sent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
import ray

from common.pipeline import DEFAULT_PRESET
from dataset.layout import load_dataset
from indexer import store
from retrieval.locate import to_latlon
from tests.conftest import ADMIN_KEY, ROOT

PRESET = DEFAULT_PRESET


@pytest.fixture(scope="module")
def cluster() -> Iterator:
    """A head node and a worker node, both on 127.0.0.1; stopped at the end."""
    from ray.cluster_utils import Cluster

    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        c.add_node(num_cpus=2)
        c.wait_for_nodes()
        assert c.address.startswith("127.0.0.1:"), c.address  # never the machine's network address
        assert {n.node_ip_address for n in c.list_all_nodes()} == {"127.0.0.1"}
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


def _cli(env: dict[str, str], *args: str) -> Path:
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=ROOT,
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ray_faults() -> ModuleType:
    """bench/ray_faults.py: the replica kills that bench/ray_bench.py measures, asserted on here."""
    spec = importlib.util.spec_from_file_location("ray_faults", ROOT / "bench" / "ray_faults.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def built(cluster, london_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same London index built twice: by the embedded engine, then by the Ray engine in 2 shards."""
    env = {
        "IMGSEARCH_DATA": str(london_subset),
        "IMGSEARCH_ARTIFACTS": str(tmp_path_factory.mktemp("ray-artifacts")),
        "IMGSEARCH_PRESET": PRESET,
        "IMGSEARCH_ADMIN_KEY": ADMIN_KEY,
    }
    embedded = _cli(env, "index", "--jobs", "2")
    sharded = _cli(env, "index", "--engine", "ray", "--address", cluster.address, "--shards", "2")
    return {"env": env, "embedded": embedded, "ray": sharded, "address": cluster.address}


def test_ray_indexing_writes_the_embedded_engines_vectors_in_shards(built: dict) -> None:
    emb, shd = built["embedded"], built["ray"]
    assert emb.parent == shd.parent and emb.name < shd.name
    manifest = json.loads((shd / "manifest.json").read_text())
    assert manifest["shards"] == 2 and {"index.s0.faiss", "index.s1.faiss", "verify.s1.npz"} <= {
        p.name for p in shd.iterdir()
    }
    a, b = store.load(emb), store.load(shd)
    assert a.images == b.images
    ids_a, xa = store.index_contents(a.index)
    ids_b, xb = store.index_contents(b.index)
    xa, xb = xa[np.argsort(ids_a)], xb[np.argsort(ids_b)]
    print(f"embeddings, Ray against embedded: max |difference| {np.abs(xa - xb).max():.2e}")  # the record (-s)
    assert np.allclose(xa, xb, rtol=0, atol=1e-5), float(np.abs(xa - xb).max())
    for i in a.images:
        fa, wa = a.verifier.features_of(i)
        fb, wb = b.verifier.features_of(i)
        assert np.array_equal(fa.descriptors, fb.descriptors) and np.array_equal(fa.xy, fb.xy)
        assert np.array_equal(wa, wb)
    assert np.allclose(a.manifest["verify_head"], b.manifest["verify_head"], atol=1e-4)


@pytest.fixture(scope="module")
def services(built: dict, start_server) -> Iterator[dict]:
    """The Ray service (2 ingress replicas, 2 replicas of each shard) and the embedded one, same index."""
    ray_srv = start_server(
        built["env"] | {"RAY_DEDUP_LOGS": "0"},
        wait_path="/readyz",
        args=("--engine", "ray", "--address", built["address"], "--replicas", "2"),
        timeout=240,
    )
    _ready(ray_srv.url, 240)  # the proxy answers (404) before the ingress replicas have loaded the index
    embedded = start_server(built["env"], wait_path="/readyz")
    _ready(embedded.url, 60)
    yield {"ray": ray_srv, "embedded": embedded}
    ray_srv.stop(timeout=60)  # serve.shutdown() takes the application down before the cluster goes


def _ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/readyz not 200 after {timeout} s")


def _queries(london_subset: Path, n: int) -> list[bytes]:
    ds = load_dataset(london_subset)
    return [ds.image_path(p).read_bytes() for p in ds.queries.paths[:n]]


def _search(url: str, data: bytes, k: int = 10, timeout: float = 60) -> httpx.Response:
    return httpx.post(url + "/search", files={"file": ("q.jpg", data)}, params={"k": k}, timeout=timeout)


def test_ray_serve_answers_as_the_embedded_service(services: dict, london_subset: Path, built: dict) -> None:
    r = httpx.get(services["ray"].url + "/readyz", timeout=10).json()
    assert r["size"] == len(load_dataset(london_subset).database) and r["index_version"] == built["ray"].name
    for data in _queries(london_subset, 12):
        want, got = _search(services["embedded"].url, data), _search(services["ray"].url, data)
        assert want.status_code == got.status_code == 200, got.text
        w, g = want.json(), got.json()
        # The same headers, once each (Serve's proxy adds its own X-Request-ID; the ingress drops the app's).
        assert len(got.headers.get_list("x-request-id")) == 1
        assert sorted(k for k, _ in got.headers.multi_items()) == sorted(k for k, _ in want.headers.multi_items())
        assert g["index_version"] == w["index_version"] and g["query_location"] == w["query_location"]
        assert [(h["id"], h["inliers"], h["location"]) for h in g["results"]] == [
            (h["id"], h["inliers"], h["location"]) for h in w["results"]
        ]
        assert np.allclose([h["score"] for h in g["results"]], [h["score"] for h in w["results"]], atol=1e-9)
    # A search with a position prior and its evidence: the same answer through the shards.
    ds = load_dataset(london_subset)
    for q in range(4):
        lat, lon = to_latlon(float(ds.queries.loc[q, 0]) + 20.0, float(ds.queries.loc[q, 1]) - 10.0, 32630)
        params = {"k": 10, "lat": lat, "lon": lon, "radius_m": 100, "explain": True}
        data = ds.image_path(ds.queries.paths[q]).read_bytes()
        w, g = (
            httpx.post(s.url + "/search", files={"file": ("q.jpg", data)}, params=params, timeout=60)
            for s in (services["embedded"], services["ray"])
        )
        assert w.status_code == g.status_code == 200, g.text
        w, g = w.json(), g.json()
        assert g["prior"] == w["prior"] and g["query_location"] == w["query_location"]
        assert [(h["id"], h["inliers"], h.get("matches")) for h in g["results"]] == [
            (h["id"], h["inliers"], h.get("matches")) for h in w["results"]
        ]
    # The same error contract: a bad upload is a 4xx with the API's error body, on the Ray path too.
    bad, ref = _search(services["ray"].url, b"not an image"), _search(services["embedded"].url, b"not an image")
    assert 400 <= bad.status_code < 500 and bad.status_code == ref.status_code
    assert bad.json() == ref.json() and bad.json()["code"] == "invalid_image"
    assert httpx.get(services["ray"].url + "/metrics/precision", timeout=10).status_code == 401


def test_metrics_sum_every_ingress_replica(services: dict, london_subset: Path) -> None:
    from tests.service.test_observability import scrape, value

    srv = services["ray"]
    labels = {"handler": "/search", "method": "POST", "status": "200"}
    before = value(scrape(srv.url), "http_requests_total", **labels)
    ids = []
    for data in _queries(london_subset, 6) * 2:
        r = _search(srv.url, data)
        assert r.status_code == 200, r.text
        ids.append(r.headers["x-request-id"])
    time.sleep(2)  # the access lines reach the driver's output
    served_by = {_replica_of_requests(srv.output()).get(i) for i in ids}
    assert len(served_by - {None}) == 2, served_by  # both ingress replicas answered some
    # Whichever replica answers a scrape, it counts the searches of both.
    for _ in range(6):
        assert value(scrape(srv.url), "http_requests_total", **labels) == before + 12


def _replica_of_requests(log_text: str) -> dict[str, str]:
    """Serve's access lines name the replica and the request id: `<app>_Ingress <replica> <request id> -- `."""
    return {m[1]: m[0] for m in re.findall(r"imgsearch_Ingress (\w+) ([\w-]+) -- ", log_text)}


def test_an_add_on_one_ingress_replica_is_found_through_another(services: dict, london_subset: Path) -> None:
    srv = services["ray"]
    data = _queries(london_subset, 30)[-1]
    form = {"easting": "700000", "northing": "5700000", "heading": "90"}
    headers = {"X-API-Key": ADMIN_KEY}
    added = httpx.post(srv.url + "/images", files={"file": ("m.jpg", data)}, data=form, headers=headers, timeout=60)
    assert added.status_code == 201, added.text
    new_id = added.json()["id"]
    try:
        found_by = []
        for _ in range(12):
            r = _search(srv.url, data, k=3)
            assert r.status_code == 200 and r.json()["results"][0]["id"] == new_id, r.text
            found_by.append(r.headers["x-request-id"])
        time.sleep(2)  # the access lines reach the driver's output
        replicas = _replica_of_requests(srv.output())
        adder = replicas[added.headers["x-request-id"]]
        assert any(replicas.get(rid) not in (None, adder) for rid in found_by), "no search went to another replica"
    finally:
        gone = httpx.delete(f"{srv.url}/images/{new_id}", headers=headers, timeout=60)
        assert gone.status_code == 204, gone.text
    assert all(h["id"] != new_id for h in _search(srv.url, data, k=3).json()["results"])


def test_a_killed_shard_replica_costs_no_search_and_a_lost_shard_only_clean_503s(
    services: dict, london_subset: Path, built: dict, ray_faults: ModuleType
) -> None:
    srv = services["ray"]
    faults = ray_faults.replica_kills(srv.url, built["address"], _queries(london_subset, 8))
    print(f"replicas killed under load: {faults}")  # for the record (pytest -s)
    # One replica of each shard killed in turn, under 3 searching clients: the other answers.
    assert faults["replica_kill_non200"] == 0 and faults["replica_kill_codes"].get("200", 0) > 0, faults
    # Every replica of a shard lost: clean 503s only, until Serve has replaced them.
    assert set(faults["shard_loss_statuses"]) <= {"200", "503"} and faults["shard_loss_statuses"]["200"] > 0
    assert faults["shard_loss_error_codes"] in ([], ["not_ready"]), faults
    assert faults["shard_loss_recovered"]
    assert faults["shard_version_after"] == httpx.get(srv.url + "/readyz", timeout=10).json()["index_version"]


def test_a_new_version_reaches_every_replica_without_a_failed_request(
    services: dict, london_subset: Path, built: dict, ray_faults: ModuleType
) -> None:
    srv = services["ray"]
    old = httpx.get(srv.url + "/readyz", timeout=10).json()["index_version"]
    with ray_faults.Load(srv.url, _queries(london_subset, 8)) as load:
        time.sleep(2)
        new = _cli(built["env"], "index", "--compact")  # publishes a new version of the same shards
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not load.versions or load.versions[-1] != new.name):
            time.sleep(0.5)
        time.sleep(4)  # long enough for every ingress replica to have answered from the new version
    print(f"new version under load: {dict(load.codes)}, {len(load.versions)} answers")  # for the record (pytest -s)
    assert new.name != old
    assert set(load.codes) == {200}, (load.codes, load.bodies[:3])
    tail = load.versions[-6:]
    assert tail and set(tail) == {new.name}, load.versions[-12:]
    assert ray_faults.shard_status(built["address"], 0)["version"] == new.name
