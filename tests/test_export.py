"""ONNX export: one graph per model version, task-agnostic routing inside, run by onnxruntime.

Parity with the torch path is asserted at rtol 1e-3 (atol 1e-3 on scores and map values of
order 1-10); on this smoke model the largest differences seen are about 1e-5.
"""

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import Block

from ucad import scoring
from ucad.config import load_config
from ucad.continual import Replay
from ucad.data.images import Geometry, load_images
from ucad.data.synth import generate
from ucad.export import (
    EXPORT_FILE,
    GRAPH_FILE,
    OUTPUT_NAMES,
    add_export_parser,
    export_model,
    export_onnx,
    latency,
    manifest_digest,
)
from ucad.inference import Inspector, image_frame
from ucad.model import UCAD
from ucad.onnx_inspector import OnnxInspector, frame_map, load_onnx_inspector
from ucad.predictions import predict_files
from ucad.stages.features import extract_features
from ucad.store import ArtifactStore

# Small and quick: 96 px input (a 6x6 patch grid), two blocks, one epoch.
SMALL = {
    "epochs": 1,
    "key_size": 16,
    "knowledge_size": 32,
    "calibration_fraction": 0.25,
    "image_size": 96,
    "feature_layer": 1,
}
RTOL, ATOL = 1e-3, 1e-3


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> SimpleNamespace:
    """Model `m`: three synthetic classes learned in alphabetical order."""
    root = tmp_path_factory.mktemp("export")
    names = generate(root / "data", classes=3, seed=0, train=8, test_good=2, test_defect=2)
    config = load_config("smoke", overrides=SMALL)
    store = ArtifactStore(root / "store")
    Replay(root / "data", config, store, model="m").run()
    tests = sorted(p for name in names for p in (root / "data" / name / "test").glob("*/*.png"))
    return SimpleNamespace(root=root, store=store, classes=sorted(names), tests=tests)


def run_cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    args.run(args)


@pytest.fixture(scope="module")
def exported(line) -> Path:
    """`ucad export` of the latest version, static batch of 1, default opset."""
    out, store = line.root / "onnx", ["--store", line.store.root]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        run_cli(["export", "--model", "m", "--format", "onnx", "--out", str(out), *store])
    line.printed = printed.getvalue()
    return out


@pytest.fixture(scope="module")
def model(line):
    """The torch path of the latest version, on the CPU; tests that change it take a copy."""
    return Inspector.load(line.store, "m", device="cpu").model


def test_export_writes_a_checked_graph_and_its_description(line, exported):
    onnx.checker.check_model(str(exported / GRAPH_FILE), full_check=True)
    graph = onnx.load(str(exported / GRAPH_FILE))
    images = graph.graph.input[0]
    assert images.name == "images"
    assert images.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in images.type.tensor_type.shape.dim] == [1, 96, 96, 3]
    assert [o.name for o in graph.graph.output] == list(OUTPUT_NAMES)
    meta = json.loads((exported / EXPORT_FILE).read_text())
    assert meta["classes"] == line.classes
    stored = {task["name"]: task["threshold"] for task in line.store.read_model("m")["tasks"]}
    assert meta["thresholds"] == stored
    assert (meta["model"], meta["version"], meta["opset"]) == ("m", 3, 18)
    assert meta["model_digest"] == manifest_digest(line.store.read_model("m", 3))
    pre = meta["preprocessing"]
    assert (pre["resize"], pre["crop"], pre["interpolation"]) == (96, 96, "bicubic")
    assert len(pre["mean"]) == len(pre["std"]) == 3


def test_cli_says_what_it_wrote_and_refuses_an_unsupported_opset(line, exported, tmp_path):
    assert "model m version 3 (3 classes" in line.printed
    assert f"wrote {exported / GRAPH_FILE}" in line.printed
    assert f"wrote {exported / EXPORT_FILE}" in line.printed
    out = tmp_path / "again"
    with pytest.raises(ValueError, match="opset 13 is not supported"):
        run_cli(
            [
                "export",
                "--model",
                "m",
                "--out",
                str(out),
                "--opset",
                "13",
                "--store",
                line.store.root,
            ]
        )
    assert not out.exists()


