"""A sharded index in one process: the version format, and a head over its shards ranking exactly as the
whole index, online changes included (the Ray engine puts the same ShardServers behind Ray Serve)."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dataset.layout import Location, load_dataset
from features.orb import OrbFeatures
from indexer import store
from indexer.store import Part
from model.verify import MapFeatures
from retrieval.live import LiveIndex, NotReadyError
from retrieval.prior import Prior
from retrieval.query import search_image
from retrieval.searcher import LocalBackend, Searcher
from retrieval.shards import (
    LocalShards,
    ShardedBackend,
    ShardServer,
    StagedShardServer,
    by_owner,
    head_index,
    merge_hits,
)

PRESET = "dense-rvlad-verify"  # verifies, and needs no Keras training: quick on the tiny data


@pytest.fixture(scope="module")
def family(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A family whose current version is split into 3 shards, and the whole version before it."""
    from cli.stages import run_index

    artifacts = tmp_path_factory.mktemp("sharded")
    ds = load_dataset(tiny_data)
    whole = run_index(PRESET, ds, artifacts, jobs=1, shards=1)
    sharded = run_index(PRESET, ds, artifacts, jobs=1, force=True, shards=3)
    assert whole.parent == sharded.parent and whole.name < sharded.name
    return sharded.parent


def test_a_sharded_version_splits_vectors_and_keypoints_by_id(family: Path) -> None:
    old, new = store.versions(family)
    names = {p.name for p in new.iterdir()}
    assert {"index.s0.faiss", "index.s2.faiss", "verify.s1.npz"} <= names and "index.faiss" not in names
    assert json.loads((new / "manifest.json").read_text())["shards"] == 3
    whole, merged = store.load(old), store.load(new)
    ids_w, xb_w = store.index_contents(whole.index)
    ids_m, xb_m = store.index_contents(merged.index)
    order_w, order_m = np.argsort(ids_w), np.argsort(ids_m)
    assert np.array_equal(ids_w[order_w], ids_m[order_m])
    assert np.array_equal(xb_w[order_w], xb_m[order_m])  # bit for bit
    for i in range(3):
        part = store.load(new, Part(i, 3))
        assert set(part.images) == {j for j in whole.images if j % 3 == i} == set(store.index_ids(part.index))
        assert set(part.verifier.store.ids.tolist()) == set(part.images)
        for j in list(part.images)[:5]:
            a, b = part.verifier.features_of(j), whole.verifier.features_of(j)
            assert np.array_equal(a[0].descriptors, b[0].descriptors) and np.array_equal(a[1], b[1])
    head = store.load(new, Part(None, 3))
    assert head.index.ntotal == 0 and head.images == whole.images
    with pytest.raises(store.IndexLoadError, match="3 shard"):
        store.load(new, Part(0, 2))


def test_a_shard_checks_only_its_own_files(family: Path) -> None:
    new = store.versions(family)[-1]
    victim = new / "index.s2.faiss"
    saved = victim.read_bytes()
    try:
        victim.write_bytes(saved[:-8] + b"corrupt!")
        store.load(new, Part(0, 3))  # another shard's file is that shard's business
        with pytest.raises(store.IndexLoadError, match="checksum"):
            store.load(new, Part(2, 3))
    finally:
        victim.write_bytes(saved)


def test_keypoint_subsets_concatenate_back() -> None:
    from features.orb import OrbFeatures

    rng = np.random.default_rng(0)
    feats = [OrbFeatures(rng.random((n, 2), np.float32), rng.integers(0, 255, (n, 32), np.uint8)) for n in (3, 0, 5, 2)]
    words = [rng.integers(0, 9, len(f.xy)) for f in feats]
    full = MapFeatures.build([10, 11, 12, 13], feats, words)
    even, odd = full.subset(full.ids % 2 == 0), full.subset(full.ids % 2 == 1)
    assert even.ids.tolist() == [10, 12] and even.offsets.tolist() == [0, 3, 8]
    back = MapFeatures.concat([even, odd])
    for i in full.ids:
        r, s = int(np.flatnonzero(full.ids == i)[0]), int(np.flatnonzero(back.ids == i)[0])
        a = full.descriptors[full.offsets[r] : full.offsets[r + 1]]
        assert np.array_equal(a, back.descriptors[back.offsets[s] : back.offsets[s + 1]])


