"""Inspection: thresholds calibrated on held-out normal training images, `ucad predict`, heat
maps at each image's own size, and the Python API."""

import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ucad.calibration import calibration_split, conformal_threshold
from ucad.cli import main
from ucad.config import load_config
from ucad.continual import Replay
from ucad.data.images import Geometry
from ucad.data.source import TaskSource
from ucad.data.synth import generate
from ucad.inference import Inspector, image_frame
from ucad.pipeline import Runtime
from ucad.predictions import overlay
from ucad.stages.features import extract_features
from ucad.store import ArtifactStore

README = Path(__file__).resolve().parents[1] / "README.md"
README_FIGURES = re.compile(
    r"(\d+) of (\d+) normal test images passed, (\d+) of (\d+) defective ones were flagged, "
    r"all (\d+) chose their own class"
)
# A quarter of 24 training images per class, 6, are held out to calibrate each threshold.
SMOKE = {"epochs": 1, "key_size": 32, "knowledge_size": 64, "calibration_fraction": 0.25}
TRAIN = 24


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> SimpleNamespace:
    """Model `line`: a synthetic stream of three classes, learned in alphabetical order."""
    root = tmp_path_factory.mktemp("predict")
    names = generate(root / "data", classes=3, seed=0, train=TRAIN, test_good=10, test_defect=10)
    config = load_config("smoke", overrides=SMOKE)
    store = ArtifactStore(root / "store")
    Replay(root / "data", config, store, model="line").run()
    return SimpleNamespace(
        root=root, data=root / "data", store=store, classes=sorted(names), config=config
    )


@pytest.fixture(scope="module")
def predicted(line) -> dict:
    """`ucad predict` on every class's test images, with heat maps and JSON."""
    tests = [str(line.data / name / "test") for name in line.classes]
    out, report = line.root / "heatmaps", line.root / "predict.json"
    args = ["predict", "--model", "line", *tests, "--store", line.store.root]
    assert main(args + ["--out", str(out), "--json", str(report)]) == 0
    return json.loads(report.read_text())


def test_decisions_at_the_stored_thresholds_against_the_labels(line, predicted):
    """Thresholds come from training images only; the test labels are used here, and only
    here, to report how the decisions turn out."""
    manifest = line.store.read_model("line")
    stored = {task["name"]: task["threshold"] for task in manifest["tasks"]}
    rows, normal_passed, defects_flagged, routed, count = [], 0, 0, 0, 0
    for task in manifest["tasks"]:
        held = line.store.get("calibrate", task["calibrate"]).array("scores")
        assert len(held) == math.ceil(0.25 * TRAIN)
        records = [r for r in predicted["images"] if Path(r["path"]).parts[-4] == task["name"]]
        for r in records:
            assert r["threshold"] == stored[r["task"]]
            assert r["anomalous"] == (r["score"] > r["threshold"])
        normal = [r for r in records if Path(r["path"]).parent.name == "good"]
        defect = [r for r in records if Path(r["path"]).parent.name != "good"]
        passed = sum(not r["anomalous"] for r in normal)
        flagged = sum(r["anomalous"] for r in defect)
        right_class = sum(r["task"] == task["name"] for r in records)
        rows.append(
            f"{task['name']:8} held out {len(held)}  threshold {task['threshold']:.3f}  "
            f"normal passed {passed}/{len(normal)}  defects flagged {flagged}/{len(defect)}  "
            f"routed to own class {right_class}/{len(records)}"
        )
        normal_passed += passed
        defects_flagged += flagged
        routed += right_class
        count += len(records)
    print("\n" + "\n".join(rows))
    # The README states this seeded stream's figures; they are asserted exactly, so the README
    # and the code cannot drift apart. (A change that moves them must update the README.)
    assert count == 3 * 20
    stated = README_FIGURES.search(" ".join(README.read_text().split()))
    assert stated, "the README no longer states the figures of this stream"
    passed_of, normal_of, flagged_of, defect_of, chose = map(int, stated.groups())
    assert (normal_of, defect_of, chose) == (30, 30, 60)
    assert (normal_passed, defects_flagged, routed) == (passed_of, flagged_of, chose)


