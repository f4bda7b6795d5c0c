"""Area-fold cross-validation: what photos from streets nobody tuned on will get.

The labelled queries outside the test split are dealt by map cells into folds (dataset/split.py
area_folds). For each fold, every piece fitted on labels (the encoder with its pair whitening and
score head, the verification head, the expansion prior, the location head) is fitted again from the
other folds alone, by the same `Fitter.fit` that fits the served model from every query, and the
fold's queries are ranked through the query path. The out-of-fold answers are pooled into one summary
(evaluation/evaluate.py) with 95% intervals from a bootstrap over cells: queries of one area rise and
fall together. Then one final look: the model fitted on all but the test split, on the test split.

What is fitted without labels (the visual vocabulary and PCA of the map images) sees only map images,
which a service has for any area it covers, so it is fitted once.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.clock import utc_timestamp
from common.pipeline import Pipeline, SplitConf
from common.retrieval_metrics import cluster_bootstrap
from common.threads import single_threaded
from dataset.layout import Dataset
from dataset.split import area_folds, fit_split, split_queries
from evaluation.evaluate import IN_PROCESS, KS, Answer, Evaluation, evaluate, summary
from features.decode import ImageDecodeError
from features.extract import image_to_features
from features.orb import NoKeypointsError, OrbFeatures
from indexer import build as index_build
from indexer.build import MapArrays, StagedIndex
from indexer.store import LoadedIndex
from model import train
from model.encoder import NumpyEncoder
from model.vectorize import Vectorizer
from model.vectors import load_vectors, vectorizer_path
from model.verify import Evidence
from retrieval.heads import Analysed, fit_heads
from retrieval.locate import DEFAULT_UTM_EPSG, estimate_location
from retrieval.searcher import Backend, Candidates, Query, Searcher

log = logging.getLogger(__name__)

NO_FEATURES = OrbFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8))

SCHEMA = 1
STAGES = ("features", "vector", "encoder", "index", "verify", "expand", "split")  # all that decides the figures
K_MAX = max(KS)
# The figures given an interval: per-query values whose mean is the summary's figure.
INTERVAL_KEYS = (
    *(f"recall@{k}" for k in KS),
    "precision@10",
    "mAP",
    "localised_within_25m",
    "localisation_right",
)


class MemoInliers:
    """A backend whose verification inliers are remembered per (query keypoints, map image): a pair
    verifies the same whichever encoder shortlisted it, and most pairs come back fit after fit."""

    def __init__(self, inner: Backend, memo: dict[int, dict[int, int]], found: dict[int, dict[int, Evidence]]) -> None:
        self.inner = inner
        self.memo = memo
        # The same for the inlier matches, where the heads weigh each inlier. Kept apart from the
        # counts: most presets need the counts alone, a few bytes a pair against the matches' hundreds.
        self.found = found

    @property
    def size(self) -> int:
        return self.inner.size

    def nearest(self, embedding: np.ndarray, k: int) -> Candidates:
        return self.inner.nearest(embedding, k)

    def inliers(self, q: OrbFeatures, q_words: np.ndarray, ids: list[int]) -> np.ndarray:
        known = self.memo.setdefault(id(q), {})
        missing = [i for i in ids if i not in known]
        if missing:
            known.update(zip(missing, self.inner.inliers(q, q_words, missing).tolist(), strict=True))
        return np.array([known[i] for i in ids], np.int64)

    def distances(self, embedding: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return self.inner.distances(embedding, ids)

    def evidence(self, q: OrbFeatures, q_words: np.ndarray, ids: list[int]) -> list[Evidence]:
        known = self.found.setdefault(id(q), {})
        missing = [i for i in ids if i not in known]
        if missing:
            known.update(zip(missing, self.inner.evidence(q, q_words, missing), strict=True))
        return [known[i] for i in ids]

    def on_demand_files(self) -> list[Path]:
        return self.inner.on_demand_files()


class Fitter:
    """Fits a pipeline's labelled pieces on any split of the queries, sharing what does not depend on
    the labels between fits: the vectors, the map images' verification keypoints, each query's
    features and aggregate vector, and the inliers of each (query, map image) pair."""

    def __init__(self, conf: Pipeline, dataset: Dataset, vectors_path: Path, out_root: Path, jobs: int | None) -> None:
        self.conf, self.dataset, self.vectors_path, self.out_root = conf, dataset, vectors_path, out_root
        # A query's aggregate vector as the vectors stage made it: bit for bit what the query path
        # computes from its bytes (same decode, features and vectorizer), so each is computed once.
        self.xq, self.q_ok = load_vectors(vectors_path, dataset.queries.paths)
        self.xd, self.ok = load_vectors(vectors_path, dataset.database.paths)
        self.vectorizer = Vectorizer.load(vectorizer_path(vectors_path), conf.vector)
        self.keypoints = None
        if conf.verify is not None:
            self.keypoints = index_build.build_map_features(conf, dataset, self.vectorizer, out_root, jobs)
        self._verify: dict[int, tuple[OrbFeatures, np.ndarray] | None] = {}
        self._memo: dict[int, dict[int, int]] = {}
        self._found: dict[int, dict[int, Evidence]] = {}

    def searcher(self, loaded: LoadedIndex) -> Searcher:
        s = Searcher(loaded)
        s.backend = MemoInliers(s.backend, self._memo, self._found)
        return s

    def fit(self, split: dict[str, np.ndarray], model_dir: Path) -> StagedIndex:
        """The encoder trained on split["train"] (into model_dir), the map embedded with it, and the
        heads fitted on split["val"]: a staged index, searchable, not published."""
        train.fit(self.conf, self.dataset, self.xq, self.xd, split, model_dir)
        encoder = NumpyEncoder.load(model_dir / "encoder.npz")
        arrays = MapArrays(encoder.embed(self.xd), self.ok, self.keypoints)
        # Staged beside the model (not in out_root, where a served build stages its own files).
        staged = index_build.build(
            self.conf, self.dataset, self.vectors_path, model_dir, model_dir.parent, arrays=arrays
        )
        # One query at a time, as the service runs them: single-threaded kernels are faster per query.
        with single_threaded():
            fit_heads(staged, self.dataset, self.queries(staged, split["val"]), self.searcher)
        return staged

    def queries(self, staged: StagedIndex, rows: np.ndarray) -> Analysed:
        """The queries at `rows` embedded by the staged encoder, with their verification keypoints
        (extracted once for all fits); a photo the pipeline refuses is left out. The aggregation's
        own features are not kept: ranking reads the embedding and the verification keypoints."""
        encoder = staged.loaded.encoder
        out = []
        for q in rows.tolist():
            if not self.q_ok[q]:
                continue  # no features: the query path refuses it
            verify, words = None, None
            if self.keypoints is not None:
                if q not in self._verify:
                    self._verify[q] = self._verify_keypoints(q)
                if (found := self._verify[q]) is None:
                    continue
                verify, words = found
            out.append((q, Query(NO_FEATURES, encoder.embed(self.xq[q][None, :]), verify, words)))
        return out

    def _verify_keypoints(self, q: int) -> tuple[OrbFeatures, np.ndarray] | None:
        data = self.dataset.image_path(self.dataset.queries.paths[q]).read_bytes()
        try:
            feats = image_to_features(data, self.conf.verify_features)
        except (ImageDecodeError, NoKeypointsError):
            return None
        assert self.conf.verify is not None  # keypoints are extracted only for a verifying pipeline
        return feats, self.vectorizer.words(feats.descriptors, self.conf.verify.query_words)

    def evaluate(self, staged: StagedIndex, rows: np.ndarray, name: str) -> Evaluation:
        """The queries at `rows` ranked as POST /search ranks them (analysed once for all fits)."""
        searcher = self.searcher(staged.loaded)
        analysed = dict(self.queries(staged, rows))

        def rank(q: int) -> Answer | None:
            query = analysed.get(q)
            if query is None:
                return None
            hits = searcher.rank(query, K_MAX)
            est = estimate_location(hits, DEFAULT_UTM_EPSG, head=searcher.location_head)
            where = None if est.easting is None or est.northing is None else (est.easting, est.northing)
            return Answer(
                [h.id for h in hits], where if est.status == "estimated" else None, lambda: searcher.score_all(query)
            )

        with single_threaded():
            return evaluate(rank, self.dataset, rows, name, ranked_by=IN_PROCESS, scored=True)


def discard(staged: StagedIndex) -> None:
    """Remove what staging wrote to be published (a fit that is only measured never is)."""
    for f in staged.staged:
        f.unlink(missing_ok=True)


@dataclass
class CrossValidation:
    """Out-of-fold answers of every cross-validated query, and the summaries made of them."""

    rows: np.ndarray  # (n,) query rows, ascending
    fold: np.ndarray  # (n,) the fold each was held out in
    cell: np.ndarray  # (n,) its map cell (the bootstrap's unit)
    ranked: np.ndarray  # (n, K_MAX) map rows, -1 for none
    loc_error: np.ndarray  # (n,) metres, NaN where no location was estimated
    cv: dict[str, Any]  # pooled summary with "intervals"
    test: dict[str, Any] | None  # the final look: the test split, fitted on the rest

    def save(self, path: Path) -> Path:
        """The per-query answers (npz, for paired comparisons and the failure analysis) next to the
        summaries (json)."""
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(
            tmp, rows=self.rows, fold=self.fold, cell=self.cell, ranked=self.ranked, loc_error=self.loc_error
        )
        tmp.replace(path.with_suffix(".npz"))
        body = {"schema": SCHEMA, "cv": self.cv, "test": self.test}
        path.with_suffix(".tmp.json").write_text(json.dumps(body, indent=1), encoding="utf-8")
        path.with_suffix(".tmp.json").replace(path.with_suffix(".json"))
        return path.with_suffix(".json")

    @classmethod
    def load(cls, path: Path) -> CrossValidation:
        body = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        if body.get("schema") != SCHEMA:
            raise ValueError(f"{path}: cross-validation of another schema: run it again")
        with np.load(path.with_suffix(".npz")) as z:
            arrays = {k: z[k] for k in ("rows", "fold", "cell", "ranked", "loc_error")}
        return cls(**arrays, cv=body["cv"], test=body["test"])


def per_query(ranked: np.ndarray, sim: np.ndarray, loc_error: np.ndarray) -> dict[str, np.ndarray]:
    """(n,) values whose means are the summary's figures; NaN where a query does not count (no
    relevant map image for the retrieval figures; no estimate for `localisation_right`)."""
    hit = np.zeros(ranked.shape, bool)
    valid = ranked >= 0
    hit[valid] = sim[np.nonzero(valid)[0], ranked[valid]]
    n_rel = sim.sum(axis=1)
    scored = n_rel > 0
    out: dict[str, np.ndarray] = {}
    for k in KS:
        out[f"recall@{k}"] = np.where(scored, hit[:, :k].any(axis=1), np.nan)
    out["precision@10"] = np.where(scored, hit[:, :10].sum(axis=1) / 10, np.nan)
    ranks = np.arange(1, ranked.shape[1] + 1)
    ap = (np.cumsum(hit, axis=1) / ranks * hit).sum(axis=1) / np.maximum(np.minimum(n_rel, ranked.shape[1]), 1)
    out["mAP"] = np.where(scored, ap, np.nan)
    answered = ~np.isnan(loc_error)
    out["localised_within_25m"] = (np.nan_to_num(loc_error, nan=np.inf) < 25.0).astype(np.float64)
    out["localisation_right"] = np.where(answered, np.nan_to_num(loc_error, nan=np.inf) < 25.0, np.nan)
    return out


def intervals(
    ranked: np.ndarray, sim: np.ndarray, loc_error: np.ndarray, cell: np.ndarray
) -> dict[str, list[float] | None]:
    """95% bootstrap-over-cells interval of each INTERVAL_KEYS figure."""
    values = per_query(ranked, sim, loc_error)
    out: dict[str, list[float] | None] = {}
    for key in INTERVAL_KEYS:
        iv = cluster_bootstrap(values[key], cell)
        out[key] = None if iv is None else [round(iv[0], 4), round(iv[1], 4)]
    return out


def cv_name(conf: Pipeline) -> str:
    """The cross-validation's files, named by everything that decides its figures."""
    return f"cv-{conf.name}-{conf.digest(*STAGES)}"


