"""The served vector index, picked by collection size.

- `flat-l2`: exact search (FAISS IndexFlatL2 under an IndexIDMap2), memory-mapped from the version's
  index.faiss. Below `exact_below` vectors it is both exact and fast enough (3,291 London map images:
  ~2 ms a query).
- `pq-fastscan`: above it, 4-bit product-quantisation codes in two stages, and an exact re-rank. Coarse
  fast-scan codes of `coarse_m` sub-quantizers (scanned with SIMD distance tables, every code: no
  true neighbour is lost to an unprobed cell) find a `shortlist`, which finer codes of m x 4 bits
  (32 bytes at m 64, plain layout, memory-mapped) order; their nearest `rerank` (at least k) are
  re-ranked by their exact distance to the float vectors, which stay on disk (vectors.npz: a query
  reads only its shortlist's rows, with pread, into the page cache all workers share). This is the
  only PQ layout the service writes and reads; bench/ann.py compares alternatives, bench/million.py
  serves a million vectors this way (`served_1m`).

A version split into shards (indexer/store.py) and loaded whole by one process is a PartsIndex over
its shards' indexes when they hold PQ codes: each searched with its own codes, answers merged.

A PQIndex (and a PartsIndex) answers the calls the service makes of a FAISS index (search, add_with_ids, remove_ids,
ntotal, d), so the searcher and the living index do not care which kind they hold. An online add is
encoded into the codes at once and its float vector kept in memory until the next version is
published; a delete marks its code dead. Changes go to a copy (`copy_for_change`): the codes are
small (16 + 32 MB a million at the presets' two stages) and copied, the float vectors on disk are
shared.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import faiss
import numpy as np

from common.files import atomic_savez, backing_files, mapped_npz, read_rows
from common.pipeline import IndexConf

EXACT = "flat-l2"
PQ = "pq-fastscan"
VECTORS_FILE = "vectors.npz"  # the float vectors a pq-fastscan index re-ranks with
VECTORS_ARRAYS = {"ids", "vectors", "rerank", "shortlist"}  # what PQIndex.save writes into it


def new_flat_index(dim: int) -> faiss.Index:
    # IndexIDMap2 keeps our ids in the index; the id map file gives each id its image.
    return faiss.IndexIDMap2(faiss.IndexFlatL2(dim))


def index_kind(conf: IndexConf, n: int) -> str:
    """The kind of index for n vectors under the pipeline's index conf."""
    if conf.kind == "auto":
        return PQ if n >= conf.exact_below else EXACT
    return EXACT if conf.kind == "exact" else PQ


SCAN_BLOCK = 64  # codes a fast-scan block holds (new_coarse_codes)
# What a version of another layout (an earlier build's) is told: it does not load, it is rebuilt.
REBUILD = "not the layout this build writes; rebuild the index (`imgsearch build`)"


def new_coarse_codes(d: int, m: int) -> faiss.IndexPQFastScan:
    """The untrained coarse codes of a two-stage scan: fast-scan codes of m x 4 bits, every one scanned."""
    # Blocks of 64 codes, not FAISS's default 32: a query's distance tables are loaded once a block,
    # and a million coarse codes scan a few % faster (BENCHMARKS.md: bench/studies/search_parts.py).
    return faiss.IndexPQFastScan(d, m, 4, faiss.METRIC_L2, SCAN_BLOCK)


def new_fine_codes(d: int, m: int, xt: np.ndarray) -> faiss.IndexPQ:
    """The finer codes of a two-stage scan: m x 4 bits in FAISS's plain layout (IndexPQ, not fast-scan's
    blocks), so that the coarse shortlist's codes can be scored alone; trained on xt, empty."""
    if d % m or m % 2:
        raise ValueError(f"dimension {d} does not split into an even m={m} of sub-vectors")
    fine = faiss.IndexPQ(d, m, 4)
    fine.train(np.ascontiguousarray(xt, np.float32))
    return fine


def owned_fine_codes(fine: faiss.IndexPQ, with_codes: bool) -> faiss.IndexPQ:
    """Fine codes with the same codebooks in this process's memory, with a copy of the codes or none.
    (FAISS's clone of a memory-mapped index still views the mapping, and a change to it aborts.)"""
    out = faiss.IndexPQ(fine.pq.d, fine.pq.M, fine.pq.nbits)
    out.pq = fine.pq  # copied
    out.is_trained = True
    codes = faiss.vector_to_array(fine.codes) if with_codes else np.zeros(0, np.uint8)
    if codes.size:
        faiss.copy_array_to_vector(codes, out.codes)
        out.ntotal = codes.size // fine.pq.code_size
    return out


