"""The served vector index, picked by collection size.

- `flat-l2`: exact search (FAISS IndexFlatL2 under an IndexIDMap2), memory-mapped from the version's
  index.faiss. Below `exact_below` vectors it is both exact and fast enough (3,291 London map images:
  ~2 ms a query).
- `pq-fastscan`: above it, 4-bit product-quantisation codes (m x 4 bits: 32 bytes at m 64) scanned
  with SIMD distance tables, and the codes' nearest `rerank` (at least k) re-ranked by their exact
  distance to the float vectors, which stay on disk (vectors.npz: a query reads only its
  shortlist's rows, with pread, into the page cache all workers share). With `coarse_m` > 0 (the
  presets' choice) the scan has two stages: coarse fast-scan codes of coarse_m sub-quantizers find a
  `shortlist`, which the m x 4-bit codes (plain layout, memory-mapped) order before the re-rank. With
  `nlist` > 0 the codes are held in that many cells of a coarse k-means (FAISS IndexIVFPQFastScan)
  and a query scans the `nprobe` nearest cells; with 0 (the presets' choice, see
  common/presets.py), every code (IndexPQFastScan, so no true neighbour is lost to an unprobed
  cell). bench/ann.py compares the alternatives; bench/million.py serves a million vectors this way
  (`served_1m`).

A PQIndex answers the calls the service makes of a FAISS index (search, add_with_ids, remove_ids,
ntotal, d), so the searcher and the living index do not care which kind they hold. An online add is
encoded into the codes at once and its float vector kept in memory until the next version is
published; a delete marks its code dead. Changes go to a copy (`copy_for_change`): the codes are
small (16 + 32 MB a million at the presets' two stages) and copied, the float vectors on disk are
shared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np

from common.files import atomic_savez, backing_files, mapped_npz, read_rows

EXACT = "flat-l2"
PQ = "pq-fastscan"
KINDS = ("auto", EXACT, PQ)
VECTORS_FILE = "vectors.npz"  # the float vectors a pq-fastscan index re-ranks with


def new_flat_index(dim: int) -> faiss.Index:
    # IndexIDMap2 keeps our ids in the index; the id map file gives each id its image.
    return faiss.IndexIDMap2(faiss.IndexFlatL2(dim))


def index_kind(conf: dict[str, Any], n: int) -> str:
    """The kind of index for n vectors under the preset's `index` conf; raises ValueError on a
    conf that names no kind."""
    kind = str(conf.get("type", "auto"))
    if kind not in KINDS:
        raise ValueError(f"unknown index type {kind!r}; known: {', '.join(KINDS)}")
    if kind == "auto":
        return PQ if n >= int(conf["exact_below"]) else EXACT
    return kind


MIN_TRAIN_PER_CELL = 39  # FAISS's k-means warns below 39 training points a centroid
SCAN_BLOCK = 64  # codes a fast-scan block holds (new_codes)


def new_codes(d: int, m: int, conf: dict[str, Any], n_train: int) -> faiss.Index:
    """Untrained fast-scan codes of m x 4 bits: in conf["nlist"] cells probed conf["nprobe"] at a
    time, as many as n_train training vectors can place; with nlist 0 (or too few vectors) one flat
    scan of every code."""
    nlist = min(int(conf.get("nlist", 0)), n_train // MIN_TRAIN_PER_CELL)
    if nlist < 2:
        # Blocks of 64 codes, not FAISS's default 32: a query's distance tables are loaded once a
        # block, and a million coarse codes scan a few % faster (BENCHMARKS.md, issue 14's
        # thirteenth step: bench/search_parts.py).
        return faiss.IndexPQFastScan(d, m, 4, faiss.METRIC_L2, SCAN_BLOCK)
    quantizer = faiss.IndexFlatL2(d)
    codes = faiss.IndexIVFPQFastScan(quantizer, d, nlist, m, 4)
    codes.own_fields = True  # the codes free their coarse quantizer; Python must not
    quantizer.this.disown()
    codes.nprobe = min(int(conf["nprobe"]), nlist)
    return codes


def new_fine_codes(d: int, m: int, xt: np.ndarray) -> faiss.IndexPQ:
    """The finer codes of a two-stage scan: m x 4 bits in FAISS's plain layout (IndexPQ, not fast-scan's
    blocks), so that the coarse shortlist's codes can be scored alone; trained on xt, empty."""
    if d % m or m % 2:
        raise ValueError(f"dimension {d} does not split into an even m={m} of sub-vectors")
    fine = faiss.IndexPQ(d, m, 4)
    fine.train(np.ascontiguousarray(xt, np.float32))
    return fine


