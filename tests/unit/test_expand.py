"""Verified spatial expansion (retrieval/searcher.py: expand_place) on hand-built hits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.pipeline import DEFAULT_PRESET, ExpandConf, get_pipeline
from dataset.layout import Location
from retrieval.searcher import Hit, expand_place

# The default pipeline's expansion: 16 inliers, 25 m, 40 degrees, a pool of 200.
EXPAND = ExpandConf(min_inliers=16, radius_m=25.0, heading_deg=40.0, pool=200)
assert get_pipeline(DEFAULT_PRESET).expand == EXPAND


def hit(i: int, score: float, east: float, heading: float, inliers: int | None) -> Hit:
    return Hit(0, i, f"m{i}.jpg", score, 1.0 - score, Location(east, 0.0, heading), inliers)


def test_neighbours_of_a_strong_top_hit_are_lifted_by_the_prior() -> None:
    top = hit(1, 0.9, 0.0, 90.0, 40)
    weak = hit(2, 0.2, 500.0, 90.0, 7)  # verified, far away: stays where it is
    near_verified = hit(3, 0.1, 10.0, 100.0, 6)  # verified, 10 m away, 10 degrees turned
    near_tail = hit(4, 0.05, -20.0, 60.0, None)  # not verified, 20 m, 30 degrees
    turned = hit(5, 0.05, 5.0, 180.0, None)  # near but looking elsewhere (90 degrees)
    far_tail = hit(6, 0.05, 300.0, 90.0, None)
    block, rest = expand_place([top, weak, near_verified], [near_tail, turned, far_tail], EXPAND, 0.5)
    assert [h.id for h in block] == [1, 3, 4, 2]
    assert [h.score for h in block[1:3]] == [0.45, 0.45]  # prior x top score
    assert block[1].inliers == 6 and block[2].inliers is None  # evidence is not invented
    assert [h.id for h in rest] == [5, 6]
    assert [h.score for h in block] == sorted((h.score for h in block), reverse=True)


def test_a_weak_top_hit_expands_nothing() -> None:
    top = hit(1, 0.6, 0.0, 90.0, EXPAND.min_inliers - 1)
    verified, tail = [top, hit(2, 0.1, 5.0, 90.0, 3)], [hit(3, 0.05, 1.0, 90.0, None)]
    assert expand_place(verified, tail, EXPAND, 0.9) == (verified, tail)
    assert expand_place([], tail, EXPAND, 0.9) == ([], tail)


def test_a_neighbour_scoring_higher_keeps_its_own_score() -> None:
    top = hit(1, 0.9, 0.0, 0.0, 30)
    strong = hit(2, 0.8, 3.0, 350.0, 25)  # near and already above prior x top score
    block, _ = expand_place([top, strong], [], EXPAND, 0.5)
    assert [(h.id, h.score) for h in block] == [(1, 0.9), (2, 0.8)]


def test_default_index_fits_the_prior_and_lifts_the_found_place(tiny_data: Path, tmp_path: Path) -> None:
    from cli.stages import build_all
    from dataset.layout import load_dataset
    from indexer import store
    from retrieval.query import search_image
    from retrieval.searcher import Searcher

    version = build_all(tiny_data, tmp_path, DEFAULT_PRESET, jobs=1)
    searcher = Searcher(store.load(version))
    manifest = json.loads((version / "manifest.json").read_text())
    prior = manifest["verify_expand_prior"]
    assert 0 < prior < 1 and searcher.verifier.expand_prior == prior
    # The location head is fitted beside the prior and served with the index.
    head = manifest["location_head"]
    assert len(head) == 2 and head[0] >= 0 and searcher.location_head == head
    # Verify a short shortlist: on 60 map images the default's first stage already ranks every view
    # of a place within its verified 50, leaving the expansion nothing to lift from the tail.
    searcher.verifier.conf = searcher.verifier.conf.model_copy(update={"n": 8})
    ds = load_dataset(tiny_data)
    spec = searcher.verifier.expand
    assert spec is not None and spec == searcher.pipeline.expand
    lifted_somewhere = False
    for path in ds.queries.paths[:8]:
        hits = search_image(searcher, ds.image_path(path).read_bytes(), 30).hits
        verified_n = searcher.verifier.conf.n
        plain = searcher.rank(searcher.analyze(ds.image_path(path).read_bytes()), 30, expand=False)
        assert [h.id for h in plain][:1] == [h.id for h in hits][:1]  # the top hit never moves
        if hits[0].inliers is None or hits[0].inliers < spec.min_inliers:
            assert [h.id for h in hits] == [h.id for h in plain]
            continue
        top = hits[0]

        def at_place(h: Hit, top: Hit = top) -> bool:
            dist = np.hypot(h.location.easting - top.location.easting, h.location.northing - top.location.northing)
            turn = abs((h.location.heading - top.location.heading + 180) % 360 - 180)
            return bool(dist < spec.radius_m and turn < spec.heading_deg)

        block = [h for h in hits if h.inliers is not None or at_place(h)]
        assert [h.score for h in block] == sorted((h.score for h in block), reverse=True)
        lifted = [i for i, h in enumerate(hits) if h.inliers is None and at_place(h)]
        others = [i for i, h in enumerate(hits) if h.inliers is None and not at_place(h)]
        assert all(hits[i].score >= prior * top.score - 1e-12 for i in lifted)
        assert not lifted or not others or max(lifted) < min(others)
        lifted_somewhere |= bool(lifted)
        # Lifted hits take places in the top k that verified ones had: never more verified than n.
        assert 0 < sum(h.inliers is not None for h in hits) <= min(verified_n, len(hits))
    assert lifted_somewhere
