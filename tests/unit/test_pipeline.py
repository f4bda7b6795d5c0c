"""Typed pipeline confs (common/pipeline.py): every preset builds and survives its manifest, confs that
are not this version's are refused, digests follow the stages that made an artifact, and the default
is the settings it had as a dict preset."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

import common.pipeline
from common.files import json_digest
from common.pipeline import (
    ABLATIONS,
    ALL_PRESETS,
    DEFAULT_PRESET,
    PRESETS,
    SCHEMA,
    ExpandConf,
    FeaturesConf,
    IndexConf,
    LinearConf,
    Pipeline,
    SplitConf,
    UnknownPresetError,
    VectorConf,
    VerifyConf,
    get_pipeline,
)

MODEL_STAGES = ("features", "vector", "encoder", "split")  # what a trained model is named by


@pytest.mark.parametrize("name", list(ALL_PRESETS))
def test_every_preset_builds_and_its_manifest_conf_reads_back(name: str) -> None:
    p = get_pipeline(name)
    assert p.name == name
    stored = json.loads(json.dumps(p.to_json()))  # as written to and read from manifest.json
    assert stored["schema"] == SCHEMA
    back = Pipeline.from_json(stored)
    assert back == p and back.to_json() == p.to_json()
    assert back.digest(*MODEL_STAGES) == p.digest(*MODEL_STAGES)
    if p.verify is not None:
        assert back.verify_features == p.verify_features


def test_presets_and_ablations() -> None:
    assert list(PRESETS) == ["default", "fast", "paper", "paper-sim"] and DEFAULT_PRESET == "default"
    assert not set(PRESETS) & set(ABLATIONS) and ALL_PRESETS == PRESETS | ABLATIONS
    # The old names lost their `orb-` and `orb-dense-teblid-` prefixes.
    assert {"bow", "vlad-verify", "dense-rvlad-verify", "teblid-rvlad-lw", "r5vlad"} <= set(ABLATIONS)
    assert not [n for n in ALL_PRESETS if n.startswith("orb-")]
    with pytest.raises(UnknownPresetError, match=r"unknown preset 'nope'; choose one of: default, fast, paper"):
        get_pipeline("nope")
    assert issubclass(UnknownPresetError, ValueError)


def test_a_conf_of_another_schema_or_with_unknown_fields_is_refused() -> None:
    good = get_pipeline(DEFAULT_PRESET).to_json()
    for other in (
        {**good, "schema": SCHEMA - 1},
        {**good, "schema": SCHEMA + 1},
        {k: v for k, v in good.items() if k != "schema"},
    ):
        with pytest.raises(ValueError, match="schema"):
            Pipeline.from_json(other)
    with pytest.raises(ValueError, match="schema"):
        Pipeline.from_json([good])
    features = dict(good["features"])  # type: ignore[arg-type]
    for bad in (
        {**good, "colour": "blue"},  # a field this version does not know
        {**good, "features": {**features, "sift_sigma": 1.6}},  # the same inside a stage
        {**good, "features": {**features, "descriptor": "sift"}},  # a value it does not know
        {**good, "encoder": {"kind": "siamese-diag", "embed_dim": 1024}},  # a deleted encoder
        {**good, "vector": None},  # a stage every pipeline has
    ):
        with pytest.raises(ValueError, match="invalid pipeline conf"):
            Pipeline.from_json(bad)
    # Constructed directly, likewise.
    with pytest.raises(ValidationError, match="extra"):
        FeaturesConf(sift_sigma=1.6)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        IndexConf(kind="hnsw")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        LinearConf(kind="zca")  # type: ignore[arg-type]


def test_confs_are_frozen() -> None:
    p = get_pipeline(DEFAULT_PRESET)
    with pytest.raises(ValidationError, match="frozen"):
        p.features.nfeatures = 10  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        p.verify = None  # type: ignore[misc]
    assert hash(p) == hash(get_pipeline(DEFAULT_PRESET))


def test_expand_without_verify_is_refused() -> None:
    fast = get_pipeline("fast")
    with pytest.raises(ValidationError, match="expand needs verify"):
        Pipeline(name="x", features=fast.features, vector=fast.vector, encoder=fast.encoder, expand=ExpandConf())
    with pytest.raises(ValueError, match="expand needs verify"):
        Pipeline.from_json(get_pipeline(DEFAULT_PRESET).to_json() | {"verify": None})
    with pytest.raises(ValueError, match="does not verify"):
        fast.verify_features  # noqa: B018


def _with(p: Pipeline, stage: str, **change: object) -> Pipeline:
    conf = getattr(p, stage)
    return p.model_copy(update={stage: conf.model_copy(update=change)})


def test_a_digest_changes_with_its_stages_and_no_others() -> None:
    p = get_pipeline(DEFAULT_PRESET)
    assert p.digest("features") == get_pipeline(DEFAULT_PRESET).digest("features")  # stable
    assert len(p.digest(*MODEL_STAGES)) == 8
    stages = ("features", "vector", "encoder", "index", "verify", "expand", "split")
    changes = {
        "features": {"nfeatures": 5000},
        "vector": {"words": 64},
        "encoder": {"embed_dim": 512},
        "index": {"rerank": 50},
        "verify": {"n": 20},
        "expand": {"radius_m": 30.0},
        "split": {"seed": 1},
    }
    for stage, change in changes.items():
        q = _with(p, stage, **change)
        assert q.digest(stage) != p.digest(stage), stage
        others = [s for s in stages if s != stage]
        assert q.digest(*others) == p.digest(*others), stage
        assert (q.digest(*MODEL_STAGES) != p.digest(*MODEL_STAGES)) == (stage in MODEL_STAGES), stage
    # A field added to a stage later keeps the name of a conf at its default (the same behaviour) and
    # changes it otherwise.
    one_k = get_pipeline("default-1k")
    assert _with(one_k, "verify", query_words=1).digest("verify") == one_k.digest("verify")
    assert _with(one_k, "verify", query_words=2).digest("verify") != one_k.digest("verify")
    assert _with(one_k, "verify", distinct_m=50.0).digest("verify") != one_k.digest("verify")
    dumped = json.loads(json.dumps({"schema": SCHEMA, "verify": one_k.verify.model_dump(mode="json")}))
    del dumped["verify"]["query_words"], dumped["verify"]["distinct_m"]  # as named before the fields existed
    assert one_k.digest("verify") == json_digest(dumped, 8)
    # The name of the pipeline is no stage: renaming a preset keeps its artifacts.
    assert p.model_copy(update={"name": "renamed"}).digest(*stages) == p.digest(*stages)
    # Verification's keypoints are the pipeline's features with its changes: a features change reaches them.
    assert _with(p, "features", edge_threshold=20).verify_features.edge_threshold == 20


def test_a_new_schema_renames_every_artifact(monkeypatch: pytest.MonkeyPatch) -> None:
    p = get_pipeline(DEFAULT_PRESET)
    before = p.digest(*MODEL_STAGES)
    monkeypatch.setattr(common.pipeline, "SCHEMA", SCHEMA + 1)
    assert p.digest(*MODEL_STAGES) != before


def test_default_and_fast_share_their_model() -> None:
    from model.train import model_name
    from model.vectors import features_tag

    default, fast = get_pipeline("default"), get_pipeline("fast")
    for stage in MODEL_STAGES:
        assert default.digest(stage) == fast.digest(stage), stage
    assert model_name(default) == model_name(fast) and features_tag(default) == features_tag(fast)
    assert model_name(default).startswith("model-pair-whiten-")
    # Another encoder on the same vectors is another model, on the same vectors.
    enc = default.encoder.model_copy(update={"code_bins": 0})
    other = default.model_copy(update={"name": "no-axes", "encoder": enc})  # the default without code_bins
    assert model_name(other) != model_name(default) and features_tag(other) == features_tag(default)
    assert model_name(get_pipeline("paper")) != model_name(get_pipeline("paper-sim"))


def test_the_default_written_out() -> None:
    """Every field of the default's stage confs: a change of the default is a change of this test."""
    p = get_pipeline(DEFAULT_PRESET)
    halves = ((0.0, 0.5), (0.5, 1.0))
    assert p.features == FeaturesConf(
        max_side=341,
        nfeatures=100_000,
        scale_factor=1.2,
        nlevels=4,
        edge_threshold=16,
        patch_size=31,
        fast_threshold=20,
        upsample=2.0,
        detector="dense",
        dense_step=10,
        dense_octaves=(0, 3),
        descriptor="teblid",
    )
    assert p.vector == VectorConf(name="vlad", words=128, power=0.5, regions=halves, columns=halves, seed=0)
    assert p.vector.n_blocks == 5
    assert p.encoder == LinearConf(
        kind="pair-whiten",
        embed_dim=1024,
        whiten_power=0.0,
        whiten_shrink=0.2,
        block_dim=256,
        word_basis=96,
        code_bins=64,
        map_pairs=True,
        holdout_m=50.0,
        min_pair_m=3.0,
        seed=0,
    )
    assert p.encoder.whiten == "pairs"
    assert p.index == IndexConf(
        kind="auto", exact_below=200_000, m=64, coarse_m=32, shortlist=800, rerank=30, train_size=65_536
    )
    assert p.verify == VerifyConf(
        n=50,
        nfeatures=1500,
        upsample=1.5,
        detector="fast",
        max_hamming=64,
        ratio=0.9,
        ransac_px=8.0,
        ransac_iters=200,
        max_angle_deg=30.0,
        query_words=2,
        distinct_m=50.0,
    )
    assert p.expand == ExpandConf(min_inliers=16, radius_m=25.0, heading_deg=40.0, pool=200)
    assert p.split == SplitConf(train=0.8, val=0.1, test=0.1, cell_m=250.0, seed=0)
    # Verification keypoints: TEBLID on 1,500 FAST corners of the image enlarged 1.5 times.
    assert p.verify_features == p.features.model_copy(update={"nfeatures": 1500, "upsample": 1.5, "detector": "fast"})
    # `default-counted` is the same with every inlier counting 1; `default-1k` that verifying with
    # 1,000 corners at the decoded size, one word per keypoint; `default-2k` with 2,000 on the image
    # enlarged twice.
    counted = get_pipeline("default-counted")
    assert counted.verify == p.verify.model_copy(update={"distinct_m": None})
    assert counted.model_copy(update={"name": p.name, "verify": p.verify}) == p
    one_k = get_pipeline("default-1k")
    assert one_k.verify == counted.verify.model_copy(update={"nfeatures": 1000, "upsample": 1.0, "query_words": 1})
    assert one_k.model_copy(update={"name": p.name, "verify": p.verify}) == p
    two_k = get_pipeline("default-2k")
    assert two_k.verify == counted.verify.model_copy(update={"nfeatures": 2000, "upsample": 2.0})
    assert two_k.model_copy(update={"name": p.name, "verify": p.verify}) == p
    # `fast` is the same without verification and expansion.
    fast = get_pipeline("fast")
    assert fast.model_copy(update={"name": p.name, "verify": p.verify, "expand": p.expand}) == p
    assert fast.verify is None and fast.expand is None