def fold_splits(
    loc: np.ndarray, conf: SplitConf, relevant: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, np.ndarray]]]:
    """The cross-validated query rows (all but the test split's), the fold and cell of each, and per
    fold what fits on which rows: the other folds' rows dealt by fit_split, the fold's as "test"."""
    outer = split_queries(loc, conf)
    pool = np.sort(np.concatenate([outer["train"], outer["val"]]))
    fold, cell = area_folds(loc[pool], conf.folds, conf.cell_m, conf.seed)
    splits = [fit_split(loc, pool[fold != f], conf, relevant) | {"test": pool[fold == f]} for f in range(conf.folds)]
    return pool, fold, cell, splits


def main(conf: Pipeline, dataset: Dataset, vectors_path: Path, out_root: Path, jobs: int | None = None) -> Path:
    """Cross-validate the pipeline over the areas outside the test split, then take the final look at
    the test split; saved as cv-*.json (figures) and cv-*.npz (answers) in out_root, reused when they
    exist. Returns the json file."""
    path = out_root / f"{cv_name(conf)}.json"
    if path.exists():
        return path
    if dataset.sim is None:
        raise ValueError(f"{dataset.root}: cross-validation needs ground truth")
    loc = dataset.queries.loc
    pool, fold, cell, splits = fold_splits(loc, conf.split, np.asarray(dataset.sim.any(axis=1)))
    fitter = Fitter(conf, dataset, vectors_path, out_root, jobs)
    ranked = np.full((len(pool), K_MAX), -1, np.int64)
    loc_error = np.full(len(pool), np.nan)
    scores = np.zeros((len(pool), len(dataset.database)), np.float32)
    per_fold = []
    with tempfile.TemporaryDirectory(prefix=".cv-", dir=out_root) as tmp:
        for f, split in enumerate(splits):
            held = fold == f
            staged = fitter.fit(split, Path(tmp) / f"fold-{f}")
            ev = fitter.evaluate(staged, pool[held], f"fold {f}")
            discard(staged)
            ranked[held], loc_error[held] = ev.ranked, ev.loc_error
            assert ev.scores is not None  # evaluated `scored`
            scores[held] = ev.scores
            per_fold.append({k: ev.summary[k] for k in ("n_queries", "recall@1", "recall@10", "recall@50")})
            log.info("cv %s fold %d/%d: R@1 %.3f", conf.name, f + 1, conf.split.folds, ev.summary["recall@1"])
        heldout = train.served_split(dataset, conf, served=False)
        staged = fitter.fit(heldout, Path(tmp) / "test")
        test_ev = fitter.evaluate(staged, heldout["test"], "test")
        test = test_ev.summary | {"localisation_right": _share_right(test_ev.loc_error)}
        discard(staged)
    cv = summary(ranked, dataset, pool, "cv", ranked_by=IN_PROCESS, scores=scores, loc_error=loc_error)
    assert dataset.sim is not None
    cv |= {
        "folds": conf.split.folds,
        "cell_m": conf.split.cell_m,
        "per_fold": per_fold,
        "intervals": intervals(ranked, dataset.sim[pool], loc_error, cell),
        "localisation_right": _share_right(loc_error),
        "latency_ms_p50": None,
        "latency_ms_mean": None,
        "computed_at": utc_timestamp(),
    }
    result = CrossValidation(pool, fold, cell, ranked, loc_error, cv, test)
    return result.save(path)


def _share_right(loc_error: np.ndarray) -> float | None:
    answered = ~np.isnan(loc_error)
    return float((loc_error[answered] < 25.0).mean()) if answered.any() else None
