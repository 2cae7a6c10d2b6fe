"""A warm store reports exactly what an empty store would, config field by config field.

For every field of Config (parametrised over the class, so a new field cannot be forgotten), a
one-class stream is replayed with that one field changed, once on a copy of a store that holds
the same stream with the defaults and once on an empty store. The two runs must report the same
figures and thresholds, and every artifact they name must hold the same arrays in both stores:
a field missing from a digest would make the warm store reuse an artifact computed with the
other value under the same name. The warm run must also recompute exactly the stages that read
the field, written out by hand below (not derived from the stages' declarations).
"""

from __future__ import annotations

import shutil
from unittest.mock import patch

import numpy as np
import pytest
import timm
import torch

from ucad.config import Config, load_config
from ucad.continual import Replay, RunResult
from ucad.data.synth import generate
from ucad.sam_masks import SAM_GENERATOR_VERSION
from ucad.store import ArtifactStore

TINY = {
    "image_size": 32,  # 2 x 2 patches: every stage runs, in well under a second
    "feature_layer": 1,
    "epochs": 1,
    "batch_size": 2,
    "key_size": 4,
    "knowledge_size": 6,
    "projection_dim": 8,
    "superpixel_segments": 4,
    "calibration_fraction": 0.25,
    "workers": 1,
    "max_workers": 1,
}

ALL = {"structure", "keys", "prompts", "knowledge", "calibrate"}
ALL |= {"features", "routing", "scores", "evaluate", "row"}
BACKBONE = ALL - {"structure"}
PROMPTED = {"prompts", "knowledge", "calibrate", "scores", "evaluate", "row"}
KNOWLEDGE = {"knowledge", "calibrate", "scores", "evaluate", "row"}
SCORING = {"calibrate", "scores", "evaluate", "row"}
NOTHING: set[str] = set()

# field -> (the fields to change, the stages a warm store must compute again)
CHANGES: dict[str, tuple[dict, set[str]]] = {
    "backbone": ({"backbone": "deit_tiny_patch16_224"}, ALL),  # other mean/std, same weights
    "pretrained": ({"pretrained": True}, BACKBONE),  # weights from the fixture's file
    "weights_file": ({"pretrained": True, "weights_file": "other"}, BACKBONE),
    "backbone_args": ({"backbone_args": {"qkv_bias": False}}, BACKBONE),
    "feature_layer": ({"feature_layer": 0}, BACKBONE),
    "image_size": ({"image_size": 48}, ALL),
    "resize": ({"resize": 40}, ALL),
    "prompt_mode": ({"prompt_mode": "additive"}, PROMPTED),
    "prompt_length": ({"prompt_length": 2}, PROMPTED),
    "structure": ({"structure": "sam"}, ALL),  # see test_structure_source_enters_digests
    "sam_model": ({"sam_model": "vit_l"}, NOTHING),  # superpixel structure reads no SAM field
    "sam_checkpoint": ({"sam_checkpoint": "/nowhere/sam.pth"}, NOTHING),
    "sam_points_per_side": ({"sam_points_per_side": 8}, NOTHING),
    "sam_pred_iou_thresh": ({"sam_pred_iou_thresh": 0.5}, NOTHING),
    "sam_stability_score_thresh": ({"sam_stability_score_thresh": 0.5}, NOTHING),
    "sam_box_nms_thresh": ({"sam_box_nms_thresh": 0.5}, NOTHING),
    "superpixel_segments": ({"superpixel_segments": 9}, {"structure"} | PROMPTED),
    "temperature": ({"temperature": 0.1}, PROMPTED),
    "lambda_pos": ({"lambda_pos": 0.5}, PROMPTED),
    "lambda_neg": ({"lambda_neg": 2.0}, PROMPTED),
    "lr": ({"lr": 0.05}, PROMPTED),
    "betas": ({"betas": (0.5, 0.9)}, PROMPTED),
    "batch_size": ({"batch_size": 3}, PROMPTED),
    "epochs": ({"epochs": 2}, PROMPTED),
    "grad_clip": ({"grad_clip": 1e-4}, PROMPTED),
    "key_size": ({"key_size": 3}, {"keys", "routing", "scores", "evaluate", "row"}),
    "knowledge_size": ({"knowledge_size": 5}, KNOWLEDGE),
    "projection_dim": ({"projection_dim": 4}, KNOWLEDGE),
    "reweight": ({"reweight": False}, SCORING),
    "reweight_neighbours": ({"reweight_neighbours": 1}, SCORING),
    "blur_sigma": ({"blur_sigma": 1.0}, {"evaluate", "row"}),
    "calibration_fraction": ({"calibration_fraction": 0.5}, KNOWLEDGE),
    "threshold_quantile": ({"threshold_quantile": 0.5}, {"calibrate"}),
    "seed": ({"seed": 1}, BACKBONE),  # random weights, prompt start, projection, split
    "device": ({"device": "cpu"}, NOTHING),
    "precision": ({"precision": "bf16"}, BACKBONE),
    # rounding of the backbone's products may depend on the images per pass (ucad/stages/common.py)
    "inference_batch_size": ({"inference_batch_size": 3}, BACKBONE - {"prompts"}),
    "workers": ({"workers": 2}, NOTHING),
    "tracking_uri": ({"tracking_uri": "sqlite:///elsewhere.db"}, NOTHING),
    "task_runner": ({"task_runner": "dask"}, NOTHING),  # the command runs stages in-process
    "dask_address": ({"task_runner": "dask", "dask_address": "tcp://127.0.0.1:1"}, NOTHING),
    "max_workers": ({"max_workers": 3}, NOTHING),
}
# Fields whose change cannot run here: SAM needs a checkpoint of its real architecture.
NOT_RUN_HERE = {"structure": "SAM structure maps need a SAM checkpoint (minutes per image)"}


