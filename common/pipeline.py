"""Typed stage confs and the pipelines (presets) built from them, in the style of hloc's `confs`.

A pipeline picks one named choice per stage: features (decode + ORB keypoints and descriptors),
vector (a fixed-length aggregate), encoder (the learned embedding), index (FAISS), verify (geometric
verification of the shortlist) and expand (verified spatial expansion). It fixes everything that must
agree between the map images in the index and a query. Artifacts are named by a digest of the typed
confs of the stages that made them and of SCHEMA, so a conf that changes meaning gets new names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.files import json_digest

# Bumped whenever a conf field changes what it produces: every artifact name changes with it.
SCHEMA = 2


class StageConf(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FeaturesConf(StageConf):
    """Decoding and ORB keypoints with their 256-bit descriptors (features/orb.py)."""

    max_side: int = Field(341, gt=0, description="longer side in pixels; larger images are shrunk to the map's scale")
    nfeatures: int = 500
    scale_factor: float = 1.2
    nlevels: int = 8
    edge_threshold: int = 31
    patch_size: int = 31
    fast_threshold: int = 20
    upsample: float = 1.0
    # "fast": ORB's detected corners; "dense": a grid every dense_step pixels at the dense_octaves scales.
    detector: Literal["fast", "dense"] = "fast"
    dense_step: int = 10
    dense_octaves: tuple[int, ...] = (0, 3)
    descriptor: Literal["orb", "teblid"] = "orb"


class VectorConf(StageConf):
    """The fixed-length aggregate of one image's descriptors (model/vectorize.py)."""

    name: Literal["concat", "bow", "vlad"]
    n_descriptors: int = 10  # concat: descriptors in detection order
    words: int = 128  # bow, vlad: vocabulary size
    power: float = 0.5  # vlad: power normalisation
    # vlad: besides the whole image, one block per band of rows and per band of columns (fractions).
    regions: tuple[tuple[float, float], ...] = ()
    columns: tuple[tuple[float, float], ...] = ()
    seed: int = 0  # vocabulary k-means

    @property
    def n_blocks(self) -> int:
        return 1 + len(self.regions) + len(self.columns)


class SiameseMlpConf(StageConf):
    """The published Siamese network (Keras): an MLP trained with MSE on graded relevance."""

    kind: Literal["siamese-mlp"] = "siamese-mlp"
    hidden: tuple[int, ...] = (100, 50)
    embed_dim: int = 10
    activation: str = "sigmoid"
    l2: float = 1e-3
    dropout: float = 0.2
    loss: str = "mse"
    target: Literal["fov", "sim"] = "fov"
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 30
    patience: int = 5
    negatives_per_positive: int = 1
    seed: int = 0


class IdentityConf(StageConf):
    """No learned layers: the aggregate itself is the embedding (with a fitted score head)."""

    kind: Literal["identity"] = "identity"
    seed: int = 0


class LinearConf(StageConf):
    """A linear encoder (model/linear.py): PCA [of each VLAD block first], whitened partially
    (`pca-whiten`) or by the covariance of matching pairs' differences (`pair-whiten`), optionally
    rotated onto balanced principal axes for product-quantisation codes, L2."""

    kind: Literal["pca-whiten", "pair-whiten"]
    embed_dim: int = 1024
    whiten_power: float = 0.0
    whiten_shrink: float = 0.2  # pair-whiten: shrinkage of the pairs' covariance
    block_dim: int = 0  # > 0: each VLAD block is first projected on its own top block_dim directions
    word_basis: int = 0  # > 0: that projection factored through a descriptor basis of this rank
    code_bins: int = 0  # > 0: output rotated onto principal axes dealt into this many balanced groups
    # pair-whiten's anchors: map-map pairs too, at least holdout_m from every held-out query.
    map_pairs: bool = True
    holdout_m: float = 50.0
    min_pair_m: float = 3.0
    seed: int = 0

    @property
    def whiten(self) -> Literal["pca", "pairs"]:
        return "pairs" if self.kind == "pair-whiten" else "pca"


EncoderConf = Annotated[SiameseMlpConf | IdentityConf | LinearConf, Field(discriminator="kind")]


