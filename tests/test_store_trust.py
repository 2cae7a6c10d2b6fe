"""A store you can trust: damage inside a real store is found, named and repaired, never read.

Each test damages a copy of one store (two classes learned through the command) in one way, then
checks what a user meets: a non-zero exit, a message naming the artifact or the file, no new
model version, `ucad store verify` listing the damage, and `--repair` plus a re-run restoring
figures identical to the undamaged store's.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ucad.cli import main
from ucad.store import ArtifactStore

TINY = {"epochs": 1, "key_size": 16, "knowledge_size": 32, "image_size": 64, "workers": 1}
SETTINGS = ["--preset", "smoke", *(f"--set={k}={v}" for k, v in TINY.items())]


def add_task(store: Path, data: Path, task: str, *extra: str) -> list[str]:
    return [
        "-q", "add-task", "--model", "m", "--task", task, "--data", str(data),
        "--store", str(store), "--no-tracking", *SETTINGS, *extra,
    ]  # fmt: skip


def predict(store: Path, image: Path, *extra: str) -> list[str]:
    return ["-q", "predict", "--model", "m", str(image), "--store", str(store), *extra]


@pytest.fixture(scope="module")
def learned(synth_root, tmp_path_factory) -> dict:
    """A store with model m (grain, then nut) and the figures of its last add-task."""
    root = tmp_path_factory.mktemp("trust")
    store = root / "store"
    report = root / "report.json"
    assert main(add_task(store, synth_root, "grain")) == 0
    assert main(add_task(store, synth_root, "nut", "--json", str(report))) == 0
    return {"store": store, "data": synth_root, "report": json.loads(report.read_text())}


@pytest.fixture
def store(learned, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(learned["store"], copy)
    return copy


def artifact_dir(store: Path, stage: str, task: str = "grain") -> Path:
    """The folder of `task`'s artifact of `stage` named by the model's latest version."""
    manifest = json.loads((store / "models" / "m" / "v0002.json").read_text())
    if stage in ("keys", "prompts", "knowledge", "calibrate", "structure"):
        entry = next(t for t in manifest["tasks"] if t["name"] == task)
        return store / "stages" / stage / f"{entry[stage]}.zarr"
    for folder in sorted((store / "stages" / stage).iterdir()):
        if json.loads((folder / "zarr.json").read_text())["attributes"]["task"] == task:
            return folder
    raise AssertionError(f"no {stage} artifact of {task}")


def chunk(folder: Path) -> Path:
    """One data chunk of the artifact's first array."""
    return next(p for p in sorted(folder.rglob("*")) if p.is_file() and "/c/" in str(p))


def delete(path: Path) -> None:
    path.unlink()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def run(capsys, args: list[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def versions(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "models" / "m").glob("v*.json"))


def test_an_undamaged_store_verifies(capsys, learned):
    code, out, _ = run(capsys, ["store", "verify", "--store", str(learned["store"])])
    assert code == 0 and "verified" in out


CHUNK_DAMAGE = [
    (stage, damage)
    for stage in ("knowledge", "keys", "prompts", "features", "scores")
    for damage in (delete, truncate, flip)
]


@pytest.mark.parametrize(
    "stage,damage", CHUNK_DAMAGE, ids=[f"{s}-{d.__name__}" for s, d in CHUNK_DAMAGE]
)
def test_a_damaged_chunk_is_refused_listed_and_repaired(capsys, learned, store, stage, damage):
    folder = artifact_dir(store, stage)
    digest = folder.name.removesuffix(".zarr")
    damage(chunk(folder))
    image = sorted((learned["data"] / "grain" / "test" / "good").iterdir())[0]

    if stage in ("keys", "prompts", "knowledge"):  # what predict reads
        code, _, err = run(capsys, predict(store, image))
        assert code == 1 and digest in err and "ucad store verify --repair" in err, err
    # learning a new class on a damaged store: refused, and no version is written. Scores are
    # not read by the next run: grain's evaluation under the new version is found by name once
    # its images are routed (where they choose as before), so `store verify` finds the damage.
    if stage != "scores":
        code, _, err = run(capsys, add_task(store, learned["data"], "stripes"))
        assert code == 1 and digest in err, err
        assert versions(store) == ["v0001.json", "v0002.json"]
    code, out, _ = run(capsys, ["store", "verify", "--store", str(store)])
    assert code == 1 and digest in out

    # repair moves it aside; the next run computes it again, identically
    run(capsys, ["store", "verify", "--store", str(store), "--repair"])
    assert not folder.exists()
    report = store.parent / "again.json"
    code, _, err = run(capsys, add_task(store, learned["data"], "nut", "--json", str(report)))
    assert code == 0, err
    assert json.loads(report.read_text())["matrix"] == learned["report"]["matrix"]
    assert run(capsys, ["store", "verify", "--store", str(store)])[0] == 0


def test_an_edited_attribute_is_found(capsys, learned, store):
    """Metrics live in attributes: changing one by hand is damage, not a new figure. (The run
    reads version 1's figures from its row of results, the row of grain.)"""
    folder = artifact_dir(store, "row")
    meta = folder / "zarr.json"
    data = json.loads(meta.read_text())
    data["attributes"]["metrics"][0]["image_auroc"] = 0.123
    meta.write_text(json.dumps(data))
    code, _, err = run(capsys, add_task(store, learned["data"], "nut"))
    assert code == 1 and "attributes do not match" in err and folder.name[:32] in err


MANIFEST_DAMAGE = {
    "no tasks": (lambda m: m.pop("tasks"), "tasks: Field required"),
    "missing digest": (lambda m: m["tasks"][0].update(knowledge="0" * 32), "0" * 32),
    "path in a digest": (
        lambda m: m["tasks"][0].update(knowledge="../../../etc/passwd"),
        "tasks.0.knowledge: String should match pattern",
    ),
    "threshold not a number": (
        lambda m: m["tasks"][0].update(threshold="abc"),
        "tasks.0.threshold: Input should be a valid number",
    ),
    "wrong version": (lambda m: m.update(version=7), "says version 7, its file name says 2"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_DAMAGE))
def test_a_broken_manifest_is_refused_naming_file_and_field(capsys, learned, store, case):
    change, message = MANIFEST_DAMAGE[case]
    path = store / "models" / "m" / "v0002.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    image = sorted((learned["data"] / "nut" / "test" / "good").iterdir())[0]

    for args in (predict(store, image), add_task(store, learned["data"], "stripes")):
        code, _, err = run(capsys, args)
        assert code == 1, err
        assert message in err and ("v0002.json" in err or "0" * 32 in err), err
        assert "Traceback" not in err
    assert versions(store) == ["v0001.json", "v0002.json"]  # nothing built on it
    code, out, _ = run(capsys, ["store", "verify", "--store", str(store)])
    assert code == 1 and message in out
    code, out, _ = run(capsys, ["models", "--store", str(store)])
    assert code == 0 and ("v2  DAMAGED" in out or case == "missing digest")


def test_json_output_is_never_nan(capsys, learned, tmp_path):
    out = tmp_path / "predict.json"
    image = sorted((learned["data"] / "grain" / "test").rglob("*.png"))[0]
    assert main(predict(learned["store"], image, "--json", str(out))) == 0
    text = out.read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))


