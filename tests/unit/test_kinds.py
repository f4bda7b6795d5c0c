"""The served index by collection size (indexer/kinds.py): exact below the threshold, two stages of
PQ codes with exact re-rank above it, persisted, sharded, and kept in step with online changes."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from common.pipeline import IndexConf
from dataset.layout import Location
from indexer import store
from indexer.kinds import EXACT, PQ, PQIndex, build_index, index_kind, owned_fine_codes
from retrieval.live import LiveIndex, compact
from retrieval.searcher import Searcher

# Coarse codes of 8 sub-quantizers find 300 candidates, finer codes of 16 order them, 100 re-ranked.
PQ_CONF = IndexConf(kind="auto", exact_below=1000, m=16, coarse_m=8, shortlist=300, rerank=100, train_size=4096)
# The smallest two stages (for vectors of 4 dimensions).
TINY_PQ = {"m": 2, "coarse_m": 1}


def clustered(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    """Unit vectors around n // 10 places, as photos of places are."""
    rng = np.random.default_rng(seed)
    places = rng.normal(size=(max(1, n // 10), d))
    x = places[rng.integers(len(places), size=n)] + 0.3 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute(xb: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d2 = ((xb[None, :, :] - q[:, None, :]) ** 2).sum(axis=2)
    top = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d2, top, axis=1), ids[top]


def test_the_kind_follows_the_collection_size() -> None:
    assert index_kind(PQ_CONF, 999) == EXACT and index_kind(PQ_CONF, 1000) == PQ
    assert index_kind(IndexConf(kind="exact"), 10**7) == EXACT  # a kind named outright
    assert index_kind(IndexConf(kind="pq"), 10) == PQ
    with pytest.raises(ValueError, match="kind"):
        IndexConf.model_validate({"kind": "hnsw"})
    xb = clustered(1200)
    assert isinstance(build_index(PQ_CONF, xb, np.arange(1200)), PQIndex)
    small = build_index(PQ_CONF, xb[:500], np.arange(500))
    assert isinstance(small, faiss.Index) and small.ntotal == 500


def test_fast_scan_shortlist_reranked_exactly_finds_the_true_neighbours() -> None:
    both = clustered(5200)  # queries are new photos of the map's places
    xb, q = both[:5000], both[5000:]
    ids = np.arange(5000, dtype=np.int64) * 7 + 3  # ids are not row numbers
    index = PQIndex.build(xb, ids, PQ_CONF)
    d2, found = index.search(q, 10)
    _, truth = brute(xb, ids, q, 10)
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.95
    # The distances are the exact ones of the ids returned (re-ranked against the float vectors).
    rows = (found - 3) // 7
    assert np.allclose(d2, ((xb[rows] - q[:, None, :]) ** 2).sum(axis=2), atol=1e-5)
    assert np.all(np.diff(d2, axis=1) >= 0)
    # Without the re-rank (the fine codes' top 10 alone) the PQ order is far worse: the re-rank does the work.
    rough = PQIndex(index.codes, index.fine, index.slot_ids, index.base, 0, index.shortlist)
    rough_recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(rough.search(q, 10)[1], truth, strict=True)])
    assert rough_recall < recall - 0.1
    # Asking for more than there is pads with -1.
    d2, found = PQIndex.build(xb[:20], ids[:20], PQ_CONF.model_copy(update={"train_size": 20})).search(q[:1], 30)
    assert (found[0, :20] >= 0).all() and (found[0, 20:] == -1).all() and np.isinf(d2[0, 20:]).all()


def test_online_adds_and_deletes_keep_the_codes_in_step_on_a_copy() -> None:
    xb, ids = clustered(3000), np.arange(3000, dtype=np.int64)
    index = PQIndex.build(xb, ids, PQ_CONF)
    changed = index.copy()
    new = clustered(3005)[3000:]
    changed.add_with_ids(new, np.array([5000, 5001, 5002, 5003, 5004]))
    assert changed.remove_ids(np.array([10, 11, 5004])) == 3
    d2, found = changed.search(new[:4], 1)
    assert found[:, 0].tolist() == [5000, 5001, 5002, 5003] and np.allclose(d2, 0, atol=1e-6)
    assert 10 not in changed.search(xb[10:11], 50)[1] and 5004 not in changed.search(new[4:], 50)[1]
    assert changed.ntotal == 3000 + 5 - 3
    # The served one is untouched: a request searching it meanwhile sees the version as it was.
    assert index.ntotal == 3000 and index.search(xb[10:11], 1)[1][0, 0] == 10
    assert 5000 not in index.search(new[:1], 50)[1]
    assert index.added == [] and index.added_slot == {} and index.codes.ntotal == index.fine.ntotal == 3000
    # A re-added id (an image replaced) serves its new vector, not the stored one.
    changed.remove_ids(np.array([7]))
    changed.add_with_ids(new[:1], np.array([7]))
    assert changed.search(new[:1], 2)[1][0].tolist()[:2] in ([5000, 7], [7, 5000])
    assert np.array_equal(changed.vectors_of(np.array([7]))[0], new[0])
    with pytest.raises(ValueError, match="served already"):
        changed.add_with_ids(new[:1], np.array([7]))
    # Deletes first, adds after (what FAISS's own fast-scan remove_ids gets wrong): all still found.
    other = index.copy()
    other.remove_ids(np.array([10, 11]))
    other.add_with_ids(new, np.array([6000, 6001, 6002, 6003, 6004]))
    assert other.search(new, 1)[1][:, 0].tolist() == [6000, 6001, 6002, 6003, 6004]


def test_only_the_two_stage_layout_is_built() -> None:
    xb, ids = clustered(1200), np.arange(1200)
    for conf, refused in [
        (PQ_CONF.model_copy(update={"coarse_m": 0}), "coarse_m=0 must be above 0"),  # one stage of m
        (PQ_CONF.model_copy(update={"coarse_m": 16}), "below m=16"),
        (PQ_CONF.model_copy(update={"coarse_m": 5}), "does not split into coarse_m=5"),
    ]:
        with pytest.raises(ValueError, match=refused):
            build_index(conf, xb, ids)
    # Codes in cells of a coarse k-means are no setting of the index conf.
    with pytest.raises(ValueError, match="nlist"):
        IndexConf.model_validate(PQ_CONF.model_dump() | {"nlist": 16})
    assert isinstance(build_index(PQ_CONF, xb, ids), PQIndex)


def test_two_stage_scan_orders_the_coarse_shortlist_by_fine_codes(tmp_path: Path) -> None:
    both = clustered(5200)
    xb, q = both[:5000], both[5000:]
    ids = np.arange(5000, dtype=np.int64) * 7 + 3
    index = PQIndex.build(xb, ids, PQ_CONF)
    assert (index.codes.pq.M, index.fine.pq.M, index.shortlist) == (8, 16, 300)
    assert index.codes.bbs == 64  # blocks of 64 codes scan faster than FAISS's default 32
    _, truth = brute(xb, ids, q, 10)
    found = index.search(q, 10)[1]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.95
    # The fine stage does the work: the coarse codes' own nearest 100 re-ranked (a shortlist no deeper
    # than the re-rank, so the fine order changes nothing) find fewer.
    coarse = PQIndex(index.codes, index.fine, index.slot_ids, index.base, 100, 100)
    coarse_found = coarse.search(q, 10)[1]
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(coarse_found, truth, strict=True)]) < recall
    # Past the exactly re-ranked head (k > rerank): the fine order, the row still sorted, no id twice.
    deep = PQIndex(index.codes, index.fine, index.slot_ids, index.base, 20, 300)
    d2, found = deep.search(q[:5], 60)
    rows = (found - 3) // 7
    exact = ((xb[rows] - q[:5, None, :]) ** 2).sum(axis=2)
    assert np.allclose(d2[:, :20], exact[:, :20], atol=1e-5) and not np.allclose(d2[:, 20:], exact[:, 20:])
    assert np.all(np.diff(d2, axis=1) >= 0) and all(len(set(r)) == 60 for r in found)
    # Past the head, a distance is the query's distance to its fine code's reconstruction (or the
    # head's last, where that is smaller).
    recon = index.fine.reconstruct_batch(rows[:, 20:].ravel()).reshape(5, 40, -1)
    fine_d2 = ((recon - q[:5, None, :]) ** 2).sum(axis=2)
    assert np.allclose(d2[:, 20:], np.maximum(fine_d2, d2[:, 19:20]), rtol=1e-4)
    # Saved with its fine codes and shortlist; after online changes, the codes of the live vectors.
    index.save(tmp_path / "index.faiss", tmp_path / "vectors.npz")
    back = PQIndex.load(tmp_path / "index.faiss", tmp_path / "vectors.npz")
    assert back.shortlist == 300 and back.mapped  # shared by the workers
    assert np.array_equal(back.search(q, 10)[1], index.search(q, 10)[1])
    # An add to the mapped version itself (FAISS would abort) makes its codes its own first.
    own = PQIndex.load(tmp_path / "index.faiss", tmp_path / "vectors.npz")
    own.add_with_ids(q[:1], np.array([1]))
    assert not own.mapped and own.fine.ntotal == own.codes.ntotal == 5001 and own.search(q[:1], 1)[1][0, 0] == 1
    assert back.fine.ntotal == 5000
    # So does a version written from the mapped one after a delete alone.
    cut = PQIndex.load(tmp_path / "index.faiss", tmp_path / "vectors.npz")
    cut.remove_ids(ids[:10])
    cut.save(tmp_path / "cut.faiss", tmp_path / "cut.npz")
    assert PQIndex.load(tmp_path / "cut.faiss", tmp_path / "cut.npz").fine.ntotal == 4990
    changed = back.copy()
    changed.remove_ids(ids[:100])
    changed.add_with_ids(q[:3], np.array([1, 2, 4]))
    changed.save(tmp_path / "index2.faiss", tmp_path / "vectors2.npz")
    again = PQIndex.load(tmp_path / "index2.faiss", tmp_path / "vectors2.npz")
    assert again.fine.ntotal == again.ntotal == 4903
    assert again.search(q[:3], 1)[1][:, 0].tolist() == [1, 2, 4]
    # The coarse codes are written again in id order, so the shortlist's ties may fall otherwise.
    same = [
        len(set(a) & set(b)) / 10 for a, b in zip(again.search(q[3:], 10)[1], changed.search(q[3:], 10)[1], strict=True)
    ]
    assert np.mean(same) >= 0.98


