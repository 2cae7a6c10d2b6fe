"""End-to-end: the smoke preset on a synthetic stream, through the command and the library."""

import json
from pathlib import Path

import numpy as np
import pytest
from test_oracle import (
    assert_same_figures,
    load_pixels,
    read_truth,
    reference_maps,
    reference_matrix,
    stored_evaluation,
    stored_routing,
    stored_scores,
)

from ucad.cli import main
from ucad.config import load_config
from ucad.continual import AddTask, Replay
from ucad.metrics import METRICS
from ucad.model import UCAD
from ucad.store import ArtifactStore

SMOKE = {"epochs": 1, "key_size": 32, "knowledge_size": 64}


def smoke_args(tmp_path):
    return ["--preset", "smoke", "--store", str(tmp_path / "store")] + [
        f"--set={k}={v}" for k, v in SMOKE.items()
    ]


def test_benchmark_figures_are_those_of_the_stored_scores_maps_and_labels(
    synth_root, tmp_path, capsys
):
    out = tmp_path / "result.json"
    code = main(["benchmark", "--data", str(synth_root), "--json", str(out)] + smoke_args(tmp_path))
    assert code == 0
    result = json.loads(out.read_text())
    tasks = result["tasks"]
    assert tasks == sorted(tasks) and len(tasks) == 3
    assert result["seed"] == 0 and result["routing"] == "agnostic"
    for metric in METRICS:
        assert [[v is None for v in row] for row in result["matrix"][metric]] == [
            [j > t for j in range(3)] for t in range(3)
        ]
    # every entry, final and forgetting, recomputed with scikit-learn and a reference AUPRO from
    # the stored evaluations (image scores, chosen classes), the anomaly maps rebuilt from the
    # stored patch scores, and the labels and masks read from the dataset files
    config = load_config("smoke", overrides=SMOKE)
    truths = {name: read_truth(synth_root / name, config.image_size) for name in tasks}
    store = ArtifactStore(tmp_path / "store")
    assert_same_figures(result, reference_matrix(store, result["model"], config, truths))
    printed = capsys.readouterr().out
    assert "image_auroc" in printed and "forgetting" in printed and ", ".join(tasks) in printed
    assert {s["stage"] for s in result["stages"]} >= {"structure", "keys", "prompts", "knowledge"}


def test_same_seed_same_figures_and_oracle_routing_where_keys_route_perfectly(synth_root, tmp_path):
    config = load_config("smoke", overrides=SMOKE)
    tasks = ["nut", "grain"]
    first = Replay(synth_root, config, ArtifactStore(tmp_path / "a"), tasks=tuple(tasks)).run()
    again = Replay(synth_root, config, ArtifactStore(tmp_path / "b"), tasks=tuple(tasks)).run()
    assert first.tasks == tasks
    assert first.as_json()["matrix"] == again.as_json()["matrix"]
    oracle = Replay(
        synth_root, config, ArtifactStore(tmp_path / "a"), tasks=tuple(tasks), routing="oracle"
    ).run()
    told, agnostic = oracle.as_json()["matrix"], first.as_json()["matrix"]
    assert all(v == 1.0 for row in told["routing_accuracy"] for v in row if v is not None)
    # Where every image chose its own class by its keys, it was scored exactly as when told its
    # class: the same scores, so the same figures, entry by entry.
    perfect = [
        (t, j)
        for t, row in enumerate(agnostic["routing_accuracy"])
        for j, value in enumerate(row)
        if value == 1.0
    ]
    assert any(t > 0 for t, _ in perfect)  # a version with two classes to choose from
    for metric in METRICS:
        for t, j in perfect:
            assert told[metric][t][j] == agnostic[metric][t][j], (metric, t, j)


def test_predict_scores_are_the_stored_evaluation_scores_version_by_version(synth_root, tmp_path):
    """`UCAD.predict` and `ucad predict` give each test image the class, score and map the
    evaluation stage stored for it, under each model version."""
    config = load_config("smoke", overrides=SMOKE)
    store = ArtifactStore(tmp_path / "store")
    names = ["grain", "nut"]
    for name in names:
        AddTask("line", name, synth_root, config, store).run()
    truths = {name: read_truth(synth_root / name, config.image_size) for name in names}
    for v in (1, 2):
        tasks = store.read_model("line", v)["tasks"]
        model = UCAD.from_store(store, "line", v)
        assert model.task_names == names[:v]
        report = tmp_path / f"v{v}.json"
        tests = [str(synth_root / name / "test") for name in names[:v]]
        assert (
            main(
                [
                    "predict",
                    "--model",
                    f"line@{v}",
                    *tests,
                    "--store",
                    store.root,
                    "--json",
                    str(report),
                ]
            )
            == 0
        )
        records = {Path(r["path"]).resolve(): r for r in json.loads(report.read_text())["images"]}
        assert len(records) == sum(len(truths[name].images) for name in names[:v])
        for j, name in enumerate(names[:v]):
            truth = truths[name]
            _, _, selected = stored_routing(store, tasks, j)
            stored = stored_evaluation(store, tasks, j, selected).array("image_scores")
            patch, _ = stored_scores(store, tasks, j, selected, model.backbone.num_patches)
            prediction = model.predict(load_pixels(truth.images, config.image_size))
            assert prediction.tasks.tolist() == selected.tolist()
            np.testing.assert_allclose(prediction.image_scores.numpy(), stored, rtol=1e-5)
            maps = reference_maps(patch, model.backbone.grid, config.image_size, config.blur_sigma)
            np.testing.assert_allclose(prediction.maps.numpy(), maps, rtol=1e-4, atol=1e-4)
            for i, path in enumerate(truth.images):
                record = records[path.resolve()]
                assert record["task"] == tasks[selected[i]]["name"]
                assert record["score"] == pytest.approx(float(stored[i]), rel=1e-5)
                assert record["anomalous"] == (record["score"] > tasks[selected[i]]["threshold"])


def test_bad_data_root_is_a_clear_error(tmp_path, capsys):
    code = main(["benchmark", "--data", str(tmp_path / "nowhere")] + smoke_args(tmp_path))
    assert code == 1
    assert "nowhere" in capsys.readouterr().err