def test_merge_ranks_by_distance_then_id() -> None:
    from retrieval.searcher import Hit

    loc = Location(0.0, 0.0, 0.0)
    a = [Hit(1, 4, "a", 0.9, 1.0, loc), Hit(2, 2, "b", 0.5, 3.0, loc)]
    b = [Hit(1, 1, "c", 0.9, 1.0, loc), Hit(2, 3, "d", 0.7, 2.0, loc)]
    merged = merge_hits([a, b], 3)
    assert [(h.rank, h.id) for h in merged] == [(1, 1), (2, 4), (3, 3)]
    assert by_owner([5, 3, 4, 9], 3) == {2: [0], 0: [1, 3], 1: [2]}


def _servers(family: Path) -> list[ShardServer]:
    return [ShardServer(family, i, 3) for i in range(3)]


def test_the_head_over_its_shards_ranks_as_the_whole_index(family: Path, tiny_data: Path) -> None:
    whole = Searcher(store.load(store.current_version(family)))
    head = head_index(family, 3, LocalShards(_servers(family))).load_now()
    assert head.size == whole.size and head.version == whole.version
    # The head's queries run on its shards; the whole index's on what this process loaded.
    assert isinstance(head.backend, ShardedBackend) and isinstance(whole.backend, LocalBackend)
    assert head.on_demand_files() == []  # the shards read rows of their files, the head none
    ds = load_dataset(tiny_data)
    for path in ds.queries.paths[:6]:
        data = ds.image_path(path).read_bytes()
        want, got = search_image(whole, data, 20).hits, search_image(head, data, 20).hits
        assert [(h.id, h.inliers) for h in got] == [(h.id, h.inliers) for h in want]
        assert np.allclose([h.score for h in got], [h.score for h in want], atol=1e-9)


def test_distinct_inliers_rank_through_the_shards_as_the_whole_index(family: Path, tiny_data: Path) -> None:
    """Weighing each inlier by how distinctive it is takes every shortlisted image's inliers at once,
    which the head gathers from the shards that own them."""
    plain = Searcher(store.load(store.current_version(family)))
    whole = Searcher(store.load(store.current_version(family)))
    head = head_index(family, 3, LocalShards(_servers(family))).load_now()
    for s in (whole, head):
        assert s.verifier is not None
        s.verifier.conf = s.verifier.conf.model_copy(update={"distinct_m": 30.0})
    ds = load_dataset(tiny_data)
    changed = 0
    for q in range(6):
        data = ds.image_path(ds.queries.paths[q]).read_bytes()
        want, got, before = (
            search_image(whole, data, 20).hits,
            search_image(head, data, 20).hits,
            search_image(plain, data, 20).hits,
        )
        assert [(h.id, h.inliers) for h in got] == [(h.id, h.inliers) for h in want]
        assert np.allclose([h.score for h in got], [h.score for h in want], atol=1e-9)
        # The hits report the inliers counted, whatever the score weighs of them.
        counted = {h.id: h.inliers for h in before}
        assert all(counted[h.id] == h.inliers for h in want if h.inliers is not None and h.id in counted)
        changed += not np.allclose(sorted(h.score for h in want), sorted(h.score for h in before))
        e, n, _ = ds.queries.loc[q]
        prior = Prior(float(e) + 10.0, float(n) - 5.0, 150.0, 40.0)
        (near_want, _), (near_got, _) = (
            whole.rank_near(whole.analyze(data), prior, 20),
            head.rank_near(head.analyze(data), prior, 20),
        )
        assert [(h.id, h.inliers) for h in near_got] == [(h.id, h.inliers) for h in near_want]
        assert np.allclose([h.score for h in near_got], [h.score for h in near_want], atol=1e-6)
    assert changed  # the weighing is in effect: some scores move