def plain_codes(pq: faiss.ProductQuantizer, codes: np.ndarray) -> faiss.IndexPQ:
    """An IndexPQ in this process's memory: a copy of these trained codebooks, holding these codes
    ((n, code_size) uint8, or flat)."""
    out = faiss.IndexPQ(pq.d, pq.M, pq.nbits)
    out.pq = pq  # copied
    out.is_trained = True
    if codes.size:
        faiss.copy_array_to_vector(np.ascontiguousarray(codes, np.uint8).ravel(), out.codes)
        out.ntotal = codes.size // pq.code_size
    return out


def owned_fine_codes(fine: faiss.IndexPQ, with_codes: bool) -> faiss.IndexPQ:
    """Fine codes with the same codebooks in this process's memory, with a copy of the codes or none.
    (FAISS's clone of a memory-mapped index still views the mapping, and a change to it aborts.)"""
    return plain_codes(fine.pq, faiss.vector_to_array(fine.codes) if with_codes else np.zeros(0, np.uint8))


def fine_codes_from_arrays(d: int, z: dict[str, np.ndarray]) -> faiss.IndexPQ:
    """The finer codes as versions of 8e50106 stored them (codebooks and codes in vectors.npz), copied
    into memory: such a version serves, but its workers do not share these codes (32 MB a million)."""
    centroids = np.ascontiguousarray(z["fine_centroids"], np.float32)
    codes = np.asarray(z["fine_codes"])
    m = len(centroids)
    if m == 0 or d % m or centroids.shape[1] != 16 * (d // m) or codes.ndim != 2 or codes.shape[1] * 2 != m:
        raise ValueError(f"fine codebooks of shape {centroids.shape} and codes {codes.shape} for dimension {d}")
    pq = faiss.ProductQuantizer(d, m, 4)
    faiss.copy_array_to_vector(centroids.ravel(), pq.centroids)
    return plain_codes(pq, codes)


class PQIndex:
    """Fast-scan PQ codes of every vector, whose shortlist is re-ranked exactly (module docstring).

    Codes sit in slots, in the order they were added: the version's vectors first, sorted by id (their
    float vectors are the rows of the version's vectors.npz), then those added online (float vectors
    in memory). A delete marks its slot dead rather than taking the code out (FAISS's fast-scan
    remove_ids scrambles the codes added after it, measured on faiss 1.15), and dead slots are left
    out of every answer; publishing a version writes the live ones only.

    With `fine` codes the scan has two stages: the fast-scan codes are coarse (fewer sub-quantizers,
    so a scan of every code costs less) and only find a `shortlist`; the fine codes score it, and the
    fine codes' nearest `rerank` are re-ranked exactly. Both code stages run in FAISS's C++
    (IndexRefine over the two, one index.faiss), where numpy's gathering and table lookups of the
    shortlist cost more than the C++ loop (0.6 against 0.15 ms at 800). A loaded version's fine codes
    are memory-mapped from its file, shared by the workers; a change works on an owned copy."""

    kind = PQ

    def __init__(
        self,
        codes: faiss.IndexPQFastScan,
        slot_ids: np.ndarray,
        base: np.ndarray,
        rerank: int,
        alive: np.ndarray | None = None,
        added: list[np.ndarray] | None = None,
        added_slot: dict[int, int] | None = None,
        fine: faiss.IndexPQ | None = None,
        shortlist: int = 0,
        refine: faiss.IndexRefine | None = None,
        mapped: bool = False,
    ) -> None:
        self.codes = codes
        self.slot_ids = slot_ids  # (slots,) int64: the id whose code each slot holds
        self.base = base  # (n_base, d) float32 vectors of the first slots, memory-mapped
        self.rerank = int(rerank)  # codes' candidates re-ranked exactly (at least k)
        self.alive = np.ones(len(slot_ids), bool) if alive is None else alive
        self.added = list(added or [])  # float vectors of the slots after the base ones
        self.added_slot = dict(added_slot or {})  # id -> its live slot among those added online
        self._ntotal = int(self.alive.sum())
        self.fine = fine  # None: one stage, the codes' candidates re-ranked exactly
        self.shortlist = int(shortlist)  # the coarse codes' candidates that the fine codes score
        if fine is not None and fine.ntotal != codes.ntotal:
            raise ValueError(f"{fine.ntotal} fine codes for {codes.ntotal} coarse codes")
        if fine is not None and refine is None:
            refine = faiss.IndexRefine(codes, fine)  # owns neither: self holds both
        self.refine = refine  # the two code stages as one FAISS index (None: one stage)
        self.mapped = mapped  # the fine codes are a read-only mapping of the version's file
        self._params: dict[tuple[int, int], faiss.IndexRefineSearchParameters] = {}

    @classmethod
    def build(cls, xb: np.ndarray, ids: np.ndarray, conf: dict[str, Any], seed: int = 0) -> PQIndex:
        """Codes trained on (a seeded sample of) xb itself, then every vector encoded."""
        xb = np.ascontiguousarray(xb, np.float32)
        ids = np.asarray(ids, np.int64)
        if xb.ndim != 2 or len(xb) != len(ids):
            raise ValueError(f"{len(ids)} ids for vectors of shape {xb.shape}")
        m, coarse = int(conf["m"]), int(conf.get("coarse_m", 0))
        if coarse >= m:
            raise ValueError(f"coarse_m={coarse} must be below m={m} (0: one stage)")
        scanned = coarse or m
        if xb.shape[1] % scanned:
            raise ValueError(f"dimension {xb.shape[1]} does not split into m={scanned} sub-vectors")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("the ids of an index must be unique")
        if not np.all(ids[1:] > ids[:-1]):  # base slots are in id order, so an id finds its row by bisection
            order = np.argsort(ids, kind="stable")
            xb, ids = xb[order], ids[order]
        n_train = min(len(xb), int(conf["train_size"]))
        codes = new_codes(int(xb.shape[1]), scanned, conf, n_train)
        rows = np.sort(np.random.default_rng(seed).choice(len(xb), size=n_train, replace=False))
        xt = np.ascontiguousarray(xb[rows])
        codes.train(xt)
        for start in range(0, len(xb), 65536):
            codes.add(xb[start : start + 65536])
        fine = None
        if coarse:
            fine = new_fine_codes(int(xb.shape[1]), m, xt)
            for start in range(0, len(xb), 65536):
                fine.add(xb[start : start + 65536])
        return cls(codes, ids, xb, int(conf["rerank"]), fine=fine, shortlist=int(conf.get("shortlist", 0)))

    @property
    def d(self) -> int:
        return int(self.codes.d)

    @property
    def ntotal(self) -> int:
        return self._ntotal

    def ids(self) -> np.ndarray:
        """The served ids, in slot order."""
        return self.slot_ids[self.alive]

    def _slots_of(self, ids: np.ndarray) -> np.ndarray:
        """The live slot of each id, -1 where it has none."""
        ids = np.asarray(ids, np.int64)
        out = np.full(len(ids), -1, np.int64)
        n_base = len(self.base)
        if n_base:
            rows = np.minimum(np.searchsorted(self.slot_ids[:n_base], ids), n_base - 1)
            hit = (self.slot_ids[rows] == ids) & self.alive[rows]
            out[hit] = rows[hit]
        if self.added_slot:  # ids added online: their slots are after the base ones
            keys = np.fromiter(self.added_slot.keys(), np.int64, len(self.added_slot))
            slots = np.fromiter(self.added_slot.values(), np.int64, len(self.added_slot))
            order = np.argsort(keys)
            keys, slots = keys[order], slots[order]
            at = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
            hit = keys[at] == ids
            out[hit] = slots[at[hit]]
        return out

    def _vectors(self, slots: np.ndarray) -> np.ndarray:
        out = np.empty((len(slots), self.d), np.float32)
        n_base = len(self.base)
        stored = np.flatnonzero(slots < n_base)
        order = stored[np.argsort(slots[stored])]  # read the file front to back
        out[order] = read_rows(self.base, slots[order], slots[order] + 1)
        for p in np.flatnonzero(slots >= n_base):
            out[p] = self.added[int(slots[p]) - n_base]
        return out

    def on_demand_files(self) -> list[Path]:
        """The file whose rows a search reads for the exact re-rank (a loaded version's vectors.npz)."""
        return backing_files([self.base])

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """The float vectors of these served ids; KeyError for one that is not served."""
        slots = self._slots_of(ids)
        if np.any(slots < 0):
            raise KeyError(f"ids not in the index: {np.asarray(ids)[slots < 0][:5].tolist()}")
        return self._vectors(slots)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances, ids) of the k nearest, each row sorted; -1 ids pad short answers."""
        x = np.ascontiguousarray(x, np.float32)
        d2 = np.full((len(x), max(k, 0)), np.inf, np.float32)
        found = np.full((len(x), max(k, 0)), -1, np.int64)
        if k <= 0 or self.ntotal == 0:
            return d2, found
        dead = len(self.alive) - self.ntotal  # dead codes can fill the shortlist: ask for that many more
        if self.refine is not None:
            # Two stages: the fine codes order the coarse codes' nearest `shortlist`, and only their
            # nearest `rerank` are re-ranked exactly; past them (k > rerank: the expansion pool) the
            # fine order and distances stand, raised where needed so that the row stays sorted.
            want = min(len(self.alive), max(k, self.rerank) + dead)
            deep = max(self.shortlist + dead, want)
            est, cand = self.refine.search(x, want, params=self._refine_params(want, deep))
        else:
            # One stage: the top 10 of the 100 nearest codes, recall@10 0.999 against exact at 1M
            # (BENCHMARKS.md). A deeper k (the expansion pool of 200) is re-ranked as deep, not 10 x
            # deeper: its tail only feeds expansion, which looks at places, not at the exact order.
            est, cand = self.codes.search(x, min(len(self.alive), max(k, self.rerank) + dead))
        for r, row in enumerate(cand):
            keep = row >= 0
            if dead:
                keep &= self.alive[np.maximum(row, 0)]
            slots, rest, tail = row[keep], row[:0], est[r, :0]
            if self.refine is not None:
                rest, tail = slots[self.rerank : k], est[r][keep][self.rerank : k]
                slots = slots[: self.rerank]
            exact = ((self._vectors(slots) - x[r]) ** 2).sum(axis=1)
            top = np.argsort(exact, kind="stable")[:k]
            dist, ids = exact[top], self.slot_ids[slots[top]]
            if len(tail):
                # the fine distances are sorted already: raised only where below the exact head's last
                tail = np.maximum(tail, dist[-1] if len(dist) else 0.0)
                dist, ids = np.concatenate([dist, tail]), np.concatenate([ids, self.slot_ids[rest]])
            d2[r, : len(ids)], found[r, : len(ids)] = dist, ids
        return d2, found

    def _refine_params(self, want: int, deep: int) -> faiss.IndexRefineSearchParameters:
        """IndexRefine's parameters for the coarse codes' nearest `deep` and the fine codes' nearest
        `want`, made once per pair (a SWIG object costs ~0.1 ms a query to make)."""
        params = self._params.get((want, deep))
        if params is None:
            # IndexRefine asks the coarse codes for int(want * k_factor): deep, whatever the rounding
            params = self._params[want, deep] = faiss.IndexRefineSearchParameters(k_factor=(deep + 0.5) / want)
        return params

    def add_with_ids(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Encode and serve these vectors (an id must not be served already: remove it first)."""
        x = np.ascontiguousarray(x, np.float32)
        ids = np.asarray(ids, np.int64)
        if np.any(self._slots_of(ids) >= 0):
            raise ValueError("an id to add is served already; remove it first")
        first = len(self.alive)
        if self.mapped:  # FAISS aborts on a change of a mapped index: own the codes first
            self._own_codes()
        # Encoded now: the codes stay in step with the online adds (IndexRefine adds to both stages).
        (self.codes if self.refine is None else self.refine).add(x)
        self.slot_ids = np.concatenate([self.slot_ids, ids])
        self.alive = np.concatenate([self.alive, np.ones(len(ids), bool)])
        for j, (i, v) in enumerate(zip(ids.tolist(), x, strict=True)):
            self.added.append(v.copy())
            self.added_slot[i] = first + j
        self._ntotal += len(ids)

    def remove_ids(self, ids: np.ndarray) -> int:
        slots = self._slots_of(ids)
        slots = np.unique(slots[slots >= 0])
        self.alive[slots] = False
        for i in np.asarray(ids, np.int64).tolist():
            self.added_slot.pop(i, None)
        self._ntotal -= len(slots)
        return len(slots)

    def _own_codes(self) -> None:
        """Both code stages copied into this process's memory."""
        self.codes = faiss.clone_index(self.codes)
        if self.fine is not None:
            self.fine = owned_fine_codes(self.fine, with_codes=True)
            self.refine = faiss.IndexRefine(self.codes, self.fine)
        self.mapped = False

    def copy(self) -> PQIndex:
        """A copy safe to change while this one serves: its own codes and slot tables (small: 48 MB a
        million), the same read-only float vectors on disk."""
        out = PQIndex(
            self.codes,
            self.slot_ids.copy(),
            self.base,
            self.rerank,
            self.alive.copy(),
            list(self.added),  # the copy's adds must not show in this one's tables
            dict(self.added_slot),
            self.fine,
            self.shortlist,
            self.refine,
        )
        out._own_codes()
        return out

    def save(self, index_path: Path, vectors_path: Path) -> None:
        """The live codes to index_path, their float vectors to vectors_path, both in id order. Without
        online changes the codes are written as they are; otherwise the live vectors are encoded
        again by the same trained quantizer."""
        ids = np.sort(self.ids())
        xb = self.vectors_of(ids)
        codes = self.codes if self.refine is None else self.refine
        changed = len(self.alive) != len(self.base) or not self.alive.all()
        if changed:
            coarse = faiss.clone_index(self.codes)
            coarse.reset()  # keeps the trained codebooks
            fine = None if self.fine is None else owned_fine_codes(self.fine, with_codes=False)
            codes = coarse if fine is None else faiss.IndexRefine(coarse, fine)
            for start in range(0, len(xb), 65536):
                codes.add(xb[start : start + 65536])
        extra = {} if self.refine is None else {"shortlist": np.array(self.shortlist)}
        faiss.write_index(codes, str(index_path))
        atomic_savez(vectors_path, ids=ids, vectors=xb, rerank=np.array(self.rerank), **extra)

    @classmethod
    def load(cls, index_path: Path, vectors_path: Path) -> PQIndex:
        # The fine codes (IndexPQ's) memory-mapped, shared by the workers; fast-scan's are read.
        codes = faiss.read_index(str(index_path), getattr(faiss, "IO_FLAG_MMAP_IFC", 0))
        refine, fine, mapped = None, None, False
        if isinstance(codes, faiss.IndexRefine):
            refine, codes = codes, faiss.downcast_index(codes.base_index)
            fine, mapped = faiss.downcast_index(refine.refine_index), True
            if not isinstance(fine, faiss.IndexPQ) or fine.pq.nbits != 4:
                raise ValueError(f"{index_path}: the fine codes are not 4-bit plain-layout PQ codes")
        if not isinstance(codes, faiss.IndexPQFastScan | faiss.IndexIVFPQFastScan):
            raise ValueError(f"{index_path} holds no fast-scan PQ codes")
        z = mapped_npz(vectors_path)
        ids = np.asarray(z["ids"], np.int64)
        if z["vectors"].shape != (len(ids), codes.d) or codes.ntotal != len(ids):
            raise ValueError(f"{vectors_path}: vectors of shape {z['vectors'].shape} for {codes.ntotal} codes")
        if not np.all(ids[1:] > ids[:-1]):
            raise ValueError(f"{vectors_path}: ids are not sorted and unique")
        if "fine_codes" in z and fine is None:  # 8e50106 stored them there (versions before: one stage)
            fine = fine_codes_from_arrays(codes.d, z)
        if fine is not None and fine.ntotal != len(ids):
            raise ValueError(f"{index_path}: {fine.ntotal} fine codes for {len(ids)} vectors")
        shortlist = int(z["shortlist"]) if "shortlist" in z else 0
        rerank = int(z["rerank"])
        return cls(codes, ids, z["vectors"], rerank, fine=fine, shortlist=shortlist, refine=refine, mapped=mapped)


