"""Geometric verification of the shortlist.

ORB keypoints of every map image are extracted and stored at index time, sorted by visual word. At
query time the query's keypoints are matched to each shortlisted map image within the same visual
word (a coarse Hamming embedding: only descriptors of one word are compared), filtered by a ratio test
and, where the preset says so, by the keypoints' orientations (street photos are upright, so the two
keypoints of a true match turn alike, while a chance match's orientations differ at random), and a
similarity transform is fitted by RANSAC; its inlier count is evidence that the two images show the
same scene. A logistic head fitted on validation queries folds inliers and embedding distance into
one relevance score, and the shortlist is re-ranked by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import faiss
import numpy as np

from common.files import atomic_savez, backing_files, mapped_npz, read_rows
from common.pipeline import ExpandConf, VerifyConf
from features.orb import OrbFeatures


@dataclass(frozen=True)
class MapFeatures:
    """Verification keypoints of all map images; image row r owns offsets[r]:offsets[r+1], sorted by word."""

    ids: np.ndarray  # (n,) int64 map image ids, in row order
    offsets: np.ndarray  # (n + 1,) int64
    xy: np.ndarray  # (N, 2) float32
    descriptors: np.ndarray  # (N, 32) uint8
    words: np.ndarray  # (N,) int32
    angles: np.ndarray  # (N,) float16 keypoint orientations in degrees, NaN where not known

    @classmethod
    def build(cls, ids: list[int], features: list[OrbFeatures], words: list[np.ndarray]) -> MapFeatures:
        xy, desc, ws, angles, counts = [], [], [], [], []
        for f, w in zip(features, words, strict=True):
            w = nearest_words(w)
            order = np.argsort(w, kind="stable")
            xy.append(f.xy[order])
            desc.append(f.descriptors[order])
            ws.append(w[order].astype(np.int32))
            turn = np.full(len(order), np.nan) if f.angles is None else f.angles[order]
            angles.append(np.asarray(turn, np.float16))
            counts.append(len(order))
        return cls(
            ids=np.asarray(ids, np.int64),
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            xy=np.concatenate(xy).astype(np.float32) if xy else np.zeros((0, 2), np.float32),
            descriptors=np.ascontiguousarray(np.concatenate(desc)) if desc else np.zeros((0, 32), np.uint8),
            words=np.concatenate(ws) if ws else np.zeros(0, np.int32),
            angles=np.concatenate(angles) if angles else np.zeros(0, np.float16),
        )

    @classmethod
    def empty(cls) -> MapFeatures:
        return cls.build([], [], [])

    def subset(self, keep: np.ndarray) -> MapFeatures:
        """The images whose rows are True in `keep`, in row order (one index shard's keypoints)."""
        rows = np.flatnonzero(keep)
        flat, counts = _ranges(self.offsets[rows], self.offsets[rows + 1])
        return MapFeatures(
            ids=self.ids[rows],
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            xy=self.xy[flat],
            descriptors=np.ascontiguousarray(self.descriptors[flat]),
            words=self.words[flat],
            angles=self.angles[flat],
        )

    def on_demand_files(self) -> list[Path]:
        """The files `take` reads rows of (those of a loaded version; none of one built in memory)."""
        return backing_files([self.xy, self.descriptors, self.words, self.angles])

    def take(self, rows: np.ndarray) -> MapFeatures:
        """The images at `rows`, in that order, read from the file when the store is memory-mapped
        (common/files.py: read_rows): a query's candidates are read from disk on demand, without
        mapping the keypoints of every map image into the worker."""
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        return MapFeatures(
            ids=self.ids[rows],
            offsets=np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64),
            xy=read_rows(self.xy, starts, ends),
            descriptors=read_rows(self.descriptors, starts, ends),
            words=read_rows(self.words, starts, ends),
            angles=read_rows(self.angles, starts, ends),
        )

    @classmethod
    def concat(cls, parts: list[MapFeatures]) -> MapFeatures:
        """One store of several (the shards of a version, served by one process)."""
        if len(parts) <= 1:
            return parts[0] if parts else cls.empty()
        sizes = np.cumsum([0] + [len(p.xy) for p in parts[:-1]])
        return cls(
            ids=np.concatenate([p.ids for p in parts]),
            offsets=np.concatenate([[0]] + [p.offsets[1:] + base for p, base in zip(parts, sizes, strict=True)]),
            xy=np.concatenate([p.xy for p in parts]),
            descriptors=np.ascontiguousarray(np.concatenate([p.descriptors for p in parts])),
            words=np.concatenate([p.words for p in parts]),
            angles=np.concatenate([p.angles for p in parts]),
        )

    def save(self, path: Path) -> Path:
        arrays = {"ids": self.ids, "offsets": self.offsets, "xy": self.xy, "descriptors": self.descriptors}
        return atomic_savez(path, durable=False, **arrays, words=self.words, angles=self.angles)

    @classmethod
    def load(cls, path: Path) -> MapFeatures:
        # Memory-mapped, as the encoder: the keypoints of every map image are shared by all workers.
        z = mapped_npz(path)
        # Versions written before the orientations were stored: not known (never filtered on).
        angles = z["angles"] if "angles" in z else np.full(len(z["xy"]), np.nan, np.float16)
        return cls(z["ids"], z["offsets"], z["xy"], z["descriptors"], z["words"], angles)