def test_prior_searches_and_their_evidence_through_the_shards_equal_the_whole_index(
    family: Path, tiny_data: Path
) -> None:
    whole = Searcher(store.load(store.current_version(family)))
    head = head_index(family, 3, LocalShards(_servers(family))).load_now()
    ds = load_dataset(tiny_data)
    for q in range(4):
        data = ds.image_path(ds.queries.paths[q]).read_bytes()
        e, n, _ = ds.queries.loc[q]
        prior = Prior(float(e) + 10.0, float(n) - 5.0, 150.0, 40.0)
        qw, qh = whole.analyze(data), head.analyze(data)
        (want, n_want), (got, n_got) = whole.rank_near(qw, prior, 20), head.rank_near(qh, prior, 20)
        assert n_got == n_want > 0 and len(got) == min(20, n_want)
        assert [(h.id, h.inliers) for h in got] == [(h.id, h.inliers) for h in want]
        assert np.allclose([h.score for h in got], [h.score for h in want], atol=1e-6)
        verified = [h for h in want if h.inliers]
        ids = [h.id for h in verified]
        for h, a, b in zip(verified, whole.evidence(qw, ids), head.evidence(qh, ids), strict=True):
            assert np.array_equal(a.query_xy, b.query_xy) and np.array_equal(a.map_xy, b.map_xy)
            assert len(a.query_xy) == h.inliers  # the evidence is what verification counted


def test_an_add_through_the_head_reaches_the_owning_shard(family: Path, tiny_data: Path) -> None:
    servers = _servers(family)
    head = head_index(family, 3, LocalShards(servers))
    head.load_now()
    ds = load_dataset(tiny_data)
    data = ds.image_path(ds.queries.paths[0]).read_bytes()
    near_it = Prior(1.0, 2.0, 10.0, 5.0)  # nothing of the synthetic map stands there

    def near(searcher: Searcher) -> list[int]:
        return [h.id for h in searcher.rank_near(searcher.analyze(data), near_it, 5)[0]]

    assert near(head.sync()) == []  # and the spatial index is built: the add below extends it
    rec, added = head.add(data, Location(1.0, 2.0, 30.0))
    assert added
    assert near(head.sync()) == [rec.id]  # in the spatial index at once
    owner = rec.id % 3
    try:
        assert rec.id in servers[owner].live.sync().images
        assert all(rec.id not in servers[i].live.sync().images for i in range(3) if i != owner)
        # Another head (another replica) sees it on its next request, through the change log.
        other = head_index(family, 3, LocalShards(servers))
        other.load_now()
        hits = search_image(other.sync(), data, 5).hits
        assert hits[0].id == rec.id and hits[0].path == rec.path
    finally:
        head.delete(rec.id)
    assert rec.id not in servers[owner].live.sync().images
    assert rec.id not in [h.id for h in search_image(head.sync(), data, 5).hits]
    assert near(head.sync()) == []


def test_a_shard_refuses_a_version_it_no_longer_holds(family: Path) -> None:
    server = ShardServer(family, 0, 3)
    old = store.versions(family)[0].name
    with pytest.raises(NotReadyError, match="does not hold index version"):
        server.at(old, wait=0.2)
    with pytest.raises(ValueError, match="does not own"):
        empty = OrbFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8))
        server.inliers(server.live.sync().version, empty, np.zeros(0, np.int64), [1])


def test_a_head_needs_shards(family: Path) -> None:
    with pytest.raises(ValueError, match="ShardClient"):
        LiveIndex(family, Part(None, 3)).load_now()