AnyIndex = faiss.Index | PQIndex


def build_index(conf: dict[str, Any], xb: np.ndarray, ids: np.ndarray) -> AnyIndex:
    """The kind of index the collection's size calls for (index_kind), holding xb under ids."""
    if index_kind(conf, len(ids)) == PQ:
        return PQIndex.build(xb, ids, conf)
    index = new_flat_index(int(xb.shape[1]))
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(xb, np.float32), np.asarray(ids, np.int64))
    return index


def index_ids(index: AnyIndex) -> np.ndarray:
    """The ids held, in storage order."""
    if isinstance(index, PQIndex):
        return index.ids()
    if index.ntotal == 0:
        return np.zeros(0, np.int64)
    return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)


def index_contents(index: AnyIndex) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float vectors) held, in storage order."""
    ids = index_ids(index)
    if isinstance(index, PQIndex):
        return ids, index.vectors_of(ids)
    if index.ntotal == 0:
        return ids, np.zeros((0, index.d), np.float32)
    return ids, faiss.downcast_index(index).index.reconstruct_n(0, index.ntotal)


def copy_for_change(index: AnyIndex) -> AnyIndex:
    """A copy to apply online changes to while `index` keeps serving. FAISS indexes are not safe to
    change while another thread searches them, and a flat index memory-mapped from its file cannot be
    changed at all: the flat copy owns its vectors."""
    if isinstance(index, PQIndex):
        return index.copy()
    out = new_flat_index(index.d)
    ids, xb = index_contents(index)
    if len(ids):
        out.add_with_ids(xb, ids)
    return out