class IndexConf(StageConf):
    """The served vector index by collection size (indexer/kinds.py): exact below `exact_below`
    vectors; above, fast-scan PQ: coarse codes of coarse_m x 4 bits find the nearest `shortlist`,
    codes of m x 4 bits order them, and the nearest `rerank` are re-ranked exactly."""

    kind: Literal["auto", "exact", "pq"] = "auto"
    exact_below: int = 200_000
    m: int = 64
    coarse_m: int = 32
    shortlist: int = 800
    rerank: int = 30
    train_size: int = 65_536


class VerifyConf(StageConf):
    """Geometric verification of the first-stage shortlist (model/verify.py)."""

    n: int = 50  # shortlist length that is verified
    # The verification keypoints: the pipeline's features with these three changed.
    nfeatures: int = 1000
    upsample: float = 1.0
    detector: Literal["fast", "dense"] = "fast"
    max_hamming: int = 64
    ratio: float = 0.9
    ransac_px: float = 8.0
    ransac_iters: int = 200
    # Tentative matches whose keypoint orientations differ by more are dropped before RANSAC (None: off).
    max_angle_deg: float | None = None
    # Each query keypoint is compared within this many of its nearest visual words (a map keypoint keeps
    # one): a true match whose two descriptors fall on either side of a word boundary is still found.
    query_words: int = Field(default=1, ge=1, le=4)
    # How the head over (distance, inliers) is fitted (retrieval/heads.py): `logistic` regression of
    # each candidate's relevance, or `listwise`: the trade-off that ranks a relevant candidate first in
    # each query's shortlist, then calibrated by logistic regression.
    head: Literal["logistic", "listwise"] = "logistic"
    # Inliers weighed by how distinctive their query keypoint is (model/verify.py: distinct_inliers):
    # one the shortlisted map images standing more than this many metres away also hold as an inlier
    # counts less in the score (None: every inlier counts 1).
    distinct_m: float | None = Field(default=None, gt=0)


class ExpandConf(StageConf):
    """Verified spatial expansion: when the best verified hit has at least min_inliers, the map images
    of the first-stage top `pool` within radius_m of it and looking within heading_deg of its heading
    are likely views of that place too; they score a prior (fitted) x the top hit's score."""

    min_inliers: int = 16
    radius_m: float = 25.0
    heading_deg: float = 40.0
    pool: int = 200