def test_the_serve_application_has_one_deployment_per_shard(family: Path, tiny_data: Path) -> None:
    """What `serve deploy` builds from `cluster.serving:app_builder` (deployed for real in tests/e2e/test_ray.py)."""
    from pydantic import ValidationError

    from cluster.serving import app_builder

    artifacts = family.parent.parent
    app = app_builder({"data": str(tiny_data), "artifacts": str(artifacts), "preset": PRESET, "replicas": 3})
    ingress = app._bound_deployment  # Serve's own attribute: what the application deploys
    settings, admin_key, shards = ingress.init_args
    assert ingress.name == "Ingress" and ingress.num_replicas == 3 and admin_key is None
    assert settings["preset"] == PRESET and Path(settings["artifacts"]).is_absolute()
    assert [s._bound_deployment.name for s in shards] == ["Shard0", "Shard1", "Shard2"]
    assert [s._bound_deployment.init_args[1:] for s in shards] == [(0, 3), (1, 3), (2, 3)]
    assert [s._bound_deployment.num_replicas for s in shards] == [2, 2, 2]  # a lost replica costs no search
    # Every ingress replica keeps its metrics in one folder of the artifacts, so /metrics sums them.
    env = ingress.ray_actor_options["runtime_env"]["env_vars"]
    assert Path(env["PROMETHEUS_MULTIPROC_DIR"]).is_dir() and Path(env["PROMETHEUS_MULTIPROC_DIR"]).is_relative_to(
        artifacts
    )
    scaled = app_builder({"data": str(tiny_data), "artifacts": str(artifacts), "preset": PRESET, "shard_replicas": 3})
    assert [s._bound_deployment.num_replicas for s in scaled._bound_deployment.init_args[2]] == [3, 3, 3]
    assert scaled._bound_deployment._deployment_config.autoscaling_config.max_replicas == 4
    with pytest.raises(ValidationError, match="unknown preset"):
        app_builder({"data": str(tiny_data), "artifacts": str(artifacts), "preset": "nope"})


class _Replica:
    """A shard replica as a Serve handle's response sees it: dead, slow or answering."""

    def __init__(self, kind: str, value: object = None, delay: float = 0.0) -> None:
        self.kind, self.value, self.delay = kind, value, delay

    def result(self, timeout_s: float) -> object:
        import time

        from ray.exceptions import RayActorError

        if self.kind == "dead":
            raise RayActorError()
        if self.delay > timeout_s:
            time.sleep(timeout_s)
            raise TimeoutError
        time.sleep(self.delay)
        return self.value


class _Handle:
    """A deployment handle whose calls go, in turn, to the given replicas (Serve picks one per call)."""

    def __init__(self, *replicas: _Replica) -> None:
        self.replicas, self.sent = list(replicas), 0
        self.inliers = self

    def remote(self, *_args: object) -> _Replica:
        replica = self.replicas[min(self.sent, len(self.replicas) - 1)]
        self.sent += 1
        return replica


def test_a_failed_or_slow_shard_call_goes_again_and_a_search_has_one_deadline() -> None:
    import time

    from cluster.serving import RayShards

    empty = OrbFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8))
    words = np.zeros(0, np.int64)
    # Shard 0's first replica is dead, shard 1's is slow: both answer through another replica.
    h0 = _Handle(_Replica("dead"), _Replica("ok", [7]))
    h1 = _Handle(_Replica("ok", [9], delay=5.0), _Replica("ok", [3]))
    shards = RayShards([h0, h1], deadline_s=3.0, attempt_s=0.3)
    with shards.deadline():
        assert shards.inliers("v", empty, words, [4, 5]).tolist() == [7, 3]
    assert (h0.sent, h1.sent) == (2, 2)
    # No replica answers: a clean NotReadyError once the search's one deadline has passed, however
    # many calls it made (here two shards, each retried).
    gone = RayShards([_Handle(_Replica("dead")), _Handle(_Replica("ok", [1], delay=60.0))], 1.0, 0.2)
    t0 = time.monotonic()
    with gone.deadline(), pytest.raises(NotReadyError, match="did not answer in time"):
        gone.inliers("v", empty, words, [0, 1])
        gone.inliers("v", empty, words, [0, 1])
    assert time.monotonic() - t0 < 1.6