def nearest_words(words: np.ndarray) -> np.ndarray:
    """The word each keypoint of a map image is stored under: its nearest. An image added online is
    analysed as a query, whose keypoints may come with their k nearest words, (n, k)."""
    words = np.asarray(words)
    return words[:, 0] if words.ndim == 2 else words


def keypoint_arrays(features: OrbFeatures, words: np.ndarray) -> dict[str, np.ndarray]:
    """A map image's verification keypoints and their words as named arrays, to store with a change or
    send to another process; orientations only where known (keypoints_of_arrays reads them back)."""
    out = {"xy": features.xy, "descriptors": features.descriptors, "words": nearest_words(words)}
    if features.angles is not None:
        out["angles"] = np.asarray(features.angles, np.float32)
    return out


def keypoints_of_arrays(arrays: dict[str, np.ndarray]) -> tuple[OrbFeatures, np.ndarray]:
    """The inverse of keypoint_arrays."""
    return OrbFeatures(arrays["xy"], arrays["descriptors"], angles=arrays.get("angles")), arrays["words"]


def _ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated aranges [s, e) for each pair, and their lengths."""
    lens = ends - starts
    if lens.sum() == 0:
        return np.zeros(0, np.int64), lens
    base = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return base + np.arange(lens.sum()), lens


def match_by_word(
    q_desc: np.ndarray,
    q_words: np.ndarray,
    store: MapFeatures,
    rows: np.ndarray,
    n_words: int,
    max_hamming: int,
    ratio: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tentative matches of the query to the map images at `rows`, all candidates at once.

    Each map keypoint is compared with every query keypoint of the same word; the nearest is kept if
    its Hamming distance is <= max_hamming and < ratio x the second nearest; each query keypoint then
    keeps its best map keypoint per image. `q_words` is (n,), or (n, k) to compare each query keypoint
    within k words. Returns (candidate position, query index, map index).
    The map keypoints of all candidates are gathered once and grouped by word; each word's Hamming
    distances (query x map keypoints) come from FAISS's popcount kernel (faiss.hammings) in one call,
    the nearest and second nearest from the matrix by two minima along its columns. A query makes
    ~2.3M of them (the words are unevenly used): 23 ms with cv2.batchDistance (K=2), 4 ms with
    faiss.hammings; the verify stage of bench/run.py went from 33.7 to 14.1 ms, with the same matches,
    and from 23.8 to 20.4 ms on another host when argmin along the rows gave way to the keyed minima.
    """
    empty = np.zeros(0, np.int64)
    midx, mlen = _ranges(store.offsets[rows], store.offsets[rows + 1])
    if len(midx) == 0 or len(q_words) == 0:
        return empty, empty, empty
    # Several words per query keypoint ((n, k) words): the keypoint enters each of its words' groups,
    # and its matches are told apart by source below, the nearest one kept per image.
    source = np.repeat(np.arange(len(q_words)), 1 if q_words.ndim == 1 else q_words.shape[1])
    if q_words.ndim == 2:
        q_desc, q_words = q_desc[source], q_words.ravel()
    cpos_all = np.repeat(np.arange(len(rows)), mlen)
    q_order = np.argsort(q_words, kind="stable")
    q_start = np.searchsorted(q_words[q_order], np.arange(n_words + 1))
    m_order = np.argsort(store.words[midx], kind="stable")
    m_start = np.searchsorted(store.words[midx][m_order], np.arange(n_words + 1))
    m_rows = midx[m_order]
    m_desc = np.ascontiguousarray(store.descriptors[m_rows], np.uint8)  # word by word, read once from the store
    q_sorted = np.ascontiguousarray(q_desc[q_order], np.uint8)
    nbytes = q_sorted.shape[1]  # faiss.hammings reads raw rows of this many bytes from both
    if m_desc.shape[1] != nbytes:
        raise ValueError(f"query descriptors of {nbytes} bytes against map descriptors of {m_desc.shape[1]}")
    # Per map keypoint: the smallest key (Hamming distance << lane_bits | the query keypoint's place
    # in its word), which gives the nearest and, on ties, the lowest query index in one min; and the
    # second smallest distance, from the same matrix with the nearest's entry alone set aside (a tie
    # then gives second == nearest, which fails the ratio test). A (query x map) matrix reduced along
    # axis 0 is numpy's fast direction; argmin along it is not.
    lanes = np.arange(int(np.diff(q_start).max()), dtype=np.int32)[:, None]
    lane_bits = max(1, (len(lanes) - 1).bit_length())
    if (8 * nbytes + 1) << lane_bits >= 1 << 31:
        raise ValueError(f"{len(lanes)} query keypoints of one word: too many to match in one key")
    lane_mask = (1 << lane_bits) - 1
    big = np.iinfo(np.int32).max
    nearest = np.full(len(m_rows), big, np.int32)
    second = np.full(len(m_rows), big, np.int32)
    for w in np.flatnonzero((np.diff(q_start) > 0) & (np.diff(m_start) > 0)).tolist():
        qa, qb, ma, mb = int(q_start[w]), int(q_start[w + 1]), int(m_start[w]), int(m_start[w + 1])
        key = np.empty((qb - qa, mb - ma), np.int32)  # hamdis_t
        q_ptr, m_ptr = faiss.swig_ptr(q_sorted[qa:qb]), faiss.swig_ptr(m_desc[ma:mb])
        # hammings is in FAISS's module (swigfaiss) but missing from its stub
        faiss.hammings(q_ptr, m_ptr, qb - qa, mb - ma, nbytes, faiss.swig_ptr(key))  # type: ignore[attr-defined]
        key <<= lane_bits
        key |= lanes[: qb - qa]
        best = key.min(axis=0)
        nearest[ma:mb] = best
        if qb - qa > 1:  # with one query keypoint in the word there is no second nearest: the ratio test passes
            key[best & lane_mask, np.arange(mb - ma)] = big
            second[ma:mb] = key.min(axis=0) >> lane_bits
    dist = nearest >> lane_bits
    sel = np.flatnonzero((nearest < big) & (dist <= max_hamming) & (dist < ratio * second.astype(np.float64)))
    if len(sel) == 0:
        return empty, empty, empty
    q_first = q_start[store.words[m_rows[sel]]]  # where each selected keypoint's word starts among the query's
    cpos, qi = cpos_all[m_order[sel]], source[q_order[q_first + (nearest[sel] & lane_mask)]]
    mi, hb = m_rows[sel], dist[sel]
    o = np.lexsort((hb, qi, cpos))
    cpos, qi, mi = cpos[o], qi[o], mi[o]
    first = np.ones(len(o), bool)
    first[1:] = (cpos[1:] != cpos[:-1]) | (qi[1:] != qi[:-1])
    return cpos[first], qi[first], mi[first]


