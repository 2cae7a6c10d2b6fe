"""End-to-end: the smoke preset on a synthetic stream, through the command and the library."""

import json

import numpy as np
import pytest
import torch

from ucad.cli import main
from ucad.config import load_config
from ucad.continual import AddTask, Replay
from ucad.data.datasets import read_task
from ucad.data.images import Geometry, load_images
from ucad.metrics import METRICS
from ucad.model import UCAD
from ucad.store import ArtifactStore

SMOKE = {"epochs": 1, "key_size": 32, "knowledge_size": 64}


def smoke_args(tmp_path):
    return ["--preset", "smoke", "--store", str(tmp_path / "store")] + [
        f"--set={k}={v}" for k, v in SMOKE.items()
    ]


def test_benchmark_json_has_every_figure(synth_root, tmp_path, capsys):
    out = tmp_path / "result.json"
    code = main(["benchmark", "--data", str(synth_root), "--json", str(out)] + smoke_args(tmp_path))
    assert code == 0
    result = json.loads(out.read_text())
    tasks = result["tasks"]
    assert tasks == sorted(tasks) and len(tasks) == 3
    assert result["seed"] == 0 and result["routing"] == "agnostic"
    for metric in METRICS:
        matrix = result["matrix"][metric]
        assert len(matrix) == 3
        for t, row in enumerate(matrix):
            assert all(v is not None for v in row[: t + 1]) and all(v is None for v in row[t + 1 :])
            assert all(0.0 <= v <= 1.0 for v in row[: t + 1])
        assert result["final"][metric] == pytest.approx(np.mean(matrix[-1]))
        assert result["forgetting"][metric] is not None
    printed = capsys.readouterr().out
    assert "image_auroc" in printed and "forgetting" in printed and ", ".join(tasks) in printed
    assert {s["stage"] for s in result["stages"]} >= {"structure", "keys", "prompts", "knowledge"}


def test_same_seed_same_figures_and_oracle_routing(synth_root, tmp_path):
    config = load_config("smoke", overrides=SMOKE)
    tasks = ["nut", "grain"]
    first = Replay(synth_root, config, ArtifactStore(tmp_path / "a"), tasks=tuple(tasks)).run()
    again = Replay(synth_root, config, ArtifactStore(tmp_path / "b"), tasks=tuple(tasks)).run()
    assert first.tasks == tasks
    assert first.as_json()["matrix"] == again.as_json()["matrix"]
    oracle = Replay(
        synth_root, config, ArtifactStore(tmp_path / "a"), tasks=tuple(tasks), routing="oracle"
    ).run()
    routing = oracle.as_json()["matrix"]["routing_accuracy"]
    assert all(v == 1.0 for row in routing for v in row if v is not None)


def test_model_version_predicts_with_per_image_routing(synth_root, tmp_path):
    config = load_config("smoke", overrides=SMOKE)
    store = ArtifactStore(tmp_path / "store")
    names = ["grain", "nut"]
    for name in names:
        AddTask("line", name, synth_root, config, store).run()
    model = UCAD.from_store(store, "line")
    assert model.task_names == names
    geometry = Geometry(224, 224)
    images = [
        load_images([s.image for s in read_task(synth_root, n, "mvtec").test[:3]], geometry)
        for n in names
    ]
    prediction = model.predict(np.concatenate(images))
    assert prediction.tasks.tolist() == [0, 0, 0, 1, 1, 1]
    assert prediction.maps.shape == (6, 224, 224)
    assert torch.isfinite(prediction.image_scores).all()
    first_version = UCAD.from_store(store, "line", 1)
    assert first_version.task_names == ["grain"]


def test_bad_data_root_is_a_clear_error(tmp_path, capsys):
    code = main(["benchmark", "--data", str(tmp_path / "nowhere")] + smoke_args(tmp_path))
    assert code == 1
    assert "nowhere" in capsys.readouterr().err
