"""The cached pipeline: what is computed, what is reused, and what survives a kill.

Every claim is checked by counting computed stages, never by timing.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

from ucad import pipeline
from ucad.config import load_config
from ucad.continual import AddTask, Replay, unique_records
from ucad.manifest import load_version
from ucad.pipeline import Runtime, StageRecord
from ucad.runners import LocalRunner, stage_name
from ucad.stages.evaluate import run_evaluate
from ucad.stages.routing import rows_of
from ucad.store import ArtifactStore, ModelVersionConflict

SMOKE = {"epochs": 1, "key_size": 32, "knowledge_size": 64}


def computed(result):
    return Counter(s.stage for s in result.stages if not s.cached)


@pytest.fixture
def config():
    return load_config("smoke", overrides=SMOKE)


def test_identical_add_task_computes_nothing_and_writes_no_version(synth_root, tmp_path, config):
    store = ArtifactStore(tmp_path / "store")
    first = AddTask("m", "grain", synth_root, config, store).run()
    assert first.version == 1 and first.new_version
    assert computed(first) == Counter(
        structure=1,
        keys=1,
        prompts=1,
        knowledge=1,
        calibrate=1,
        features=1,
        routing=1,
        scores=1,
        evaluate=1,
        row=1,
    )
    again = AddTask("m", "grain", synth_root, config, store).run()
    assert computed(again) == Counter()
    # the class is in the head: nothing is learned again, and its figures are one lookup
    assert [(s.stage, s.cached) for s in again.stages] == [("row", True)]
    assert not again.new_version and store.model_versions("m") == [1]
    assert again.as_json()["matrix"] == first.as_json()["matrix"]


def test_new_class_computes_only_its_stages_and_new_evaluations(synth_root, tmp_path, config):
    store = ArtifactStore(tmp_path / "store")
    AddTask("m", "grain", synth_root, config, store).run()
    second = AddTask("m", "nut", synth_root, config, store).run()
    assert second.version == 2
    learned = {
        s.stage: s.task
        for s in second.stages
        if not s.cached and s.stage in ("structure", "keys", "prompts", "knowledge", "calibrate")
    }
    assert learned == dict.fromkeys(
        ("structure", "keys", "prompts", "knowledge", "calibrate"), "nut"
    )
    counts = computed(second)
    # version 1's row is looked up; under version 2, grain's evaluation is computed again only
    # if one of its images now selects nut (its figures are named by what they are made of)
    grain_changed = _selection_changed(store, second, "grain")
    assert counts["evaluate"] == 1 + grain_changed
    grain_evaluations = {
        s.digest for s in second.stages if s.stage == "evaluate" and s.task == "grain"
    }
    assert len(grain_evaluations) == 1 + grain_changed
    # frozen features only for the new test set; grain's features are reused
    assert counts["features"] == 1
    # one routing for version 2: grain's images built on version 1's routing (one more class's
    # distances), nut's images among both classes at once
    assert counts["routing"] == 1
    assert len(second.results.matrix("image_auroc")) == 2
    # version 1's row is found in the store; version 2's is written
    rows = [(s.task, s.cached) for s in second.stages if s.stage == "row"]
    assert sorted(rows) == [("grain", True), ("nut", False)]


class CallLog:
    """A runner that runs stages in this process and notes each call (stage, arguments)."""

    def __init__(self, rt: Runtime) -> None:
        self.runner = LocalRunner(rt)
        self.workers = 1
        self.calls: list[tuple[str, tuple]] = []

    def __call__(self, stage, *args, **kwargs):
        self.calls.append((stage_name(stage), args))
        return self.runner(stage, *args, **kwargs)


def test_a_step_evaluates_the_new_version_only(synth_root, tmp_path, config):
    """Rows of earlier versions are found with one lookup each, and the results matrix is what
    a replay into an empty store reports."""
    names = ("grain", "nut", "stripes")
    store = ArtifactStore(tmp_path / "store")
    for name in names[:2]:
        AddTask("m", name, synth_root, config, store).run()
    log = CallLog(Runtime(config, store))
    third = AddTask("m", "stripes", synth_root, config, store).run(log)
    evaluated = [(args[0].version, args[1]) for stage, args in log.calls if stage == "evaluate"]
    assert evaluated == [(3, 0), (3, 1), (3, 2)]
    looked_up = [args[0].version for stage, args in log.calls if stage == "find_row"]
    assert looked_up == [1, 2, 3]
    rows = [s for s in third.stages if s.stage == "row"]
    assert [s.cached for s in rows] == [True, True, False]
    replayed = Replay(synth_root, config, ArtifactStore(tmp_path / "empty"), tasks=names).run()
    assert third.as_json()["matrix"] == replayed.as_json()["matrix"]
    assert len(store.artifacts("row")) == 3


def test_an_evaluation_is_found_once_its_images_are_routed(synth_root, tmp_path, config):
    """An evaluation is named once its images are routed, its score artifacts by name: one the
    store has is found without looking a score up. The name is the one a full evaluation gives:
    without the evaluation and its scores, they are computed again under the same names."""
    store = ArtifactStore(tmp_path / "store")
    for name in ("grain", "nut", "stripes"):
        AddTask("m", name, synth_root, config, store).run()
    rt = Runtime(config, store)
    version = load_version(store, "m", 3)
    for j, task in enumerate(version.tasks):
        found = run_evaluate(rt, version, j)
        assert found.records[-1].cached
        assert "scores" not in {record.stage for record in found.records}
        store.remove("evaluate", found.digest)
        for _, digest in store.artifacts("scores"):
            if store.get("scores", digest).attrs["task"] == task.name:
                store.remove("scores", digest)
        again = run_evaluate(rt, version, j)
        computed = {record.stage for record in again.records if not record.cached}
        assert computed == {"scores", "evaluate"}
        assert (again.digest, again.metrics) == (found.digest, found.metrics)


def test_rows_are_named_by_their_routing(synth_root, tmp_path, config):
    """Oracle routing on a model evaluated task-agnostically makes rows of its own."""
    store = ArtifactStore(tmp_path / "store")
    for name in ("grain", "nut"):
        AddTask("m", name, synth_root, config, store).run()
    oracle = AddTask("m", "nut", synth_root, config, store, routing="oracle").run()
    assert not oracle.new_version and computed(oracle)["row"] == 2
    empty = ArtifactStore(tmp_path / "empty")
    for name in ("grain", "nut"):
        fresh = AddTask("m", name, synth_root, config, empty, routing="oracle").run()
    assert oracle.as_json()["matrix"] == fresh.as_json()["matrix"]


def test_changing_one_field_recomputes_exactly_the_stages_that_read_it(
    synth_root, tmp_path, config
):
    store = ArtifactStore(tmp_path / "store")
    AddTask("a", "grain", synth_root, config, store).run()
    knowledge = AddTask(
        "b", "grain", synth_root, config.model_copy(update={"knowledge_size": 48}), store
    ).run()
    assert computed(knowledge) == Counter(knowledge=1, calibrate=1, scores=1, evaluate=1, row=1)
    blur = AddTask(
        "c", "grain", synth_root, config.model_copy(update={"blur_sigma": 2.0}), store
    ).run()
    assert computed(blur) == Counter(evaluate=1, row=1)
    epochs = AddTask("d", "grain", synth_root, config.model_copy(update={"epochs": 2}), store).run()
    assert computed(epochs) == Counter(
        prompts=1, knowledge=1, calibrate=1, scores=1, evaluate=1, row=1
    )
    runtime_only = AddTask(
        "a", "grain", synth_root, config.model_copy(update={"workers": 3}), store
    ).run()
    assert computed(runtime_only) == Counter() and not runtime_only.new_version
    # a runtime field, but the stages that batch images through the backbone name it (their
    # products may round differently): the model keeps its version (its keys, knowledge and
    # threshold are not learned again) and is evaluated at the new batch size
    batched = AddTask(
        "a", "grain", synth_root, config.model_copy(update={"inference_batch_size": 3}), store
    ).run()
    assert not batched.new_version
    assert computed(batched) == Counter(features=1, routing=1, scores=1, evaluate=1, row=1)


def test_evaluation_cost_grows_linearly_with_the_stream(synth_root, tmp_path, config):
    """Prompted passes after each step: the new test set plus images the new class takes."""
    store = ArtifactStore(tmp_path / "store")
    result = Replay(synth_root, config, store, tasks=tuple(["grain", "nut", "stripes"])).run()
    scored = [s for s in result.stages if s.stage == "scores" and not s.cached]
    images = sum(len(store.get("scores", s.digest).array("index")) for s in scored)
    test_images = 3 * 10  # 4 good + 6 defective per class in the fixture
    assert images == test_images  # each test image scored once, under the one class it chose
    assert Counter(s.stage for s in result.stages if not s.cached)["features"] == 3


def test_other_data_or_config_for_a_known_class_is_refused(synth_root, tmp_path, config):
    store = ArtifactStore(tmp_path / "store")
    AddTask("m", "grain", synth_root, config, store).run()
    with pytest.raises(ValueError, match="another config.*epochs"):
        AddTask("m", "nut", synth_root, config.model_copy(update={"epochs": 3}), store).run()
    other = tmp_path / "other"
    (other / "grain").mkdir(parents=True)
    os.symlink(synth_root / "grain" / "test", other / "grain" / "test")
    os.symlink(synth_root / "grain" / "ground_truth", other / "grain" / "ground_truth")
    (other / "grain" / "train" / "good").mkdir(parents=True)
    for path in sorted((synth_root / "grain" / "train" / "good").iterdir())[:4]:
        os.symlink(path, other / "grain" / "train" / "good" / path.name)
    with pytest.raises(ValueError, match="already in model 'm'.*other data"):
        AddTask("m", "grain", other, config, store).run()
    assert store.model_versions("m") == [1]


def test_two_add_task_processes_racing_on_one_model_lose_no_class(synth_root, tmp_path):
    """Two `ucad add-task` processes add different classes to one new model at the same time.
    Both learn against the empty model; the one that publishes second finds version 1 taken and
    writes version 2 on the new head (manifest.append_version): no class is lost."""
    store_root = tmp_path / "store"

    def command(task):
        return [
            sys.executable, "-m", "ucad.cli", "add-task", "--model", "m", "--task", task,
            "--data", str(synth_root), "--preset", "smoke", "--store", str(store_root),
            "--no-tracking", "--json", str(tmp_path / f"{task}.json"),
            *[f"--set={k}={v}" for k, v in SMOKE.items()],
        ]  # fmt: skip

    racers = {
        task: subprocess.Popen(command(task), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for task in ("grain", "nut")
    }
    for process in racers.values():
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err.decode()
    results = {task: json.loads((tmp_path / f"{task}.json").read_text()) for task in racers}

    store = ArtifactStore(store_root)
    assert store.model_versions("m") == [1, 2]  # contiguous
    first, second = store.read_model("m", 1), store.read_model("m", 2)
    winner = first["tasks"][0]["name"]
    (loser,) = set(racers) - {winner}
    assert [task["name"] for task in second["tasks"]] == [winner, loser]
    assert second["tasks"][0] == first["tasks"][0]  # version 2 is built on version 1
    assert (results[winner]["version"], results[winner]["tasks"]) == (1, [winner])
    assert (results[loser]["version"], results[loser]["tasks"]) == (2, [winner, loser])
    assert results[winner]["new_version"] and results[loser]["new_version"]
    # the loser reports the history of the model as written: version 1 is the winner's
    for metric, rows in results[loser]["matrix"].items():
        assert len(rows) == 2 and rows[0] == [*results[winner]["matrix"][metric][0], None]

    # It was a race: each process learned against the empty model, so each class was evaluated
    # as the only class (j = 0) of a one-class version; without the race the second class would
    # only ever be evaluated as class 1 of version 2.
    for task in racers:
        alone = [
            digest
            for _, digest in store.artifacts("evaluate")
            if store.get("evaluate", digest).attrs["task"] == task
            and store.get("evaluate", digest).attrs["inputs"]["j"] == 0
        ]
        assert alone, f"{task} was never evaluated alone: the two runs did not race"

    # and a version is never overwritten
    with pytest.raises(ModelVersionConflict):
        store.write_model("m", 2, first)
    assert store.read_model("m", 2) == second


def test_killed_run_leaves_nothing_trusted_and_the_next_run_finishes(synth_root, tmp_path):
    store_root = tmp_path / "store"
    out = tmp_path / "result.json"
    command = [
        sys.executable, "-m", "ucad.cli", "add-task", "--model", "m", "--task", "grain",
        "--data", str(synth_root), "--preset", "smoke", "--store", str(store_root),
        "--set", "epochs=12", "--set", "key_size=32", "--set", "knowledge_size=64",
        "--json", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    for line in process.stderr:  # killed at once: 10 more epochs (seconds) must not finish first
        if "prompts epoch 2/" in line or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    store = ArtifactStore(store_root)
    assert store.artifacts("prompts") == [] and store.models() == [] and not out.exists()
    assert len(store.artifacts("structure")) == 1  # finished before the kill: kept, trusted

    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert finished.returncode == 0, finished.stderr
    result = json.loads(out.read_text())
    assert result["version"] == 1
    cached = {s["stage"] for s in result["stages"] if s["cached"]}
    computed_now = {s["stage"] for s in result["stages"] if not s["cached"]}
    assert {"structure", "keys"} <= cached and {"prompts", "knowledge"} <= computed_now


def test_the_same_files_elsewhere_are_the_same_class(synth_root, tmp_path, config):
    store = ArtifactStore(tmp_path / "store")
    first = AddTask("m", "grain", synth_root, config, store).run()
    moved = tmp_path / "moved"
    shutil.copytree(synth_root / "grain", moved / "grain")
    again = AddTask("m", "grain", moved, config, store).run()
    assert not again.new_version and computed(again) == Counter()
    assert store.model_versions("m") == [first.version]


def _selection_changed(store, result, task):
    """Whether any test image of `task` chose another class under the latest version."""
    routed = [store.get("routing", s.digest) for s in result.stages if s.stage == "routing"]
    among_all = max(routed, key=lambda artifact: len(artifact.attrs["inputs"]["keys"]))
    j = result.tasks.index(task)
    rows = rows_of(among_all.array("offsets"), j)
    return bool((among_all.array("selected")[rows] != j).any())


def test_an_earlier_class_whose_data_is_gone_is_evaluated_from_the_store_or_left_out(
    synth_root, tmp_path, config, caplog
):
    store = ArtifactStore(tmp_path / "store")
    data = tmp_path / "data"
    for name in ("grain", "nut"):
        shutil.copytree(synth_root / name, data / name)
    AddTask("m", "grain", data, config, store).run()
    shutil.rmtree(data / "grain")  # no replay: the first class's images are gone
    second = AddTask("m", "nut", data, config, store).run()
    matrix = second.as_json()["matrix"]["image_auroc"]
    assert second.version == 2
    assert matrix[0][0] is not None and matrix[1][1] is not None
    # Where no grain image changes its class, version 2's figures are made of the same stored
    # artifacts as version 1's: reported without the images. Otherwise grain needs them: null.
    changed = _selection_changed(store, second, "grain")
    assert matrix[1][0] == (None if changed else matrix[0][0])
    # a row is written only when every class of its version was evaluated
    assert len(store.artifacts("row")) == (1 if changed else 2)

    # Without its stored rows, scores and figures grain needs its images at every version: left
    # out, with a warning, and no row is written.
    for stage in ("row", "scores", "evaluate"):
        for _, digest in store.artifacts(stage):
            if stage == "row" or store.get(stage, digest).attrs["task"] == "grain":
                store.remove(stage, digest)
    again = AddTask("m", "nut", data, config, store).run()
    assert [row[0] for row in again.as_json()["matrix"]["image_auroc"]] == [None, None]
    assert store.artifacts("row") == []
    assert "class grain not evaluated" in caplog.text and "unknown class 'grain'" in caplog.text


def test_changed_files_are_never_evaluated_under_the_old_fingerprint(synth_root, tmp_path, config):
    store = ArtifactStore(tmp_path / "store")
    data = tmp_path / "data"
    for name in ("grain", "nut"):
        shutil.copytree(synth_root / name, data / name)
    AddTask("m", "grain", data, config, store).run()
    good = sorted((data / "grain" / "test" / "good").iterdir())
    shutil.copy(good[1], good[0])  # same names, other content
    second = AddTask("m", "nut", data, config, store).run()
    matrix = second.as_json()["matrix"]["image_auroc"]
    # nothing is computed from the changed files: grain's figure under version 2 is the stored
    # one where its images' choices are unchanged, else left out
    changed = _selection_changed(store, second, "grain")
    assert matrix[1][0] == (None if changed else matrix[0][0])
    assert len(store.artifacts("evaluate")) == 2  # v1: grain; v2: nut only


def test_a_runtime_keeps_only_the_latest_image_sets(synth_root, tmp_path, config, monkeypatch):
    """A long-lived worker serves many classes: it keeps the latest image sets, not all."""
    from ucad.data.datasets import read_task
    from ucad.data.source import TaskSource

    loads = []
    real = pipeline.load_images
    monkeypatch.setattr(pipeline, "KEPT_IMAGE_SETS", 2)
    monkeypatch.setattr(pipeline, "load_images", lambda *a: loads.append(a[0]) or real(*a))
    rt = Runtime(config, ArtifactStore(tmp_path / "store"))
    grain, nut, stripes = (
        TaskSource.from_data(synth_root, "mvtec", read_task(synth_root, name, "mvtec"))
        for name in ("grain", "nut", "stripes")
    )
    first = rt.train_images(grain)
    assert rt.train_images(grain) is first and len(loads) == 1  # loaded once while kept
    rt.train_images(nut)
    rt.train_images(stripes)  # grain is now the oldest of three: let go
    assert len(loads) == 3
    again = rt.train_images(grain)
    assert len(loads) == 4 and again is not first
    np.testing.assert_array_equal(again, first)


def test_a_raced_artifact_counts_as_computed_once():
    """Two workers asked for one digest: one computed it, the other found it (raced). The run
    computed it once, whichever record comes first; other artifacts stay once, in order."""
    computed_once = StageRecord("keys", "grain", "a" * 32, cached=False, seconds=2.0)
    raced = StageRecord("keys", "grain", "a" * 32, cached=True, seconds=0.0, raced=True)
    other = StageRecord("features", "grain", "b" * 32, cached=True, seconds=0.0)
    assert unique_records([raced, other, computed_once]) == [computed_once, other]
    assert unique_records([computed_once, other, raced]) == [computed_once, other]
    assert unique_records([other, raced, other]) == [other, raced]