def test_files_of_earlier_layouts_are_refused_with_a_rebuild(tmp_path: Path) -> None:
    xb = clustered(2000)
    index = PQIndex.build(xb, np.arange(2000), PQ_CONF)
    index.save(tmp_path / "index.faiss", tmp_path / "vectors.npz")
    plain = {"ids": np.arange(2000), "vectors": xb, "rerank": np.array(100)}
    pq = index.fine.pq
    fine_arrays = {
        "fine_centroids": faiss.vector_to_array(pq.centroids).reshape(pq.M, -1),
        "fine_codes": faiss.vector_to_array(index.fine.codes).reshape(index.fine.ntotal, pq.code_size),
    }
    cells = faiss.IndexIVFPQFastScan(faiss.IndexFlatL2(32), 32, 8, 8, 4)
    cells.train(xb)
    cells.add(xb)
    layouts = {
        # one stage: fast-scan codes alone, no shortlist
        "one-stage": (index.codes, plain),
        # 8e50106: the coarse codes alone in index.faiss, the fine ones in vectors.npz
        "fine-in-vectors": (index.codes, plain | {"shortlist": np.array(300)} | fine_arrays),
        # codes in cells of a coarse k-means
        "cells": (cells, plain),
        # the two stages over codes in cells
        "cells-two-stage": (faiss.IndexRefine(cells, index.fine), plain | {"shortlist": np.array(300)}),
        # the two stages, but vectors.npz of one stage (no shortlist)
        "no-shortlist": (index.refine, plain),
    }
    for name, (codes, arrays) in layouts.items():
        faiss.write_index(codes, str(tmp_path / f"{name}.faiss"))
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(ValueError, match=r"rebuild the index \(`imgsearch build`\)"):
            PQIndex.load(tmp_path / f"{name}.faiss", tmp_path / f"{name}.npz")
    # Fewer fine codes than vectors: refused too.
    coarse, fewer = faiss.clone_index(index.codes), owned_fine_codes(index.fine, with_codes=False)
    coarse.reset()
    coarse.add(xb[:1500])
    fewer.add(xb[:1500])
    both = faiss.IndexRefine(coarse, fewer)
    coarse.add(xb[1500:])  # the coarse codes alone: FAISS writes what it is given
    faiss.write_index(both, str(tmp_path / "fewer.faiss"))
    with pytest.raises(ValueError, match="1500 fine codes for 2000"):
        PQIndex.load(tmp_path / "fewer.faiss", tmp_path / "vectors.npz")
    assert PQIndex.load(tmp_path / "index.faiss", tmp_path / "vectors.npz").ntotal == 2000