def same_turn(q_angles: np.ndarray | None, m_angles: np.ndarray, max_deg: float) -> np.ndarray:
    """Which matches have keypoint orientations within max_deg of each other (True where either is
    not known)."""
    if q_angles is None:
        return np.ones(len(m_angles), bool)
    d = np.abs(np.asarray(q_angles, np.float32) - np.asarray(m_angles, np.float32)) % 360.0
    return ~(np.minimum(d, 360.0 - d) > max_deg)  # NaN compares False: kept


def ransac_fit(
    p_query: np.ndarray, p_map: np.ndarray, px: float, iters: int, min_matches: int = 6
) -> tuple[np.ndarray | None, np.ndarray]:
    """A similarity transform (rotation, scale, shift; 2x3, query -> map pixels) fitted by RANSAC, and
    which matches are its inliers: street views of one facade from nearby poses are related by it
    closely enough, and 2-point samples keep RANSAC cheap. OpenCV seeds its RANSAC the same way every
    call, so a pair gives the same inliers whenever it is verified."""
    none = np.zeros(len(p_query), bool)
    if len(p_query) < min_matches:
        return None, none
    m, mask = cv2.estimateAffinePartial2D(
        p_query, p_map, method=cv2.RANSAC, ransacReprojThreshold=px, maxIters=iters, confidence=0.99, refineIters=0
    )
    if mask is None or m is None:
        return None, none
    return m, mask.ravel().astype(bool)