class SplitConf(StageConf):
    """Which labelled queries fit what (dataset/split.py), by areas: queries grouped into cell_m
    cells, whole cells per part. `test` is held out from everything for one final look; the rest is
    dealt into `folds` for cross-validation. A model learns from every query it may (the served one:
    all); of those, `val` (as a share of all) fit the heads and not the encoder, or with val 0 the
    encoder learns from all of them and the heads are fitted on a sample of `head_queries`."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    cell_m: float = 250.0
    seed: int = 0
    folds: int = Field(default=5, ge=2)
    head_queries: int = Field(default=400, ge=1)


class Pipeline(StageConf):
    name: str
    features: FeaturesConf
    vector: VectorConf
    encoder: EncoderConf
    index: IndexConf = IndexConf()
    verify: VerifyConf | None = None
    expand: ExpandConf | None = None
    split: SplitConf = SplitConf()

    @model_validator(mode="after")
    def _expand_needs_verify(self) -> Pipeline:
        if self.expand is not None and self.verify is None:
            raise ValueError("expand needs verify: it starts from a verified hit")
        return self

    @property
    def verify_features(self) -> FeaturesConf:
        """The conf that extracts verification keypoints: the pipeline's with the verifier's changes."""
        if self.verify is None:
            raise ValueError(f"pipeline {self.name!r} does not verify")
        v = self.verify
        return self.features.model_copy(
            update={"nfeatures": v.nfeatures, "upsample": v.upsample, "detector": v.detector}
        )

    def digest(self, *stages: str) -> str:
        """Short stable hash of some stages' confs and SCHEMA, for artifact names."""
        part = {s: _dump(getattr(self, s)) for s in stages}
        return json_digest({"schema": SCHEMA, **part}, 8)

    def to_json(self) -> dict[str, object]:
        """The conf as written to manifests (read back by `from_json`)."""
        return {"schema": SCHEMA, **self.model_dump(mode="json")}

    @classmethod
    def from_json(cls, data: object) -> Pipeline:
        """A pipeline read from a manifest; raises ValueError for another schema or a bad conf."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else None
            raise ValueError(f"pipeline conf of schema {found!r}, this version reads {SCHEMA}")
        try:
            return cls.model_validate({k: v for k, v in data.items() if k != "schema"})
        except ValidationError as e:
            raise ValueError(f"invalid pipeline conf: {e.errors()[0]['msg']}") from e


# Fields added to a stage after artifacts were first named by its digest, with the default that
# behaves as before: left out of the digest at that default, so an unchanged conf keeps its name
# (and its cached features, models and cross-validation).
_LATE_FIELDS: dict[str, object] = {"query_words": 1, "distinct_m": None}


def _dump(conf: StageConf | None) -> object:
    if conf is None:
        return None
    out = conf.model_dump(mode="json")
    return {k: v for k, v in out.items() if not (k in _LATE_FIELDS and v == _LATE_FIELDS[k])}


def features_digest(features: FeaturesConf) -> str:
    """Short stable hash of a features conf alone (the local features cache of any pipeline)."""
    return json_digest({"schema": SCHEMA, "features": features.model_dump(mode="json")}, 8)


# --- The named choices of each stage ------------------------------------------------------------

_DENSE = {"detector": "dense", "upsample": 2.0, "edge_threshold": 16, "nlevels": 4, "nfeatures": 100_000}
FEATURES: dict[str, FeaturesConf] = {
    "orb": FeaturesConf(),  # the published design: 500 FAST corners
    "orb-1k": FeaturesConf(nfeatures=1000),
    "orb-x2": FeaturesConf(nfeatures=3000, upsample=2.0, fast_threshold=10),  # the image up-sampled x2
    # Upright ORB descriptors every 10 px of the x2 image at 2 scales (~4,400 per image).
    "dense": FeaturesConf.model_validate(_DENSE),
    # The same grid described by TEBLID (learned binary descriptors) instead of ORB's own.
    "dense-teblid": FeaturesConf.model_validate(_DENSE | {"descriptor": "teblid"}),
}

_HALVES = ((0.0, 0.5), (0.5, 1.0))
VECTORS: dict[str, VectorConf] = {
    "concat10": VectorConf(name="concat"),  # the published design: the first 10 descriptors as bits
    "bow4k": VectorConf(name="bow", words=4096),  # sqrt-tf x idf bag of words, cosine ranking
    "vlad": VectorConf(name="vlad"),
    "vlad-r3": VectorConf(name="vlad", regions=_HALVES),  # whole image, top and bottom halves
    "vlad-r5": VectorConf(name="vlad", regions=_HALVES, columns=_HALVES),  # and left and right halves
}

_PAIRS = {"kind": "pair-whiten", "whiten_power": 0.0, "whiten_shrink": 0.2}
ENCODERS: dict[str, SiameseMlpConf | IdentityConf | LinearConf] = {
    "siamese-mlp": SiameseMlpConf(),  # the published design, on the graded fov target
    "siamese-mlp-sim": SiameseMlpConf(target="sim"),  # the same on the binary sim target
    "none": IdentityConf(),
    "pca": LinearConf(kind="pca-whiten", whiten_power=0.2),
    # Each region's VLAD block first projected on its own top 256 directions: 5 x 32,768 x 256 weights,
    # not 163,840 x 1,024.
    "pca-blocks": LinearConf(kind="pca-whiten", whiten_power=0.3, block_dim=256),
    # Learned whitening from matching pairs (train queries and map-map pairs), which shrinks what
    # changes between two views of one place.
    "lw": LinearConf.model_validate(_PAIRS),
    # Each block projected on its top 256 directions, factored through a shared descriptor basis of rank
    # 96 (less to stream a query), the output rotated onto balanced principal axes (64 = the index's m):
    # the same distances, better codes.
    "lw-wb96-axes64": LinearConf.model_validate(_PAIRS | {"block_dim": 256, "word_basis": 96, "code_bins": 64}),
}

INDEXES: dict[str, IndexConf] = {"auto": IndexConf(), "exact": IndexConf(kind="exact"), "pq": IndexConf(kind="pq")}

VERIFIERS: dict[str, VerifyConf] = {
    "ransac": VerifyConf(),
    # Street photos are upright: a true match's two ORB orientations agree, a chance match's do not.
    "angle": VerifyConf(max_angle_deg=30.0),
    # The same, its head fitted to rank: which of a shortlist comes first is what a user sees.
    "angle-rank": VerifyConf(max_angle_deg=30.0, head="listwise"),
    # More keypoints (1,500 on the image enlarged 1.5 times, where small corners of distant facades are
    # found), each query keypoint compared within its 2 nearest words: more true matches across
    # viewpoint change.
    "angle-ma2": VerifyConf(max_angle_deg=30.0, nfeatures=1500, upsample=1.5, query_words=2),
    # The same, each inlier weighed by how few shortlisted map images of other places hold its query
    # keypoint too: a corner that matches everywhere (a window grid, a shop sign) does not tell places apart.
    "angle-ma2-distinct": VerifyConf(max_angle_deg=30.0, nfeatures=1500, upsample=1.5, query_words=2, distinct_m=50.0),
    # The same with 2,000 keypoints on the image enlarged twice: no more accurate, slower.
    "angle-2k-ma2": VerifyConf(max_angle_deg=30.0, nfeatures=2000, upsample=2.0, query_words=2),
}

EXPANSIONS: dict[str, ExpandConf] = {"place": ExpandConf()}

STAGES: dict[str, Mapping[str, StageConf]] = {
    "features": FEATURES,
    "vector": VECTORS,
    "encoder": ENCODERS,
    "index": INDEXES,
    "verify": VERIFIERS,
    "expand": EXPANSIONS,
}


class UnknownPresetError(ValueError):
    pass


def _pick(
    features: str, vector: str, encoder: str, verify: str | None = None, expand: str | None = None
) -> dict[str, str | None]:
    return {"features": features, "vector": vector, "encoder": encoder, "verify": verify, "expand": expand}


# --- Pipelines: stage -> choice ------------------------------------------------------------------

# What a user sees.
PRESETS: dict[str, dict[str, str | None]] = {
    "default": _pick("dense-teblid", "vlad-r5", "lw-wb96-axes64", "angle-ma2-distinct", "place"),
    "fast": _pick("dense-teblid", "vlad-r5", "lw-wb96-axes64"),  # the default without verification
    "paper": _pick("orb", "concat10", "siamese-mlp"),  # the published design
    "paper-sim": _pick("orb", "concat10", "siamese-mlp-sim"),
}

# The ablations behind the results table (`imgsearch presets --all`): each is cross-validated there,
# a step at a time from the published-era aggregates to the default.
ABLATIONS: dict[str, dict[str, str | None]] = {
    "bow": _pick("orb-1k", "bow4k", "none"),
    "vlad": _pick("orb-x2", "vlad", "none"),
    "vlad-verify": _pick("orb-x2", "vlad", "none", "ransac"),
    "dense-rvlad-verify": _pick("dense", "vlad-r3", "pca", "ransac"),
    "teblid-rvlad-lw": _pick("dense-teblid", "vlad-r3", "lw"),
    "r5vlad": _pick("dense-teblid", "vlad-r5", "pca-blocks"),
    # `default-1k` without the model learned from labels: what the learned whitening adds.
    "r5vlad-verify-angle-expand": _pick("dense-teblid", "vlad-r5", "pca-blocks", "angle", "place"),
    # `default-1k` with its verification head fitted to rank.
    "default-rank": _pick("dense-teblid", "vlad-r5", "lw-wb96-axes64", "angle-rank", "place"),
    # `default-counted` verifying with 1,000 keypoints at the map's size, one word per query keypoint:
    # what the denser verification adds.
    "default-1k": _pick("dense-teblid", "vlad-r5", "lw-wb96-axes64", "angle", "place"),
    # The default with every inlier counting 1: what weighing them by how distinctive their query
    # keypoint is in the shortlist adds.
    "default-counted": _pick("dense-teblid", "vlad-r5", "lw-wb96-axes64", "angle-ma2", "place"),
    # `default-counted` verifying on 2,000 keypoints of the image enlarged twice.
    "default-2k": _pick("dense-teblid", "vlad-r5", "lw-wb96-axes64", "angle-2k-ma2", "place"),
}

DEFAULT_PRESET = "default"
ALL_PRESETS = PRESETS | ABLATIONS


def get_pipeline(name: str) -> Pipeline:
    """The typed pipeline of a named preset or ablation."""
    picks = ALL_PRESETS.get(name)
    if picks is None:
        raise UnknownPresetError(
            f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)} (all: imgsearch presets --all)"
        )
    stages = {stage: None if choice is None else STAGES[stage][choice] for stage, choice in picks.items()}
    return Pipeline(name=name, **stages)