def publish_pq(tmp_path: Path, shards: int = 1) -> tuple[Path, np.ndarray]:
    from model.vectorize import Vectorizer
    from tests.unit.test_store import VECTOR_CONF, encoder_file, version_pipeline

    xb = clustered(1500, d=4)
    ids = np.arange(1500, dtype=np.int64)
    images = [store.ImageRecord(int(i), f"database/images/{i}.jpg", Location(1.0 * i, 2.0, 90.0)) for i in ids]
    files = {
        "encoder.npz": encoder_file(tmp_path, 4),
        "vectorizer.npz": Vectorizer(VECTOR_CONF).save(tmp_path / "vectorizer.npz"),
    }
    conf = version_pipeline(PQ_CONF.model_copy(update=TINY_PQ | {"exact_below": 600}))
    index = build_index(conf.index, xb, ids)
    store.publish(tmp_path / "family", index, images, files, {"preset": "t", "conf": conf.to_json()}, shards)
    return tmp_path / "family", xb


def test_a_pq_version_is_published_loaded_and_checked(tmp_path: Path) -> None:
    family, xb = publish_pq(tmp_path)
    version = store.current_version(family)
    manifest = store.load(version).manifest
    assert manifest["index_kinds"] == [PQ] and "vectors.npz" in manifest["checksums"]
    loaded = store.load(version)
    assert isinstance(loaded.index, PQIndex) and isinstance(loaded.index.base, np.memmap)  # read on demand
    assert loaded.index.search(xb[42:43], 1)[1][0, 0] == 42
    # What a search reads rows of, for the read-ahead before it serves (retrieval/live.py: read_ahead_rows).
    assert [f.resolve() for f in Searcher(loaded).on_demand_files()] == [(version / "vectors.npz").resolve()]
    assert PQIndex.build(clustered(1100), np.arange(1100), PQ_CONF).on_demand_files() == []  # in memory: none
    # Two shards of 750 each: above the threshold of 600, each shard is a PQ index of its own.
    family2, _ = publish_pq(tmp_path / "sharded", shards=2)
    v2 = store.current_version(family2)
    assert store.load(v2, store.Part(1, 2)).manifest["index_kinds"] == [PQ, PQ]
    shard = store.load(v2, store.Part(1, 2)).index
    assert isinstance(shard, PQIndex) and set(shard.ids().tolist()) == set(range(1, 1500, 2))
    # The float vectors are checked like every other file: an altered one is refused.
    vec = version / "vectors.npz"
    data = bytearray(vec.read_bytes())
    data[-8:] = b"\x00" * 8
    vec.write_bytes(bytes(data))
    with pytest.raises(store.IndexLoadError, match="checksum"):
        store.load(version)