def ransac_inliers(p_query: np.ndarray, p_map: np.ndarray, px: float, iters: int, min_matches: int = 6) -> int:
    """How many matches the RANSAC similarity transform of ransac_fit keeps."""
    return int(ransac_fit(p_query, p_map, px, iters, min_matches)[1].sum())


@dataclass(frozen=True)
class Evidence:
    """Why a map image was verified: its inlier matches with the query (keypoint positions in each
    decoded image's pixels) and the transform RANSAC fitted (query -> map), None where none was."""

    query_xy: np.ndarray  # (m, 2)
    map_xy: np.ndarray  # (m, 2)
    transform: np.ndarray | None  # (2, 3)
    matched: int = 0  # tentative matches RANSAC was given (the inliers are among them)
    query_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (m,) which query keypoints


NO_EVIDENCE = Evidence(np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32), None)


def distinct_inliers(found: list[Evidence], where: np.ndarray, far_m: float) -> np.ndarray:
    """(n,) inliers of each of n verified map images, each counted 1 / (1 + how many of the others
    standing more than far_m from it (`where`: (n, 2) positions in metres) hold the same query
    keypoint as an inlier). A query corner that verifies against many places (a window grid, a
    chain store's sign) does not say which one it is; one that only this place's images explain
    does."""
    n = len(found)
    owner = np.repeat(np.arange(n), [len(e.query_index) for e in found])
    out: np.ndarray = np.bincount(owner, minlength=n).astype(np.float64)  # each inlier counting 1
    if len(owner) == 0:
        return out
    _, key, held = np.unique(np.concatenate([e.query_index for e in found]), return_inverse=True, return_counts=True)
    shared = held[key.ravel()] > 1  # most query keypoints verify against one image alone: they count 1
    if not shared.any():
        return out
    cols, col = np.unique(key.ravel()[shared], return_inverse=True)
    holds = np.zeros((n, len(cols)))
    holds[owner[shared], col] = 1.0
    gap = where[:, None, :] - where[None, :, :]
    far = ((gap * gap).sum(axis=2) > far_m * far_m).astype(np.float64)
    others = (far @ holds)[owner[shared], col]  # the far images holding each shared inlier's keypoint
    out -= np.bincount(owner[shared], weights=others / (1.0 + others), minlength=n)
    return out