def test_onnx_matches_torch_on_every_class(line, model, exported):
    images = load_images(line.tests, model.geometry)
    expected = model.predict(images)
    got = load_onnx_inspector(exported).predict_arrays(images)
    np.testing.assert_array_equal(got.tasks, expected.tasks.numpy())
    assert len(set(got.tasks.tolist())) == 3  # routing is exercised, not constant
    np.testing.assert_allclose(got.image_scores, expected.image_scores.numpy(), RTOL, ATOL)
    np.testing.assert_allclose(got.maps, expected.maps.numpy(), RTOL, ATOL)
    frozen = extract_features(model.backbone, images)
    keys = [memory.keys for memory in model.memories]
    np.testing.assert_allclose(got.key_distances, scoring.task_distances(frozen, keys), RTOL)
    score_gap = np.abs(got.image_scores - expected.image_scores.numpy()).max()
    map_gap = np.abs(got.maps - expected.maps.numpy()).max()
    print(f"\nlargest differences: scores {score_gap:.2g}, maps {map_gap:.2g}")


def test_onnx_inspector_offers_the_inspector_surface(line, exported, tmp_path):
    reference = Inspector.load(line.store, "m")
    inspector = load_onnx_inspector(exported)
    assert (inspector.name, inspector.version) == ("m", 3)
    assert inspector.thresholds == reference.thresholds
    assert inspector.task_names == line.classes and inspector.workers >= 1
    wide = Image.open(line.tests[0]).convert("RGB").resize((150, 100))
    inputs = [line.tests[1], wide, np.asarray(Image.open(line.tests[-1]))]
    for got, want in zip(inspector.predict(inputs), reference.predict(inputs), strict=True):
        assert got.task == want.task
        assert got.score == pytest.approx(want.score, rel=RTOL)
        assert got.map.shape == want.map.shape
        np.testing.assert_allclose(got.map, want.map, RTOL, ATOL)  # NaNs where cropped, alike
    records = list(predict_files(inspector, [line.tests[0].parent], tmp_path / "maps"))
    assert records and all(Path(r["heatmap"]).is_file() for r in records)


def test_frame_map_is_image_frame_in_numpy():
    rng = np.random.default_rng(0)
    crop_map = rng.random((64, 64), dtype=np.float32) * 5
    for geometry, size in (
        (Geometry(64, 64), (64, 64)),
        (Geometry(72, 64), (200, 90)),
        (Geometry(64, 64, "bilinear"), (33, 131)),
    ):
        want = image_frame(torch.from_numpy(crop_map), size, geometry)
        np.testing.assert_allclose(frame_map(crop_map, size, geometry), want, atol=1e-5)


def additive_model(model, images: np.ndarray, keys: list[int], knowledge: list[int]) -> UCAD:
    """`model` with additive prompts and cut-down memories; the class the first image chooses
    keeps only 2 knowledge rows, fewer than the re-weighting's 3 neighbours.

    Frozen features do not depend on prompts, so the learned keys still route."""
    config = model.config.model_copy(update={"prompt_mode": "additive"})
    memories = [
        dataclasses.replace(
            m, keys=m.keys[:k], prompts=m.prompts[:, 0, 0], knowledge=m.knowledge[:n]
        )
        for m, k, n in zip(model.memories, keys, knowledge, strict=True)
    ]
    additive = UCAD(config, memories)
    first = int(additive.predict(images[:1]).tasks[0])
    shrunk = dataclasses.replace(memories[first], knowledge=memories[first].knowledge[:2])
    additive.memories = [shrunk if i == first else m for i, m in enumerate(memories)]
    return additive


def test_dynamic_batch_additive_prompts_and_memories_of_different_sizes(line, model, tmp_path):
    """One graph for batches of 1 and of 3; banks padded to the largest class."""
    images = load_images(line.tests[::4], model.geometry)  # one image of each class
    additive = additive_model(model, images, keys=[16, 10, 16], knowledge=[32, 20, 32])
    thresholds = dict.fromkeys(additive.task_names, 1.0)
    out = export_model(
        additive,
        tmp_path,
        name="m",
        version=3,
        thresholds=thresholds,
        model_digest="x",
        dynamic_batch=True,
    )
    inspector = OnnxInspector(out)
    assert inspector.graph_batch is None
    expected = additive.predict(images)
    together = inspector.session.run(None, {"images": images})
    one_by_one = [inspector.session.run(None, {"images": images[i : i + 1]}) for i in range(3)]
    for index, want in enumerate((expected.tasks, expected.image_scores, expected.maps)):
        np.testing.assert_allclose(together[index], want.numpy(), RTOL, ATOL)
        single = np.concatenate([run[index] for run in one_by_one])
        np.testing.assert_allclose(single, together[index], rtol=1e-5, atol=1e-5)


