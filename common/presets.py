"""Named pipeline presets (hloc style): each preset is merged over DEFAULTS.

A preset fixes everything that must agree between the map images in the index and a query:
image decoding, ORB settings, the fixed-length vector and the encoder that was trained on it.
"""

from __future__ import annotations

import copy
from typing import Any

from common.files import json_digest

DEFAULTS: dict[str, Any] = {
    "image": {
        # Longer side in pixels; larger uploads are shrunk to the scale of the map images.
        "max_side": 341,
    },
    "features": {
        "name": "orb",
        "nfeatures": 500,
        "scale_factor": 1.2,
        "nlevels": 8,
        "edge_threshold": 31,
        "patch_size": 31,
        "fast_threshold": 20,
        "upsample": 1.0,
        # "fast": detected keypoints; "dense": a grid every dense_step pixels at the dense_octaves scales
        "detector": "fast",
        "dense_step": 10,
        "dense_octaves": [0, 3],
        # "descriptor" (absent: "orb"): the 256-bit descriptor computed on the keypoints, "orb" or
        # "teblid". Absent rather than defaulted here so older presets keep their artifact names.
    },
    "vector": {"name": "concat", "n_descriptors": 10},
    "model": {
        "name": "siamese-mlp",
        "hidden": [100, 50],
        "embed_dim": 10,
        "activation": "sigmoid",
        "l2": 1e-3,
        "dropout": 0.2,
        "loss": "mse",
        "target": "fov",
        "lr": 1e-3,
        "batch_size": 32,
        "epochs": 30,
        "patience": 5,
        "negatives_per_positive": 1,
        "seed": 0,
    },
    # Held-out areas: queries grouped into 250 m cells, whole cells per split.
    "split": {"train": 0.8, "val": 0.1, "test": 0.1, "cell_m": 250.0, "seed": 0},
    # The served vector index by collection size (indexer/kinds.py): exact below `exact_below`
    # vectors; above, fast-scan PQ codes of m x 4 bits (trained on up to train_size of the vectors)
    # whose nearest `rerank` (at least k) are re-ranked exactly. 100 at m 64: recall@10 0.96-0.999 at
    # 1M (bench/ann.py, bench/million.py); exact search of 200k 1,024-d vectors takes ~100 ms a query.
    # With nlist > 0 the codes sit in nlist cells, of which a query scans the nprobe nearest; 0 scans
    # every code. At 1M generated vectors (bench/cells.py), 1,024 cells needed 512 probes for recall@10
    # 0.98 (3.2 ms a query, k 200) where every code gave 0.999 in 2.8 ms: the embeddings fill their
    # 1,024 dimensions too evenly for cells to pay (32 probes: 0.55 in 0.9 ms), so every code is scanned.
    # With coarse_m > 0 that scan has two stages: the fast-scan codes have coarse_m sub-quantizers and
    # find the nearest `shortlist`, which the m x 4-bit codes (plain layout) order; their nearest
    # `rerank` are re-ranked exactly (past them, in the verified 50 and the expansion pool, the fine
    # codes' order and distances stand). 0: one stage of m. At 1M (one Intel host, generated
    # queries): PQ 32 x 4's nearest 800 held 0.963 of the true top 10 (1,000: 0.970, 500: 0.950),
    # and the scan of every code costs ~2.9 ms against 5.2 ms for PQ 64 x 4 (README, issue 14's
    # ninth step). 30 exact rather than 50: recall@10 0.9597 against 0.9600, the London queries'
    # R@10 through the ranking the same, 0.5 ms less a query (issue 14's tenth step).
    "index": {
        "type": "auto",
        "exact_below": 200_000,
        "m": 64,
        "coarse_m": 32,
        "shortlist": 800,
        "rerank": 30,
        "train_size": 65_536,
        "nlist": 0,
        "nprobe": 32,
    },
    # Geometric verification of the shortlist (None: off). Its "features" override the ORB settings.
    "verify": None,
}