class Verifier:
    def __init__(
        self,
        conf: VerifyConf,
        expand: ExpandConf | None,
        store: MapFeatures,
        n_words: int,
        head: list[float],
        extra: dict[int, tuple[OrbFeatures, np.ndarray]] | None = None,
        expand_prior: float = 0.0,
    ) -> None:
        self.conf = conf
        self.expand = expand  # verified spatial expansion (None: off)
        self.store = store
        self.n_words = n_words
        self.head = np.asarray(head, np.float64)  # logistic weights for [distance, log1p(inliers), 1]
        # P(relevant) of a map image near a strongly verified top hit (0: no spatial expansion).
        self.expand_prior = float(expand_prior)
        self.row_of = {int(i): r for r, i in enumerate(store.ids)}
        # Keypoints (and their words) of images added online, kept apart so adding one does not copy
        # the keypoints of every map image; they take precedence over the stored ones of the same id.
        self.extra = dict(extra or {})
        ids = list(self.extra)
        self.extra_store = MapFeatures.build(
            ids, [f for f, _ in self.extra.values()], [w for _, w in self.extra.values()]
        )
        self.extra_row_of = {i: r for r, i in enumerate(ids)}

    def with_extra(self, extra: dict[int, tuple[OrbFeatures, np.ndarray]]) -> Verifier:
        """The same verifier with another set of online-added images (the stored keypoints are shared)."""
        return Verifier(self.conf, self.expand, self.store, self.n_words, self.head.tolist(), extra, self.expand_prior)

    def features_of(self, image_id: int) -> tuple[OrbFeatures, np.ndarray]:
        if image_id in self.extra:
            return self.extra[image_id]
        r = self.row_of[image_id]
        a, b = self.store.offsets[r], self.store.offsets[r + 1]
        s = self.store
        return OrbFeatures(s.xy[a:b], s.descriptors[a:b], angles=s.angles[a:b].astype(np.float32)), s.words[a:b]

    def features(self, ids: list[int]) -> MapFeatures:
        """Keypoints of these images as one store (to save a version with online changes folded in)."""
        feats = [self.features_of(i) for i in ids]
        return MapFeatures.build(ids, [f for f, _ in feats], [w for _, w in feats])

    def inliers(self, q: OrbFeatures, q_words: np.ndarray, ids: list[int]) -> np.ndarray:
        out = np.zeros(len(ids), np.int64)
        for pos, store, rows in self._stores(ids):
            out[pos] = self._inliers(q, q_words, store, rows)
        return out

    def evidence(self, q: OrbFeatures, q_words: np.ndarray, ids: list[int]) -> list[Evidence]:
        """The inlier matches and transform behind inliers() of each map image `ids`."""
        out: list[Evidence] = [NO_EVIDENCE] * len(ids)
        for pos, store, rows in self._stores(ids):
            found: list[Evidence] = []
            self._inliers(q, q_words, store, rows, found)
            for p, e in zip(pos.tolist(), found, strict=True):
                out[p] = e
        return out

    def _stores(self, ids: list[int]) -> list[tuple[np.ndarray, MapFeatures, np.ndarray]]:
        """(positions in ids, store, rows in it): the stored keypoints, then those added online."""
        in_extra = np.array([i in self.extra for i in ids], bool)
        out = []
        for mask, store, row_of in (
            (~in_extra, self.store, self.row_of),
            (in_extra, self.extra_store, self.extra_row_of),
        ):
            pos = np.flatnonzero(mask)
            if len(pos):
                out.append((pos, store, np.array([row_of[ids[p]] for p in pos], np.int64)))
        return out

    def _inliers(
        self,
        q: OrbFeatures,
        q_words: np.ndarray,
        store: MapFeatures,
        rows: np.ndarray,
        evidence: list[Evidence] | None = None,
    ) -> np.ndarray:
        """Inliers of each of the store's `rows`; with `evidence`, also what they are, appended in order."""
        out = np.zeros(len(rows), np.int64)
        if len(rows) == 0 or len(q.descriptors) == 0:
            if evidence is not None:
                evidence.extend(NO_EVIDENCE for _ in rows)
            return out
        c = self.conf
        store = store.take(rows)  # the candidates' keypoints alone, from disk
        rows = np.arange(len(rows))
        cpos, qi, mi = match_by_word(
            np.ascontiguousarray(q.descriptors), q_words, store, rows, self.n_words, c.max_hamming, c.ratio
        )
        if c.max_angle_deg is not None:
            keep = same_turn(None if q.angles is None else q.angles[qi], store.angles[mi], c.max_angle_deg)
            cpos, qi, mi = cpos[keep], qi[keep], mi[keep]
        bounds = np.searchsorted(cpos, np.arange(len(rows) + 1))
        for p in range(len(rows)):
            a, b = bounds[p], bounds[p + 1]
            pq, pm = q.xy[qi[a:b]], store.xy[mi[a:b]]
            if evidence is None:
                out[p] = ransac_inliers(pq, pm, c.ransac_px, c.ransac_iters)
                continue
            m, mask = ransac_fit(pq, pm, c.ransac_px, c.ransac_iters)
            out[p] = int(mask.sum())
            evidence.append(Evidence(pq[mask], pm[mask], m, len(pq), qi[a:b][mask]))
        return out

    def score(self, distance: np.ndarray, inliers: np.ndarray) -> np.ndarray:
        z = self.head[0] * distance + self.head[1] * np.log1p(inliers) + self.head[2]
        score: np.ndarray = 1.0 / (1.0 + np.exp(-z))
        return score