def test_every_config_field_has_a_case():
    assert set(CHANGES) == set(Config.model_fields)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Data, a weights file, and a store holding the stream made with the base config."""
    root = tmp_path_factory.mktemp("digests")
    classes = generate(
        root / "data", classes=2, seed=0, train=4, test_good=2, test_defect=2, size=64
    )
    base = load_config("smoke", overrides=TINY)
    weights = root / "weights.pth"
    torch.save(vit_weights(base, seed=7), weights)
    world = {"root": root, "classes": tuple(classes), "base": base, "weights": weights}
    world["warm"] = ArtifactStore(root / "warm")
    replay(world, base, world["warm"], "base")
    return world


def vit_weights(config: Config, seed: int) -> dict:
    """A checkpoint of the whole ViT the config names, with seeded random weights."""
    torch.manual_seed(seed)
    return timm.create_model(config.backbone, img_size=config.image_size).state_dict()


def replay(world: dict, config: Config, store: ArtifactStore, model: str) -> RunResult:
    data = world["root"] / "data"
    return Replay(data, config, store, tasks=world["classes"], model=model).run()


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_a_warm_store_reports_what_an_empty_store_would(world, tmp_path, field):
    if field in NOT_RUN_HERE:
        pytest.skip(NOT_RUN_HERE[field])
    base = world["base"]
    overrides = dict(CHANGES[field][0])
    if overrides.get("pretrained"):
        # `pretrained` loads world["weights"]; `weights_file` swaps that file's content in place
        path = tmp_path / "weights.pth"
        shutil.copy(world["weights"], path)
        overrides["weights_file"] = str(path)
    config = Config(**{**base.model_dump(), **overrides})
    warm = ArtifactStore(tmp_path / "warm")
    shutil.copytree(world["warm"].root, warm.root)
    if field == "weights_file":
        # the warm store first holds the stream made with this file, then the file changes
        replay(world, config, warm, "before")
        torch.save(vit_weights(base, seed=8), overrides["weights_file"])
    warm_run = replay(world, config, warm, "changed")
    empty = ArtifactStore(tmp_path / "empty")
    empty_run = replay(world, config, empty, "changed")

    assert warm_run.as_json()["matrix"] == empty_run.as_json()["matrix"]
    assert thresholds(warm, "changed") == thresholds(empty, "changed")
    for record in empty_run.stages:  # every artifact the run names holds the same arrays
        ours, theirs = warm.get(record.stage, record.digest), empty.get(record.stage, record.digest)
        assert ours.names == theirs.names
        for name in ours.names:
            # equal up to float rounding: a batch size changes the order of sums, not the result
            np.testing.assert_allclose(
                ours.array(name), theirs.array(name), rtol=1e-5, atol=1e-6, err_msg=str(record)
            )
    recomputed = {record.stage for record in warm_run.stages if not record.cached}
    expected = CHANGES[field][1]
    if field == "weights_file":
        expected = BACKBONE  # against the "before" stream: the file's content changed
    assert recomputed == expected


def thresholds(store: ArtifactStore, model: str) -> list[float]:
    from ucad.manifest import load_version

    return [task.threshold for task in load_version(store, model).tasks]


def test_structure_source_enters_digests(world):
    """The one field not run above: switching the source renames every stage's artifacts."""
    from ucad.pipeline import Runtime
    from ucad.stages.evaluate import EVALUATE
    from ucad.stages.row import ROW
    from ucad.stages.structure import STRUCTURE

    base = world["base"]
    sam = base.model_copy(update={"structure": "sam"})
    for stage in (STRUCTURE, EVALUATE, ROW):
        assert "structure" in stage.field_names(sam) and "sam_points_per_side" in stage.field_names(
            sam
        )
        assert "sam_points_per_side" not in stage.field_names(base)
    store = world["warm"]
    digests = [STRUCTURE.digest(Runtime(c, store), {"train": "x"}) for c in (base, sam)]
    assert digests[0] != digests[1]
    # ucad's SAM generator names its version; segment-anything's own does not need one
    reference = base.model_copy(update={"structure": "sam_reference"})
    identities = [Runtime(c, store).structure_identity for c in (sam, reference)]
    assert identities[0]["generator"] == SAM_GENERATOR_VERSION
    assert "generator" not in identities[1]
    assert identities[0]["sam_sha256"] == identities[1]["sam_sha256"]
    with patch("ucad.pipeline.SAM_GENERATOR_VERSION", "next"):
        bumped = STRUCTURE.digest(Runtime(sam, store), {"train": "x"})
    assert bumped != digests[1]
