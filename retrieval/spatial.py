"""Which map images stand within a radius of a point: the spatial index behind a position prior.

The positions are sorted by easting once per index version, so a radius query reads only the strip
of the map as wide as the circle (a binary search to find it), then keeps those within the radius.
A city-sized map of a million images keeps a 100 m query to a few thousand comparisons. Online adds
and deletes go into a small overlay (a new Places per change, sharing the sorted arrays), so they
are found at once without sorting again; the next version sorts them in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from indexer.store import ImageRecord


class Places:
    def __init__(
        self,
        ids: np.ndarray,
        easting: np.ndarray,
        northing: np.ndarray,
        extra: Mapping[int, tuple[float, float]] | None = None,
        hidden: frozenset[int] = frozenset(),
    ) -> None:
        order = np.argsort(easting, kind="stable")
        self.ids = np.asarray(ids, np.int64)[order]
        self.easting = np.asarray(easting, np.float64)[order]
        self.northing = np.asarray(northing, np.float64)[order]
        # Changes since the arrays were sorted: positions added or moved, and sorted ids no longer there.
        self.extra = dict(extra or {})
        self.hidden = hidden

    @classmethod
    def of(cls, images: Mapping[int, ImageRecord]) -> Places:
        n = len(images)
        ids = np.fromiter(images.keys(), np.int64, n)
        e = np.fromiter((r.loc.easting for r in images.values()), np.float64, n)
        no = np.fromiter((r.loc.northing for r in images.values()), np.float64, n)
        return cls(ids, e, no)

    def changed(self, images: Mapping[int, ImageRecord], ids: Iterable[int]) -> Places:
        """These places after the images `ids` were added, moved or deleted (as `images` now says)."""
        extra, hidden = dict(self.extra), set(self.hidden)
        for i in ids:
            hidden.add(i)  # a sorted entry of the same id is stale either way
            rec = images.get(i)
            if rec is None:
                extra.pop(i, None)
            else:
                extra[i] = (rec.loc.easting, rec.loc.northing)
        out = Places.__new__(Places)
        out.ids, out.easting, out.northing = self.ids, self.easting, self.northing
        out.extra, out.hidden = extra, frozenset(hidden)
        return out

    def within(self, easting: float, northing: float, radius_m: float) -> tuple[np.ndarray, np.ndarray]:
        """(ids, distances in metres) of the map images within radius_m of the point, nearest first
        (ties by id)."""
        a = int(np.searchsorted(self.easting, easting - radius_m, side="left"))
        b = int(np.searchsorted(self.easting, easting + radius_m, side="right"))
        ids = self.ids[a:b]
        d = np.hypot(self.easting[a:b] - easting, self.northing[a:b] - northing)
        keep = d <= radius_m
        ids, d = ids[keep], d[keep]
        if self.hidden:
            alive = ~np.isin(ids, np.fromiter(self.hidden, np.int64, len(self.hidden)))
            ids, d = ids[alive], d[alive]
        if self.extra:
            ex_ids = np.fromiter(self.extra.keys(), np.int64, len(self.extra))
            ex = np.array(list(self.extra.values()), np.float64).reshape(-1, 2)
            ex_d = np.hypot(ex[:, 0] - easting, ex[:, 1] - northing)
            near = ex_d <= radius_m
            ids, d = np.concatenate([ids, ex_ids[near]]), np.concatenate([d, ex_d[near]])
        order = np.lexsort((ids, d))
        return ids[order], d[order]

    def __len__(self) -> int:
        hidden_sorted = int(np.isin(self.ids, np.fromiter(self.hidden, np.int64, len(self.hidden))).sum())
        return len(self.ids) - hidden_sorted + len(self.extra)