class PQIndex:
    """Two stages of PQ codes of every vector, whose shortlist is re-ranked exactly (module docstring).

    Codes sit in slots, in the order they were added: the version's vectors first, sorted by id (their
    float vectors are the rows of the version's vectors.npz), then those added online (float vectors
    in memory). A delete marks its slot dead rather than taking the code out (FAISS's fast-scan
    remove_ids scrambles the codes added after it, measured on faiss 1.15), and dead slots are left
    out of every answer; publishing a version writes the live ones only.

    The fast-scan `codes` are coarse (fewer sub-quantizers, so a scan of every code costs less) and
    only find a `shortlist`; the `fine` codes score it, and the fine codes' nearest `rerank` are
    re-ranked exactly. Both code stages run in FAISS's C++ (IndexRefine over the two, one
    index.faiss), where numpy's gathering and table lookups of the shortlist cost more than the C++
    loop (0.6 against 0.15 ms at 800). A loaded version's fine codes are memory-mapped from its file,
    shared by the workers; a change works on an owned copy."""

    kind = PQ

    def __init__(
        self,
        codes: faiss.IndexPQFastScan,
        fine: faiss.IndexPQ,
        slot_ids: np.ndarray,
        base: np.ndarray,
        rerank: int,
        shortlist: int,
        alive: np.ndarray | None = None,
        added: list[np.ndarray] | None = None,
        added_slot: dict[int, int] | None = None,
        refine: faiss.IndexRefine | None = None,
        mapped: bool = False,
    ) -> None:
        if fine.ntotal != codes.ntotal:
            raise ValueError(f"{fine.ntotal} fine codes for {codes.ntotal} coarse codes")
        self.codes = codes
        self.fine = fine
        self.slot_ids = slot_ids  # (slots,) int64: the id whose code each slot holds
        self.base = base  # (n_base, d) float32 vectors of the first slots, memory-mapped
        self.rerank = int(rerank)  # the fine codes' candidates re-ranked exactly
        self.shortlist = int(shortlist)  # the coarse codes' candidates that the fine codes score
        self.alive = np.ones(len(slot_ids), bool) if alive is None else alive
        self.added = list(added or [])  # float vectors of the slots after the base ones
        self.added_slot = dict(added_slot or {})  # id -> its live slot among those added online
        self._ntotal = int(self.alive.sum())
        # The two code stages as one FAISS index; one made here owns neither: self holds both.
        self.refine = faiss.IndexRefine(codes, fine) if refine is None else refine
        self.mapped = mapped  # the fine codes are a read-only mapping of the version's file
        self._params: dict[tuple[int, int], faiss.IndexRefineSearchParameters] = {}

    @classmethod
    def build(cls, xb: np.ndarray, ids: np.ndarray, conf: IndexConf, seed: int = 0) -> PQIndex:
        """Codes trained on (a seeded sample of) xb itself, then every vector encoded."""
        xb = np.ascontiguousarray(xb, np.float32)
        ids = np.asarray(ids, np.int64)
        if xb.ndim != 2 or len(xb) != len(ids):
            raise ValueError(f"{len(ids)} ids for vectors of shape {xb.shape}")
        m, coarse = conf.m, conf.coarse_m
        if not 0 < coarse < m:
            raise ValueError(f"coarse_m={coarse} must be above 0 and below m={m}: the index scans in two stages")
        if xb.shape[1] % coarse:
            raise ValueError(f"dimension {xb.shape[1]} does not split into coarse_m={coarse} sub-vectors")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("the ids of an index must be unique")
        if not np.all(ids[1:] > ids[:-1]):  # base slots are in id order, so an id finds its row by bisection
            order = np.argsort(ids, kind="stable")
            xb, ids = xb[order], ids[order]
        n_train = min(len(xb), conf.train_size)
        codes = new_coarse_codes(int(xb.shape[1]), coarse)
        rows = np.sort(np.random.default_rng(seed).choice(len(xb), size=n_train, replace=False))
        xt = np.ascontiguousarray(xb[rows])
        codes.train(xt)
        for start in range(0, len(xb), 65536):
            codes.add(xb[start : start + 65536])
        fine = new_fine_codes(int(xb.shape[1]), m, xt)
        for start in range(0, len(xb), 65536):
            fine.add(xb[start : start + 65536])
        return cls(codes, fine, ids, xb, conf.rerank, shortlist=conf.shortlist)

    @property
    def d(self) -> int:
        return int(self.codes.d)

    @property
    def ntotal(self) -> int:
        return self._ntotal

    def ids(self) -> np.ndarray:
        """The served ids, in slot order."""
        served: np.ndarray = self.slot_ids[self.alive]
        return served

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
        # The fine codes order the coarse codes' nearest `shortlist`, and only their nearest `rerank`
        # are re-ranked exactly; past them (k > rerank: the expansion pool) the fine order and
        # distances stand, raised where needed so that the row stays sorted.
        want = min(len(self.alive), max(k, self.rerank) + dead)
        deep = max(self.shortlist + dead, want)
        est, cand = self.refine.search(x, want, params=self._refine_params(want, deep))
        for r, row in enumerate(cand):
            keep = row >= 0
            if dead:
                keep &= self.alive[np.maximum(row, 0)]
            slots = row[keep]
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
            params = self._params[want, deep] = faiss.IndexRefineSearchParameters()
            params.k_factor = (deep + 0.5) / want  # as the constructor's k_factor= would (FAISS's stub lacks it)
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
        self.refine.add(x)
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
        # FAISS returns the clone downcast to its own class (its stub says Index)
        self.codes = cast(faiss.IndexPQFastScan, faiss.clone_index(self.codes))
        self.fine = owned_fine_codes(self.fine, with_codes=True)
        self.refine = faiss.IndexRefine(self.codes, self.fine)
        self.mapped = False

    def copy(self) -> PQIndex:
        """A copy safe to change while this one serves: its own codes and slot tables (small: 48 MB a
        million), the same read-only float vectors on disk."""
        out = PQIndex(
            self.codes,
            self.fine,
            self.slot_ids.copy(),
            self.base,
            self.rerank,
            self.shortlist,
            self.alive.copy(),
            list(self.added),  # the copy's adds must not show in this one's tables
            dict(self.added_slot),
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
        codes = self.refine
        changed = len(self.alive) != len(self.base) or not self.alive.all()
        if changed:
            coarse = faiss.clone_index(self.codes)
            coarse.reset()  # keeps the trained codebooks
            codes = faiss.IndexRefine(coarse, owned_fine_codes(self.fine, with_codes=False))
            for start in range(0, len(xb), 65536):
                codes.add(xb[start : start + 65536])
        faiss.write_index(codes, str(index_path))
        atomic_savez(
            vectors_path, ids=ids, vectors=xb, rerank=np.array(self.rerank), shortlist=np.array(self.shortlist)
        )

    @classmethod
    def load(cls, index_path: Path, vectors_path: Path) -> PQIndex:
        """What `save` wrote; ValueError for files of another layout (one-stage codes, codes in cells,
        fine codes in vectors.npz: earlier builds') or that do not fit each other."""
        # The fine codes (IndexPQ's) memory-mapped, shared by the workers; fast-scan's are read.
        refine = faiss.read_index(str(index_path), getattr(faiss, "IO_FLAG_MMAP_IFC", 0))
        if not isinstance(refine, faiss.IndexRefine):
            raise ValueError(f"{index_path} holds no two-stage PQ codes: {REBUILD}")
        codes, fine = faiss.downcast_index(refine.base_index), faiss.downcast_index(refine.refine_index)
        if not isinstance(codes, faiss.IndexPQFastScan) or not isinstance(fine, faiss.IndexPQ) or fine.pq.nbits != 4:
            raise ValueError(f"{index_path}: codes of {type(codes).__name__} and {type(fine).__name__}: {REBUILD}")
        z = mapped_npz(vectors_path)
        if set(z) != VECTORS_ARRAYS:
            raise ValueError(f"{vectors_path}: arrays {sorted(z)}, not {sorted(VECTORS_ARRAYS)}: {REBUILD}")
        ids = np.asarray(z["ids"], np.int64)
        if z["vectors"].shape != (len(ids), codes.d) or codes.ntotal != len(ids):
            raise ValueError(f"{vectors_path}: vectors of shape {z['vectors'].shape} for {codes.ntotal} codes")
        if not np.all(ids[1:] > ids[:-1]):
            raise ValueError(f"{vectors_path}: ids are not sorted and unique")
        if fine.ntotal != len(ids):
            raise ValueError(f"{index_path}: {fine.ntotal} fine codes for {len(ids)} vectors")
        rerank, shortlist = int(z["rerank"]), int(z["shortlist"])
        return cls(codes, fine, ids, z["vectors"], rerank, shortlist, refine=refine, mapped=True)


class PartsIndex:
    """The shards of a version served by one process (the embedded engine loading a sharded version
    whole), each searched with its own codes and the answers merged by distance, ties by id: what the
    sharded engines' heads get from the same shards (retrieval/shards.py: merge_hits). Merging PQ
    shards into one index would train new codes at every start: other answers, and minutes and
    gigabytes at a million. Image i is in part i % len(parts), as in the shards (indexer/store.py)."""

    kind = "parts"

    def __init__(self, parts: list[AnyIndex]) -> None:
        if len(parts) < 2 or len({p.d for p in parts}) != 1:
            raise ValueError(f"{len(parts)} parts of dimensions {sorted({p.d for p in parts})}")
        self.parts = parts

    @property
    def d(self) -> int:
        return int(self.parts[0].d)

    @property
    def ntotal(self) -> int:
        return sum(int(p.ntotal) for p in self.parts)

    def _owners(self, ids: np.ndarray) -> list[np.ndarray]:
        """For each part, the positions in `ids` of the ids it holds."""
        owner = np.asarray(ids, np.int64) % len(self.parts)
        return [np.flatnonzero(owner == i) for i in range(len(self.parts))]

    def ids(self) -> np.ndarray:
        return np.concatenate([index_ids(p) for p in self.parts])

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        out = np.empty((len(ids), self.d), np.float32)
        for part, pos in zip(self.parts, self._owners(ids), strict=True):
            if len(pos):
                out[pos] = vectors_of(part, ids[pos])
        return out

    def on_demand_files(self) -> list[Path]:
        return [f for p in self.parts if isinstance(p, PQIndex) for f in p.on_demand_files()]

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, np.float32)
        answers = [p.search(x, k) for p in self.parts]
        d2 = np.concatenate([a[0] for a in answers], axis=1)
        found = np.concatenate([a[1] for a in answers], axis=1)
        out_d2 = np.full((len(x), max(k, 0)), np.inf, np.float32)
        out_ids = np.full((len(x), max(k, 0)), -1, np.int64)
        for r in range(len(x)):
            keep = np.flatnonzero(found[r] >= 0)
            top = keep[np.lexsort((found[r][keep], d2[r][keep]))][:k]
            out_d2[r, : len(top)], out_ids[r, : len(top)] = d2[r][top], found[r][top]
        return out_d2, out_ids

    def add_with_ids(self, x: np.ndarray, ids: np.ndarray) -> None:
        x, ids = np.ascontiguousarray(x, np.float32), np.asarray(ids, np.int64)
        for part, pos in zip(self.parts, self._owners(ids), strict=True):
            if len(pos):
                part.add_with_ids(x[pos], ids[pos])

    def remove_ids(self, ids: np.ndarray) -> int:
        ids = np.asarray(ids, np.int64)
        return sum(int(part.remove_ids(ids[pos])) for part, pos in zip(self.parts, self._owners(ids), strict=True))

    def copy(self) -> PartsIndex:
        return PartsIndex([copy_for_change(p) for p in self.parts])