WRITER = """
import sys, time
import numpy as np
from ucad.store import ArtifactStore
store = ArtifactStore(sys.argv[1])
store._publish = lambda tmp, final: (print("written", flush=True), time.sleep(600))
store.put("keys", "a" * 32, {"keys": np.ones((4, 4), np.float32)})
"""


def start_writer(store: Path) -> subprocess.Popen:
    """A process stopped between its temporary write and its publish."""
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(store)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "written"
    return process


def test_prune_removes_what_a_killed_run_left_and_keeps_a_live_writers(capsys, tmp_path):
    store = tmp_path / "store"
    killed = start_writer(store)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    live = start_writer(store)
    try:
        leftovers = sorted((store / ".tmp").iterdir())
        assert len(leftovers) == 2
        code, out, _ = run(capsys, ["store", "prune", "--store", str(store)])
        assert code == 0 and "removed 1 item" in out
        (kept,) = (store / ".tmp").iterdir()
        assert f"-{live.pid}-" in kept.name and kept.exists()
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    assert ArtifactStore(store).artifacts("keys") == []  # nothing half-written was published
    run(capsys, ["store", "prune", "--store", str(store)])
    assert list((store / ".tmp").iterdir()) == []


def test_models_rm_takes_the_store_before_or_after_rm(capsys, learned, store, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    code, _, err = run(capsys, ["models", "--store", str(other), "rm", "m"])
    assert code == 1 and "no model 'm'" in err and str(other) in err and versions(store)
    code, _, _ = run(capsys, ["models", "--store", str(store), "rm", "m"])
    assert code == 0 and not versions(store)


def test_prune_unreferenced_keeps_what_a_model_needs(capsys, learned, store):
    code, out, _ = run(capsys, ["models", "rm", "m", "--store", str(store)])
    assert code == 0 and not versions(store)
    assert not (store / "models" / "m").exists()  # no empty folder left behind
    before = ArtifactStore(store).artifacts()
    assert before
    code, out, _ = run(capsys, ["store", "prune", "--unreferenced", "--store", str(store)])
    assert code == 0 and ArtifactStore(store).artifacts() == []


def test_prune_unreferenced_keeps_everything_a_live_model_reads(capsys, learned, store):
    before = ArtifactStore(store).artifacts()
    code, out, _ = run(capsys, ["store", "prune", "--unreferenced", "--store", str(store)])
    assert code == 0 and ArtifactStore(store).artifacts() == before


def test_a_rerun_after_a_kill_between_version_and_tracking_is_logged_as_that_run(
    capsys, learned, store, tmp_path
):
    """The version exists but was never recorded: the re-run records it as the run that
    learned its class, with the class's nested run."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [a for a in add_task(store, learned["data"], "nut") if a != "--no-tracking"]
    args += [f"--set=tracking_uri={uri}"]
    started = time.time()
    assert main(args) == 0
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ucad model m")
    runs = client.search_runs([experiment.experiment_id])
    names = sorted(run.info.run_name for run in runs)
    assert names[0] == "02 nut" and names[1].startswith("m v2 +nut "), names
    assert all(run.info.start_time >= started * 1000 - 1000 for run in runs)
    # an identical request after that changes nothing and records nothing
    assert main(args) == 0
    assert len(client.search_runs([experiment.experiment_id])) == 2
