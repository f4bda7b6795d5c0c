"""The location answer: a weighted vote of the hits near the best one, or "unknown"."""

from __future__ import annotations

import numpy as np
import pytest

from dataset.layout import Location
from evaluation.evaluate import localisation_summary
from retrieval.locate import estimate_location
from retrieval.searcher import Hit


def hit(rank: int, score: float, e: float, n: float, heading: float) -> Hit:
    return Hit(rank, rank, f"database/images/{rank}.jpg", score, 1.0, Location(e, n, heading))


def test_estimate_is_score_weighted_mean_near_the_best_hit() -> None:
    hits = [
        hit(1, 0.9, 699400.0, 5709840.0, 350.0),
        hit(2, 0.6, 699410.0, 5709840.0, 10.0),  # 10 m away: votes
        hit(3, 0.8, 699700.0, 5709840.0, 90.0),  # 300 m away: another place, ignored
    ]
    est = estimate_location(hits, utm_epsg=32630)
    assert est.status == "estimated" and est.support == 2 and est.confidence == pytest.approx(0.9)
    assert est.easting == pytest.approx((0.9 * 699400 + 0.6 * 699410) / 1.5)
    assert est.northing == pytest.approx(5709840.0)
    # Circular mean of 350 and 10 degrees is near 0, not 180.
    assert min(est.heading, 360 - est.heading) < 5
    # UTM 30N to WGS84: central London.
    assert est.latitude == pytest.approx(51.5044, abs=1e-3) and est.longitude == pytest.approx(-0.1265, abs=1e-3)


def test_unlikely_hits_give_unknown() -> None:
    est = estimate_location([hit(1, 0.3, 0.0, 0.0, 0.0)], utm_epsg=32630)
    assert est.status == "unknown" and est.easting is None and est.confidence == pytest.approx(0.3)
    assert estimate_location([], utm_epsg=32630).status == "unknown"


def test_localisation_summary() -> None:
    s = localisation_summary(np.array([5.0, 30.0, np.nan, 10.0]))
    assert s == {"localisation_answered": 0.75, "localisation_median_m": 10.0, "localised_within_25m": 0.5}
    assert localisation_summary(np.array([np.nan]))["localisation_median_m"] is None


def test_the_location_head_recalibrates_the_best_score() -> None:
    from retrieval.locate import location_confidence

    hits = [hit(1, 0.3, 699400.0, 5709840.0, 0.0), hit(2, 0.2, 699405.0, 5709840.0, 0.0)]
    # logit(0.3) = -0.847; head [1, 1.5]: sigmoid(0.653) = 0.658, over the 0.5 bar: answered.
    est = estimate_location(hits, utm_epsg=32630, head=[1.0, 1.5])
    assert est.status == "estimated" and est.confidence == pytest.approx(0.6577, abs=1e-3)
    assert est.support == 2
    # The identity head [1, 0] gives the score back; a steeper one spreads scores around 0.5.
    assert location_confidence(0.3, [1.0, 0.0]) == pytest.approx(0.3)
    assert location_confidence(0.3, [3.0, 0.0]) < 0.3 < 0.7 < location_confidence(0.7, [3.0, 0.0])
    assert location_confidence(0.0, [1.0, 0.0]) == pytest.approx(0.0, abs=1e-6)  # no log(0)


def test_heading_confidence_grows_with_the_location_confidence_and_the_hits_agreement() -> None:
    from retrieval.locate import heading_confidence, vote

    alike = [hit(1, 0.9, 0.0, 0.0, 80.0), hit(2, 0.8, 5.0, 0.0, 100.0)]
    split = [hit(1, 0.9, 0.0, 0.0, 0.0), hit(2, 0.8, 5.0, 0.0, 150.0)]
    va, vs = vote(alike), vote(split)
    assert va.agreement == pytest.approx(
        np.hypot(
            0.9 * np.sin(np.deg2rad(80)) + 0.8 * np.sin(np.deg2rad(100)),
            0.9 * np.cos(np.deg2rad(80)) + 0.8 * np.cos(np.deg2rad(100)),
        )
        / 1.7
    )
    assert vs.agreement < va.agreement < 1.0
    head = [1.0, 3.0, -2.0]
    assert heading_confidence(vs, head) < heading_confidence(va, head)
    weaker = vote([hit(1, 0.6, 0.0, 0.0, 80.0), hit(2, 0.5, 5.0, 0.0, 100.0)])
    assert heading_confidence(weaker, head) < heading_confidence(va, head)
    assert heading_confidence(va, None) is None
    est = estimate_location(alike, utm_epsg=32630, heading_head=head)
    assert est.heading == pytest.approx(va.heading) and est.heading_confidence == heading_confidence(va, head)
    assert estimate_location(alike, utm_epsg=32630).heading_confidence is None
