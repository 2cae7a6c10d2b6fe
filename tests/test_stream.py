"""End-to-end: the smoke preset on a synthetic stream, through the library and the command."""

import json

import numpy as np
import pytest
import torch

from ucad.benchmark import geometry_for, run_stream
from ucad.cli import main
from ucad.config import load_config
from ucad.data.datasets import read_task
from ucad.data.images import load_images, load_test_set
from ucad.metrics import METRICS
from ucad.model import UCAD
from ucad.stages.evaluate import ContinualEvaluator

SMOKE = {"epochs": 1, "key_size": 32, "knowledge_size": 64}


def test_benchmark_json_has_every_figure(synth_root, tmp_path, capsys):
    out = tmp_path / "result.json"
    code = main(
        ["benchmark", "--data", str(synth_root), "--preset", "smoke", "--json", str(out)]
        + [f"--set={k}={v}" for k, v in SMOKE.items()]
    )
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


def test_same_seed_same_figures_and_oracle_routing(synth_root):
    config = load_config("smoke", overrides=SMOKE)
    tasks = ["nut", "grain"] if (synth_root / "nut").exists() else None
    first = run_stream(synth_root, "mvtec", config, tasks).as_json()
    again = run_stream(synth_root, "mvtec", config, tasks).as_json()
    assert first["matrix"] == again["matrix"]
    oracle = run_stream(synth_root, "mvtec", config, tasks, routing="oracle").as_json()
    assert all(
        v == 1.0 for row in oracle["matrix"]["routing_accuracy"] for v in row if v is not None
    )


def test_evaluation_cost_grows_linearly(synth_root):
    """After a new task only the new test set and re-routed images need forward passes."""
    config = load_config("smoke", overrides=SMOKE)
    model = UCAD(config)
    evaluator = ContinualEvaluator(model)
    names = sorted(p.name for p in synth_root.iterdir() if p.is_dir())
    passes, sizes = [], []
    for t, name in enumerate(names):
        data = read_task(synth_root, name, "mvtec")
        geometry = geometry_for(config, model)
        model.learn_task(name, load_images(data.train, geometry))
        test = load_test_set(data.test, geometry)
        evaluator.add_test_set(name, test)
        sizes.append(len(test.images))
        passes.append(sum(evaluator.evaluate(j).forward_passes for j in range(t + 1)))
        # the new set: one frozen and one prompted pass per image, at most; earlier sets:
        # only the images that the new task now attracts
        rerouted = sum(int((ts.distances.argmin(1) == t).sum()) for ts in evaluator.test_sets[:t])
        assert passes[-1] <= 2 * sizes[-1] + rerouted
    everything_again = sum(2 * sum(sizes[: t + 1]) for t in range(len(names)))
    assert sum(passes) < everything_again


def test_predict_routes_each_image_to_its_task(synth_root):
    config = load_config("smoke", overrides=SMOKE)
    model = UCAD(config)
    geometry = geometry_for(config, model)
    names = sorted(p.name for p in synth_root.iterdir() if p.is_dir())[:2]
    tests = []
    for name in names:
        data = read_task(synth_root, name, "mvtec")
        model.learn_task(name, load_images(data.train, geometry))
        tests.append(load_images([s.image for s in data.test[:3]], geometry))
    prediction = model.predict(np.concatenate(tests))
    assert prediction.tasks.tolist() == [0, 0, 0, 1, 1, 1]
    assert prediction.maps.shape == (6, 224, 224)
    assert torch.isfinite(prediction.image_scores).all()
    with pytest.raises(ValueError, match="already learned"):
        model.learn_task(names[0], tests[0])


def test_bad_data_root_is_a_clear_error(tmp_path, capsys):
    code = main(["benchmark", "--data", str(tmp_path / "nowhere"), "--preset", "smoke"])
    assert code == 1
    assert "nowhere" in capsys.readouterr().err