VERIFY_DEFAULTS: dict[str, Any] = {
    "n": 50,  # shortlist length that is verified
    "features": {"nfeatures": 1000, "upsample": 1.0, "detector": "fast"},
    "max_hamming": 64,
    "ratio": 0.9,
    "ransac_px": 8.0,
    "ransac_iters": 200,
    # "max_angle_deg" (absent: off): tentative matches whose keypoint orientations differ by more are
    # dropped before RANSAC. Absent rather than defaulted so older presets keep their artifact names.
    # Verified spatial expansion (None: off): when the best verified hit has at least min_inliers,
    # the place is found, and the map images of the first-stage top `pool` standing within radius_m
    # of it and looking within heading_deg of its heading are likely views of that place too. They
    # score prior x the top hit's score (prior fitted on validation queries) and are ranked by it.
    "expand": None,
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


confs: dict[str, dict[str, Any]] = {
    # The published design: the first 10 ORB descriptors in detection order, concatenated as 0/1 bits,
    # into a sigmoid MLP Siamese trained with MSE on the graded fov target.
    "paper": {},
    # The same with the binary sim target.
    "paper-sim": {"model": {"target": "sim"}},
    # The published comparison baseline: ORB bag of visual words, sqrt-tf x idf, cosine ranking.
    "orb-bow": {
        "features": {"nfeatures": 1000},
        "vector": {"name": "bow", "words": 4096},
        "model": {"name": "identity"},
    },
    # VLAD of many ORB descriptors from the image up-sampled x2, 128 words.
    "orb-vlad": {
        "features": {"nfeatures": 3000, "upsample": 2.0, "fast_threshold": 10},
        "vector": {"name": "vlad", "words": 128, "power": 0.5},
        "model": {"name": "identity"},
    },
    # VLAD of dense ORB: upright descriptors every 10 px of the x2 image, at 2 scales (~4,400 per image).
    "orb-dense-vlad": {
        "features": {"detector": "dense", "upsample": 2.0, "edge_threshold": 16, "nlevels": 4, "nfeatures": 100000},
        "vector": {"name": "vlad", "words": 128, "power": 0.5},
        "model": {"name": "identity"},
    },
}
# The dense VLAD through a Siamese encoder trained with the Generalized Contrastive Loss on fov.
confs["orb-dense-vlad-gcl"] = _merge(
    confs["orb-dense-vlad"],
    {
        "model": {
            "name": "gcl-linear",
            "embed_dim": 512,
            "tau": 0.8,
            "lr": 3e-5,
            "epochs": 4,
            "positives": 4,
            "negatives": 8,
            "map_pairs": False,
        }
    },
)
# Dense VLAD of the whole image and of its top and bottom halves, PCA-whitened to 1,024 values.
confs["orb-dense-rvlad"] = _merge(
    confs["orb-dense-vlad"],
    {
        "vector": {"regions": [[0.0, 0.5], [0.5, 1.0]]},
        "model": {"name": "pca-whiten", "embed_dim": 1024, "whiten_power": 0.2},
    },
)
# The same first stages with geometric verification of the top 50.
confs["orb-vlad-verify"] = _merge(confs["orb-vlad"], {"verify": {"n": 50}})
confs["orb-dense-vlad-verify"] = _merge(confs["orb-dense-vlad"], {"verify": {"n": 50}})
confs["orb-dense-rvlad-verify"] = _merge(confs["orb-dense-rvlad"], {"verify": {"n": 50}})

# The same dense grid of ORB keypoints described by TEBLID (learned binary descriptors) instead of
# ORB's own, whitened a little more (power 0.3, chosen on the validation areas); the verification
# keypoints (ORB's FAST corners) get TEBLID descriptors too.
confs["orb-dense-teblid-rvlad"] = _merge(
    confs["orb-dense-rvlad"], {"features": {"descriptor": "teblid"}, "model": {"whiten_power": 0.3}}
)
confs["orb-dense-teblid-rvlad-verify"] = _merge(confs["orb-dense-teblid-rvlad"], {"verify": {"n": 50}})
EXPAND = {"min_inliers": 16, "radius_m": 25.0, "heading_deg": 40.0, "pool": 200}
confs["orb-dense-teblid-rvlad-verify-expand"] = _merge(
    confs["orb-dense-teblid-rvlad-verify"], {"verify": {"expand": EXPAND}}
)
# The trained Siamese model: a diagonal metric after the whitening, trained on graded fov relevance
# of train queries and map-map pairs (model/siamese_diag.py); alone, then in the default.
SIAMESE_DIAG = {
    "name": "siamese-diag",
    "embed_dim": 1024,
    "whiten_power": 0.3,
    "tau": 0.05,
    "lr": 0.003,
    "epochs": 12,
    "batch_size": 64,
    "positives": 4,
    "negatives": 28,
    "hard_pool": 60,
    "map_pairs": True,
    "holdout_m": 50.0,
    "min_pair_m": 3.0,
}
confs["orb-dense-teblid-rvlad-siamese"] = _merge(confs["orb-dense-teblid-rvlad"], {"model": SIAMESE_DIAG})
confs["orb-dense-teblid-rvlad-siamese-verify-expand"] = _merge(
    confs["orb-dense-teblid-rvlad-verify-expand"], {"model": SIAMESE_DIAG}
)

# Learned whitening: PCA of the map vectors to 1,024, then whitened by the covariance of the
# differences of matching pairs (train queries and map-map pairs from locations, fov-weighted;
# model/linear.py), which shrinks what changes between two views of one place.
PAIR_WHITEN = {
    "whiten": "pairs",
    "embed_dim": 1024,
    "whiten_power": 0.0,
    "whiten_shrink": 0.2,
    "map_pairs": True,
    "holdout_m": 50.0,
    "min_pair_m": 3.0,
}
confs["orb-dense-teblid-rvlad-lw"] = _merge(
    confs["orb-dense-teblid-rvlad"], {"model": {"name": "pair-whiten", **PAIR_WHITEN}}
)
confs["orb-dense-teblid-rvlad-lw-verify-expand"] = _merge(
    confs["orb-dense-teblid-rvlad-verify-expand"], {"model": {"name": "pair-whiten", **PAIR_WHITEN}}
)
# Verification that keeps only tentative matches whose keypoints turn alike (within 30 degrees):
# street photos are upright, so a true match's two ORB orientations agree, a chance match's do not.
confs["orb-dense-teblid-rvlad-lw-verify-angle-expand"] = _merge(
    confs["orb-dense-teblid-rvlad-lw-verify-expand"], {"verify": {"max_angle_deg": 30.0}}
)
# Dense VLAD of five regions: the whole image, its top and bottom halves, and its left and right
# halves. Each region's block (32,768 values) is first projected on its own top 256 principal
# directions, so the encoder is 5 x 32,768 x 256 values (168 MB), not 163,840 x 1,024 (671 MB).
R5VLAD = {"regions": [[0.0, 0.5], [0.5, 1.0]], "columns": [[0.0, 0.5], [0.5, 1.0]]}
confs["orb-dense-teblid-r5vlad"] = _merge(
    confs["orb-dense-teblid-rvlad"], {"vector": R5VLAD, "model": {"block_dim": 256}}
)
confs["orb-dense-teblid-r5vlad-lw"] = _merge(
    confs["orb-dense-teblid-r5vlad"], {"model": {"name": "pair-whiten", **PAIR_WHITEN}}
)
confs["orb-dense-teblid-r5vlad-verify-angle-expand"] = _merge(
    confs["orb-dense-teblid-r5vlad"],
    {"verify": confs["orb-dense-teblid-rvlad-lw-verify-angle-expand"]["verify"]},
)
confs["orb-dense-teblid-r5vlad-lw-verify-expand"] = _merge(
    confs["orb-dense-teblid-r5vlad-lw"], {"verify": confs["orb-dense-teblid-rvlad-lw-verify-expand"]["verify"]}
)
confs["orb-dense-teblid-r5vlad-lw-verify-angle-expand"] = _merge(
    confs["orb-dense-teblid-r5vlad-lw"], {"verify": confs["orb-dense-teblid-rvlad-lw-verify-angle-expand"]["verify"]}
)

# The same with each region's projection factored through an r-dimensional descriptor basis shared
# by its words (model/linear.py: word_basis): a query streams 5 x (256 r + 128 r x 256) weights
# instead of 5 x 32,768 x 256. At r 96: 65 MB instead of 165 MB, and validation R@1 53.0 / R@10
# 77.8 against 53.0 / 78.3 (r 64: 52.0 / 77.3; r 128: 53.0 / 77.8; README, issue 14).
for _rank in (64, 96, 128):
    confs[f"orb-dense-teblid-r5vlad-wb{_rank}-lw-verify-angle-expand"] = _merge(
        confs["orb-dense-teblid-r5vlad-lw-verify-angle-expand"], {"model": {"word_basis": _rank}}
    )

# The same with its output in the map embeddings' principal axes dealt into 64 groups of balanced
# variance (model/projection.py: balanced_axes; 64 = the index's m, and the coarse 32 take pairs of
# groups). A rotation: the same distances, so the same ranking from an exact index. From a million
# entries' fast-scan codes, twice the London validation queries keep a relevant map image in the
# first 10 (0.25 -> 0.49 of 199; exact search 0.58), and generated queries' recall@10 against exact
# search stays above 0.95 (0.9647 -> 0.958; README, issue 14's eleventh step).
confs["orb-dense-teblid-r5vlad-wb96-lw-axes64-verify-angle-expand"] = _merge(
    confs["orb-dense-teblid-r5vlad-wb96-lw-verify-angle-expand"], {"model": {"code_bins": 64}}
)

DEFAULT_PRESET = "orb-dense-teblid-r5vlad-wb96-lw-axes64-verify-angle-expand"


class UnknownPresetError(ValueError):
    pass


def get_conf(preset: str) -> dict[str, Any]:
    """The full configuration of a named preset (a fresh copy)."""
    if preset not in confs:
        raise UnknownPresetError(f"unknown preset {preset!r}; choose one of: {', '.join(sorted(confs))}")
    conf = _merge(DEFAULTS, confs[preset])
    if conf["verify"] is not None:
        conf["verify"] = _merge(VERIFY_DEFAULTS, conf["verify"])
    conf["preset"] = preset
    return conf


def verify_features_conf(conf: dict[str, Any]) -> dict[str, Any]:
    """The conf that extracts verification keypoints: the preset's image and ORB settings with the
    verification overrides."""
    return {**conf, "features": _merge(conf["features"], conf["verify"]["features"])}


def conf_hash(conf: dict[str, Any], *sections: str) -> str:
    """Short stable hash of some sections of a conf, for artifact names that encode the settings."""
    part = {s: conf[s] for s in sections} if sections else conf
    return json_digest(part, 8)