def test_the_living_index_serves_online_changes_of_a_pq_version(
    tiny_artifacts: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import retrieval.live

    asked: list[list[Path]] = []  # what each version loaded asked to read ahead, before serving
    real = retrieval.live.read_ahead

    def recording(paths: list[Path]) -> int:
        asked.append([p.resolve() for p in paths])
        return real(paths)

    monkeypatch.setattr(retrieval.live, "read_ahead", recording)
    artifacts = Path(shutil.copytree(tiny_artifacts, tmp_path / "artifacts"))
    family = store.index_family(artifacts, tiny_data, "paper")
    # The tiny map republished as a fast-scan PQ version (its threshold set below its size).
    loaded = store.load(store.current_version(family))
    ids, xb = store.index_contents(loaded.index)
    pq = PQ_CONF.model_copy(update=TINY_PQ | {"exact_below": 1, "train_size": len(ids)})
    conf = loaded.pipeline.model_copy(update={"index": pq})
    files = {n: loaded.directory / n for n in ("vectorizer.npz", "encoder.npz", "split.json")}
    skip = ("version", "count", "dim", "checksums", "shards", "index_kinds")
    manifest = {k: v for k, v in loaded.manifest.items() if k not in skip} | {"conf": conf.to_json()}
    images = [loaded.images[i] for i in sorted(loaded.images)]
    store.publish(family, build_index(conf.index, xb, ids), images, files, manifest)
    live = LiveIndex(family)
    before = live.load_now()
    assert isinstance(before.index, PQIndex)
    first = store.current_version(family)
    assert asked == [[(first / "vectors.npz").resolve()]]  # "paper" does not verify: no keypoints
    img = sorted((tiny_data / "query" / "images").iterdir())[0].read_bytes()
    rec, added = live.add(img, Location(700010.5, 5710003.25, 42.5))
    assert added
    after = live.sync()
    assert after is not None and isinstance(after.index, PQIndex) and after.size == before.size + 1
    query = after.analyze(img)
    assert after.search_embedding(query.embedding, 1)[0].id == rec.id  # its code was added
    assert rec.id not in {h.id for h in before.search_embedding(query.embedding, before.size)}
    gone = int(ids[0])
    live.delete(gone)
    now = live.sync()
    assert now is not None and gone not in {h.id for h in now.search_embedding(query.embedding, now.size)}
    # Compaction folds the changes into a new PQ version: its codes and vectors hold the added image.
    out = compact(family)
    folded = store.load(out)
    assert folded.manifest["index_kinds"] == [PQ] and rec.id in set(folded.index.ids().tolist())
    assert gone not in set(folded.index.ids().tolist())
    # The compacted version is read ahead by the loader too, before it is swapped in.
    deadline = time.monotonic() + 30
    while live.sync().version != out.name and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live.sync().version == out.name and asked[-1][0] == (out / "vectors.npz").resolve()


def test_a_sharded_pq_version_loaded_whole_searches_each_shard_with_its_own_codes(tmp_path: Path) -> None:
    """The embedded engine serves a sharded PQ version as the sharded engines do: each shard's codes,
    merged by distance (not new codes trained on the merge), and its online changes go to the owner."""
    from indexer.kinds import PartsIndex
    from retrieval.shards import merge_hits

    family, xb = publish_pq(tmp_path, shards=2)
    version = store.current_version(family)
    whole = store.load(version).index
    assert isinstance(whole, PartsIndex) and whole.ntotal == 1500 and whole.d == 4
    shards = [Searcher(store.load(version, store.Part(s, 2))) for s in (0, 1)]
    rng = np.random.default_rng(3)
    queries = xb[rng.choice(1500, 20, replace=False)] + rng.normal(0, 0.05, (20, 4)).astype(np.float32)
    for q in queries:
        d2, ids = whole.search(q[None, :], 30)
        merged = merge_hits([s.search_embedding(q[None, :], 30) for s in shards], 30)
        assert ids[0].tolist() == [h.id for h in merged]
        assert np.allclose(np.sqrt(d2[0]), [h.distance for h in merged], atol=1e-5)
        assert np.all(np.diff(d2[0]) >= 0)
    assert np.array_equal(np.sort(whole.ids()), np.arange(1500))
    assert np.array_equal(whole.vectors_of(np.array([7, 8, 1499])), xb[[7, 8, 1499]])
    # A change goes to a copy, into the part that owns each id; the served one is untouched.
    changed = whole.copy()
    new = np.array([[9.0, 9.0, 9.0, 9.0], [-9.0, -9.0, -9.0, -9.0]], np.float32)
    changed.add_with_ids(new, np.array([1500, 1501]))
    assert changed.remove_ids(np.array([3, 4, 99999])) == 2
    assert changed.ntotal == 1500 and whole.ntotal == 1500
    assert changed.search(new[:1], 1)[1][0, 0] == 1500 and 1501 in changed.parts[1].ids()
    assert not {3, 4} & set(changed.ids().tolist()) and {3, 4} <= set(whole.ids().tolist())
    # What a republish reads of it (index_contents) holds the changes.
    ids, vectors = store.index_contents(changed)
    assert set(ids.tolist()) == (set(range(1500)) - {3, 4}) | {1500, 1501}
    assert np.array_equal(vectors[ids == 1501][0], new[1])