class LocalEngine:
    """The Ray engine's shard writers and staged shard servers (cluster/indexing.py), in this process:
    the same part files, shard tasks and publishing, without a cluster. `lose` drops one part file."""

    def __init__(self, lose: bool = False) -> None:
        self.lose = lose

    def write(self, conf, dataset, vectorizer_file: Path, encoder_file: Path, directory: Path, shards: int):
        from cluster.indexing import PARTS, PartWriter, write_shard
        from indexer.build import WrittenShards

        parts = directory / PARTS
        parts.mkdir()
        writer = PartWriter(conf, str(vectorizer_file), str(encoder_file), str(parts), shards)
        n = len(dataset.database)
        paths = np.array([str(dataset.image_path(p)) for p in dataset.database.paths])
        ok = np.zeros(n, bool)
        for start in range(0, n, 7):  # batches that do not line up with the shards
            ids = np.arange(start, min(n, start + 7))
            out = writer({"id": ids, "path": paths[ids]})
            ok[out["id"]] = out["ok"]
        if self.lose:
            next(parts.glob("s1-*.emb.npz")).unlink()
        written = [write_shard(conf, str(parts), str(directory), s, shards, n) for s in range(shards)]
        shutil.rmtree(parts)
        return WrittenShards(ok, [k for k, _ in written], {k: v for _, sums in written for k, v in sums.items()})

    @contextlib.contextmanager
    def serve(self, directory: Path, shards: int):
        yield LocalShards([StagedShardServer(directory, s, shards) for s in range(shards)])


def test_shards_written_by_workers_publish_the_version_the_embedded_build_does(
    family: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver gets no vectors: the writers' part files become each shard's files, the heads are
    fitted through the staged shards, and the version equals the one built in memory."""
    import cluster.indexing
    from cli.stages import run_index

    monkeypatch.setattr(cluster.indexing, "single_threaded_kernels", lambda: None)  # this process's threads
    artifacts = family.parent.parent
    ds = load_dataset(tiny_data)
    before = store.versions(family)[-1]
    written = run_index(PRESET, ds, artifacts, jobs=1, force=True, shards=3, engine=LocalEngine())
    assert written.parent == family and written.name > before.name
    assert not [p for p in family.iterdir() if p.name.startswith(".v-")]  # the staging folder was renamed in
    a, b = store.load(before), store.load(written)
    assert a.images == b.images and a.manifest["index_kinds"] == b.manifest["index_kinds"]
    ids_a, xa = store.index_contents(a.index)
    ids_b, xb = store.index_contents(b.index)
    assert np.array_equal(np.sort(ids_a), np.sort(ids_b))
    assert np.allclose(xa[np.argsort(ids_a)], xb[np.argsort(ids_b)], rtol=0, atol=1e-5)
    for i in range(3):
        pa, pb = (MapFeatures.load(v / f"verify.s{i}.npz") for v in (before, written))
        for field in ("ids", "offsets", "xy", "descriptors", "words", "angles"):
            assert np.array_equal(getattr(pa, field), getattr(pb, field), equal_nan=True), field
    assert np.allclose(a.manifest["verify_head"], b.manifest["verify_head"], atol=1e-4)
    assert a.manifest["location_head"] == pytest.approx(b.manifest["location_head"], abs=1e-4)


def test_a_lost_part_publishes_nothing(family: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cluster.indexing
    from cli.stages import run_index

    monkeypatch.setattr(cluster.indexing, "single_threaded_kernels", lambda: None)
    current = store.current_version(family)
    with pytest.raises(RuntimeError, match="shard 1: the parts hold"):
        run_index(PRESET, load_dataset(tiny_data), family.parent.parent, 1, True, 3, LocalEngine(lose=True))
    assert store.current_version(family) == current
    assert not [p for p in family.iterdir() if p.name.startswith(".v-")]