def test_unknown_model_or_version_is_refused(line, tmp_path):
    with pytest.raises(FileNotFoundError, match="'nosuch'"):
        export_onnx(line.store, "nosuch", tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no version 9"):
        export_onnx(line.store, "m@9", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unsupported_configuration_is_refused_naming_it(model, tmp_path):
    model = copy.deepcopy(model)
    model.backbone.vit.blocks[1].__class__ = type("GatedBlock", (Block,), {})
    thresholds = dict.fromkeys(model.task_names, 1.0)
    with pytest.raises(ValueError, match="prefix prompts through block 1 .*GatedBlock"):
        export_model(
            model, tmp_path / "x", name="m", version=3, thresholds=thresholds, model_digest="x"
        )
    assert not (tmp_path / "x").exists()


def test_damaged_or_missing_exports_are_refused(exported, tmp_path):
    with pytest.raises(FileNotFoundError, match=EXPORT_FILE):
        load_onnx_inspector(tmp_path)
    damaged = Path(shutil.copytree(exported, tmp_path / "copy"))
    with pytest.raises(ValueError, match="'nosuch'"):
        load_onnx_inspector(damaged, thresholds={"nosuch": 1.0})
    with open(damaged / GRAPH_FILE, "ab") as graph:
        graph.write(b"\0")
    with pytest.raises(ValueError, match="sha256"):
        load_onnx_inspector(damaged)


def test_latency_of_both_paths(line, exported):
    images = load_images(line.tests[:4], Geometry(96, 96))
    figures = latency(exported, images, repeats=1, store=line.store)
    print(f"\n{figures}")
    assert figures["onnxruntime_ms_per_image"] > 0 and figures["torch_ms_per_image"] > 0


def test_ucad_predict_onnx_gives_the_records_of_ucad_predict(line, exported, tmp_path, capsys):
    """The command a line PC runs: same classes, decisions and (within tolerance) scores."""
    from ucad.cli import main

    images = [str(p) for p in line.tests[::3]]
    torch_json, onnx_json = tmp_path / "torch.json", tmp_path / "onnx.json"
    store = ["--store", line.store.root]
    assert main(["-q", "predict", "--model", "m", *images, *store, "--json", str(torch_json)]) == 0
    assert main(["-q", "predict", "--onnx", str(exported), *images, "--json", str(onnx_json)]) == 0
    ours, theirs = (json.loads(p.read_text()) for p in (onnx_json, torch_json))
    assert (ours["model"], ours["version"]) == (theirs["model"], theirs["version"])
    assert ours["thresholds"] == theirs["thresholds"]
    for a, b in zip(ours["images"], theirs["images"], strict=True):
        assert (a["path"], a["task"]) == (b["path"], b["task"])
        assert a["score"] == pytest.approx(b["score"], rel=RTOL, abs=ATOL)
        if abs(b["score"] - b["threshold"]) > ATOL + RTOL * abs(b["threshold"]):
            assert a["anomalous"] == b["anomalous"]
    with pytest.raises(SystemExit) as refused:  # one model source, not both
        main(["predict", "--onnx", str(exported), "--model", "m", images[0]])
    assert refused.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_ucad_predict_onnx_runs_without_importing_torch(line, exported, tmp_path):
    """The deployment path starts in a fraction of torch's import time: it must not import it."""
    import subprocess
    import sys

    maps = tmp_path / "maps"
    script = (
        "import sys; from ucad.cli import main; "
        f"code = main(['-q', 'predict', '--onnx', {str(exported)!r}, {str(line.tests[0])!r}, "
        f"'--out', {str(maps)!r}]); "
        "print('torch' in sys.modules, 'timm' in sys.modules); sys.exit(code)"
    )
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip().splitlines()[-1] == "False False"
    assert len(list(maps.rglob("*.heatmap.png"))) == 1