AnyIndex = faiss.Index | PQIndex | PartsIndex


def build_index(conf: IndexConf, xb: np.ndarray, ids: np.ndarray) -> AnyIndex:
    """The kind of index the collection's size calls for (index_kind), holding xb under ids."""
    if index_kind(conf, len(ids)) == PQ:
        return PQIndex.build(xb, ids, conf)
    index = new_flat_index(int(xb.shape[1]))
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(xb, np.float32), np.asarray(ids, np.int64))
    return index


def index_ids(index: AnyIndex) -> np.ndarray:
    """The ids held, in storage order."""
    if isinstance(index, PQIndex | PartsIndex):
        return index.ids()
    if index.ntotal == 0:
        return np.zeros(0, np.int64)
    return faiss.vector_to_array(cast(faiss.IndexIDMap, faiss.downcast_index(index)).id_map).astype(np.int64)


def index_contents(index: AnyIndex) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float vectors) held, in storage order."""
    ids = index_ids(index)
    if isinstance(index, PQIndex | PartsIndex):
        return ids, index.vectors_of(ids)
    if index.ntotal == 0:
        return ids, np.zeros((0, index.d), np.float32)
    return ids, cast(faiss.IndexIDMap, faiss.downcast_index(index)).index.reconstruct_n(0, index.ntotal)


def copy_for_change(index: AnyIndex) -> AnyIndex:
    """A copy to apply online changes to while `index` keeps serving. FAISS indexes are not safe to
    change while another thread searches them, and a flat index memory-mapped from its file cannot be
    changed at all: the flat copy owns its vectors."""
    if isinstance(index, PQIndex | PartsIndex):
        return index.copy()
    out = new_flat_index(index.d)
    ids, xb = index_contents(index)
    if len(ids):
        out.add_with_ids(xb, ids)
    return out


def vectors_of(index: AnyIndex, ids: np.ndarray) -> np.ndarray:
    """The float vectors of these served ids, (len(ids), d); KeyError for an id that is not served."""
    ids = np.asarray(ids, np.int64)
    if isinstance(index, PQIndex | PartsIndex):
        return index.vectors_of(ids)
    if len(ids) == 0:
        return np.zeros((0, index.d), np.float32)
    idmap = cast(faiss.IndexIDMap2, faiss.downcast_index(index))
    try:
        out: np.ndarray = idmap.reconstruct_batch(ids)
    except RuntimeError as e:  # FAISS names no id; say which
        served = set(index_ids(index).tolist())
        raise KeyError(f"ids not in the index: {[i for i in ids.tolist() if i not in served][:5]}") from e
    return out
