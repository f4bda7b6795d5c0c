#!/usr/bin/env python3
"""Study: how well verification variants tell the relevant map images of a shortlist from the rest.

    python bench/studies/verify_screen.py --data ../shared/datasets/london --artifacts ARTIFACTS \\
        --cv cv-default-1k-ab72a39d.npz --index-preset default-1k

For every query of a cross-validation's out-of-fold answers (`cv-*.npz`: each query's top 50, which
the preset's verification re-ranked), the 50 candidates are verified again under each variant (the
verification keypoints' count and enlargement, and the words per query keypoint), and the candidate
with the most inliers (by the preset's own Verifier, with the variant's keypoints) is taken as the
top 1 (ties to the shortlist's order). The share of queries
whose top 1 is relevant measures the verification alone: no head, no distance. It screens variants
before a full cross-validation (`imgsearch evaluate`), which alone decides; paired differences to the
first variant with a 95% interval from a bootstrap over the cross-validation's cells. One JSON line
per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from common.pipeline import VerifyConf, get_pipeline
from common.retrieval_metrics import cluster_bootstrap
from common.threads import single_threaded
from dataset.layout import load_dataset
from features.decode import ImageDecodeError
from features.extract import image_to_features
from features.orb import NoKeypointsError, OrbFeatures
from indexer import store
from model.vectorize import Vectorizer
from model.verify import MapFeatures, Verifier

# (keypoints, enlargement): the verification keypoints, each screened with 1 and 2 words a query keypoint
KEYPOINTS = [(1000, 1.0), (1500, 1.5), (2000, 2.0)]
QUERY_WORDS = (1, 2)

_state: dict[str, object] = {}  # set before each pool is forked, read by its workers


def _features(path: str) -> tuple[OrbFeatures, np.ndarray] | None:
    conf, vectorizer = _state["conf"], _state["vectorizer"]
    assert isinstance(vectorizer, Vectorizer)
    try:
        f = image_to_features(Path(path).read_bytes(), conf)  # type: ignore[arg-type]
    except (ImageDecodeError, NoKeypointsError):
        return None
    return f, vectorizer.words(f.descriptors, max(QUERY_WORDS))


def _top1(args: tuple[int, np.ndarray]) -> int:
    """The shortlist position with the most inliers, by the index's own verifier (-1: no features)."""
    q, cands = args
    found, verify, k = _state["found"], _state["verify"], _state["k"]
    assert isinstance(found, dict) and isinstance(verify, VerifyConf) and isinstance(k, int)
    good = [int(c) for c in cands if c >= 0 and ("d", int(c)) in found]
    if ("q", q) not in found or not good:
        return -1
    store = MapFeatures.build(good, [found["d", c][0] for c in good], [found["d", c][1] for c in good])
    query, words = found["q", q]
    verifier = Verifier(verify, None, store, int(_state["n_words"]), [0.0, 1.0, 0.0])  # type: ignore[call-overload]
    inliers = verifier.inliers(query, words[:, :k], good)
    return int(np.flatnonzero(cands == good[int(np.argmax(inliers))])[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/datasets/london"))
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--cv", required=True, help="cv-*.npz (under <artifacts>/<data>/) whose shortlists to verify")
    p.add_argument("--index-preset", default="default-1k", help="served index whose vocabulary gives the words")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--queries", type=int, default=0, help="the first N queries only (default: all)")
    args = p.parse_args(argv)
    ds = load_dataset(args.data)
    root = store.data_dir(args.artifacts, ds.root)
    cv = dict(np.load(root / args.cv))
    if ds.sim is None:
        print("verify_screen: the data has no ground truth", file=sys.stderr)
        return 2
    pipeline = get_pipeline(args.index_preset)
    version = store.current_version(store.index_family(args.artifacts, args.data, args.index_preset))
    vectorizer = Vectorizer.load(version / "vectorizer.npz", pipeline.vector)
    n_q = args.queries or len(cv["rows"])
    rows, cells, ranked = cv["rows"][:n_q], cv["cell"][:n_q], cv["ranked"][:n_q]
    relevant = np.take_along_axis(ds.sim[rows], np.maximum(ranked, 0), 1) & (ranked >= 0)
    needed = sorted({int(c) for c in ranked.ravel() if c >= 0})
    paths = [str(ds.image_path(ds.queries.paths[q])) for q in rows] + [
        str(ds.image_path(ds.database.paths[d])) for d in needed
    ]
    keys = [("q", int(q)) for q in rows] + [("d", d) for d in needed]
    assert pipeline.verify is not None
    base = None
    for nfeatures, up in KEYPOINTS:
        conf = pipeline.verify_features.model_copy(update={"nfeatures": nfeatures, "upsample": up})
        _state.update(conf=conf, vectorizer=vectorizer, n_words=vectorizer.n_words)
        with single_threaded(), Pool(args.jobs) as pool:  # extracted once, screened with each word count
            got = pool.map(_features, paths, chunksize=32)
        _state["found"] = {key: g for key, g in zip(keys, got, strict=True) if g is not None}
        for k in QUERY_WORDS:
            _state.update(k=k, verify=pipeline.verify.model_copy(update={"nfeatures": nfeatures, "upsample": up}))
            with single_threaded(), Pool(args.jobs) as pool:
                top = np.array(pool.map(_top1, list(zip(rows.tolist(), ranked, strict=True)), chunksize=8))
            hit = np.where(top >= 0, relevant[np.arange(len(rows)), np.maximum(top, 0)], False).astype(float)
            out = {"nfeatures": nfeatures, "upsample": up, "query_words": k, "r1_by_inliers": round(hit.mean(), 4)}
            if base is None:
                base = hit
            else:
                lo_hi = cluster_bootstrap(hit - base, cells)
                out["delta"] = round(float((hit - base).mean()), 4)
                out["delta_interval"] = None if lo_hi is None else [round(v, 4) for v in lo_hi]
            print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