def test_heat_maps_have_each_images_size_and_distinct_names(line, predicted):
    records = predicted["images"]
    assert len({r["heatmap"] for r in records}) == len(records) == 60
    for r in records:
        with Image.open(r["path"]) as image, Image.open(r["heatmap"]) as heatmap:
            assert heatmap.size == image.size and heatmap.mode == "RGB"
    # paths below the inputs' common folder are kept, so 000.png of every folder stays apart
    first = line.root / "heatmaps" / line.classes[0] / "test" / "good" / "000.png.heatmap.png"
    assert str(first) in {r["heatmap"] for r in records}


def test_output_folder_inside_the_input_is_never_read_back(line, tmp_path, capsys):
    inputs = Path(shutil.copytree(line.data / line.classes[0] / "test", tmp_path / "in"))
    args = ["predict", "--model", "line", str(inputs), "--store", line.store.root]
    for _ in range(2):
        assert main(args + ["--out", str(inputs / "maps")]) == 0
        assert "20 images" in capsys.readouterr().out


def defect_images(line, name: str) -> list[Path]:
    return sorted(p for p in (line.data / name / "test").glob("*/*") if p.parent.name != "good")


def test_python_api_takes_paths_pil_images_and_arrays_alike(line):
    inspector = Inspector.load(line.store, "line@2")
    assert inspector.model.task_names == line.classes[:2]
    path = defect_images(line, line.classes[1])[0]
    image = Image.open(path)
    by_path, by_image, by_array = inspector.predict([path, image, np.asarray(image)])
    for other in (by_image, by_array):
        assert other.task == by_path.task == line.classes[1]
        assert other.score == pytest.approx(by_path.score, rel=1e-5)
        np.testing.assert_allclose(other.map, by_path.map, rtol=1e-5)
    assert by_path.map.shape == (image.height, image.width)
    assert by_path.anomalous == (by_path.score > inspector.thresholds[by_path.task])


def test_non_square_image_gets_a_map_of_its_size_unscored_where_cropped(line):
    inspector = Inspector.load(line.store, "line")
    path = sorted((line.data / line.classes[0] / "test" / "good").iterdir())[0]
    wide = Image.open(path).convert("RGB").resize((320, 200))
    result = inspector.predict([wide])[0]
    assert result.map.shape == (200, 320)
    unscored = np.isnan(result.map).all(axis=0)
    # 320x200 -> 358x224 -> centre crop 224: about 60 columns on each side were cut away
    assert unscored[:55].all() and unscored[-55:].all() and not unscored[65:-65].any()
    assert not np.isnan(result.map).all(axis=1).any()
    overlay = np.asarray(result.overlay())
    assert overlay.shape == (200, 320, 3)
    np.testing.assert_array_equal(overlay[:, unscored], np.asarray(wide)[:, unscored])


def test_threshold_override_changes_only_the_named_class(line):
    stored = {t["name"]: t["threshold"] for t in line.store.read_model("line")["tasks"]}
    grain, other = line.classes[0], line.classes[1]
    inspector = Inspector.load(line.store, "line", thresholds={grain: 1e9})
    assert inspector.thresholds == {**stored, grain: 1e9}
    assert not any(r.anomalous for r in inspector.predict(defect_images(line, grain)))
    assert inspector.thresholds[other] == stored[other]


def test_overlay_colours_are_tied_to_the_threshold_not_to_the_image():
    """README: blue at 0, green at the threshold, red at twice the threshold and above, the same
    in every image; unscored (NaN) pixels keep their own colour."""
    grey = Image.new("RGB", (6, 1), (100, 100, 100))
    for threshold in (0.5, 40.0):
        values = [0.0, threshold, 2 * threshold, 3 * threshold, math.nan, 100 * threshold]
        pixels = np.asarray(overlay(grey, np.array([values], dtype=np.float32), threshold))[0]
        zero, at, twice, above, unscored, outlier = pixels.astype(int)
        assert zero[2] > zero[1] and zero[2] > zero[0]  # blue
        assert at[1] > at[0] and at[1] > at[2]  # green
        assert twice[0] > twice[1] and twice[0] > twice[2]  # red
        assert (above == twice).all() and (outlier == twice).all()  # saturated, not rescaled
        assert (unscored == 100).all()
        # the colour of a value does not depend on the rest of the map: no per-image range
        alone = np.asarray(overlay(grey, np.full((1, 6), threshold, np.float32), threshold))
        assert (alone[0] == at).all()


def test_image_frame_inverts_resize_and_centre_crop():
    geometry = Geometry(resize=256, crop=224)
    size = (400, 300)  # resized to 341x256, crop box from (58, 16)
    columns = torch.arange(224, dtype=torch.float32).expand(224, 224)
    rows = columns.T.contiguous()
    for crop_map, axis, length, scale, offset in (
        (columns, 1, 400, 341 / 400, 58),
        (rows, 0, 300, 256 / 300, 16),
    ):
        frame = image_frame(crop_map, size, geometry)
        assert frame.shape == (300, 400)
        # centre of image pixel i in crop coordinates; crop pixel c covers [c, c + 1)
        at = (np.arange(length) + 0.5) * scale - offset
        profile = frame[150] if axis == 1 else frame[:, 200]  # a line through the crop
        inside = (at >= 0) & (at < 224)
        assert np.isnan(profile[~inside]).all() and not np.isnan(profile[inside]).any()
        interior = (at >= 0.5) & (at <= 223.5)  # the ramp is linear there: sampling is exact
        np.testing.assert_allclose(profile[interior], at[interior] - 0.5, atol=1e-3)


# Calibration ----------------------------------------------------------------------------------


def test_calibration_split_is_seeded_disjoint_and_never_empty():
    for count, held in ((2, 1), (8, 1), (16, 2), (60, 6), (61, 7)):
        fit, out = calibration_split(count, 0.1, seed=0)
        assert len(out) == held and sorted([*fit, *out]) == list(range(count))
    assert (calibration_split(60, 0.1, 0)[1] == calibration_split(60, 0.1, 0)[1]).all()
    assert (calibration_split(60, 0.1, 0)[1] != calibration_split(60, 0.1, 1)[1]).any()
    assert len(calibration_split(10, 0.95, 0)[0]) == 1  # the knowledge keeps one image
    with pytest.raises(ValueError, match="1 training image"):
        calibration_split(1, 0.1, 0)


def test_conformal_threshold_rank():
    scores = np.arange(1, 201, dtype=float)[::-1]  # 200 scores, any order
    assert conformal_threshold(scores, 0.99) == 199  # ceil(201 * 0.99) = 199th smallest
    assert conformal_threshold(scores, 0.5) == 101
    assert conformal_threshold(scores[:5], 0.99) == 200  # few images: the largest
    assert conformal_threshold(np.arange(1, 100), 0.99) == 99
    assert conformal_threshold(np.arange(1, 100), 0.98) == 98  # ceil(100 * 0.98) exactly


def test_threshold_is_the_conformal_rank_of_held_out_images_kept_out_of_the_knowledge(line):
    store = line.store
    entry = store.read_model("line", 1)["tasks"][0]
    calibration = store.get("calibrate", entry["calibrate"])
    scores = calibration.array("scores")
    assert entry["threshold"] == calibration.attrs["threshold"] == max(scores)
    assert conformal_threshold(scores, line.config.threshold_quantile) == entry["threshold"]
    # every later version keeps the class's threshold
    assert store.read_model("line")["tasks"][0]["threshold"] == entry["threshold"]

    rt = Runtime(line.config, store)
    images = rt.train_images(TaskSource(**entry["data"]))
    fit, held = calibration_split(len(images), line.config.calibration_fraction, line.config.seed)
    assert (calibration.array("index") == held).all()
    prompts = torch.from_numpy(store.get("prompts", entry["prompts"]).array("prompts"))
    knowledge = torch.from_numpy(store.get("knowledge", entry["knowledge"]).array("knowledge"))

    def distance_to_nearest_patch(subset: np.ndarray) -> torch.Tensor:
        patches = extract_features(rt.backbone, images[subset], prompts, 32).flatten(0, 1)
        exact = torch.cdist(knowledge, patches, compute_mode="donot_use_mm_for_euclid_dist")
        return exact.min(dim=1).values

    # each knowledge vector is a patch of a knowledge image, none is one of a held-out image
    assert distance_to_nearest_patch(fit).max() < 1e-3
    assert distance_to_nearest_patch(held).min() > 1e-2


def test_python_api_names_the_image_it_cannot_use(line):
    inspector = Inspector.load(line.store, "line")
    good = np.zeros((64, 64, 3), dtype=np.uint8)
    cases = [
        (
            np.zeros((64, 64, 3)),
            "image 1: cannot use an array of shape (64, 64, 3) and dtype float64",
        ),
        (Image.new("RGB", (16, 40)), "image 1: image is 16x40 px, smaller than the minimum"),
        (Image.new("F", (64, 64)), "image 1: cannot read image: floating-point images"),
        (42, "image 1: expected a path, a PIL image or a numpy array, got int"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            inspector.predict([good, bad])
