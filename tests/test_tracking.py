"""MLflow tracking against a real `mlflow server` on loopback, checked through the REST client.

One smoke benchmark is logged to a server this module starts (SQLite backend, proxied local
artifacts) and stops; the other tests reuse its result. A closed port stands in for a server
that is down.
"""

import csv
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from loopback import free_port
from mlflow import MlflowClient

import ucad
from ucad.backbone import create_backbone
from ucad.cli import main
from ucad.config import load_config
from ucad.continual import Replay
from ucad.gallery import gallery
from ucad.manifest import load_version
from ucad.store import ArtifactStore
from ucad.tracking import TrackingError, log_result, resolve_target, run_name

SMOKE = {"epochs": 1, "key_size": 32, "knowledge_size": 64}
CLASSES = ["grain", "nut"]
FLOW_RUN_ID = "3f6c2a1e-0000-4000-8000-000000000001"

pytestmark = pytest.mark.slow


class Server:
    """`mlflow server` in its own process group, so stopping it stops its workers too."""

    def __init__(self, root: Path) -> None:
        self.uri = f"http://127.0.0.1:{free_port()}"
        self.artifacts = root / "artifacts"
        self.log = root / "server.log"
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(self.artifacts),
            "--host", "127.0.0.1", "--port", self.uri.rsplit(":", 1)[1], "--workers", "1",
        ]  # fmt: skip
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait(self, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited early:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self.uri
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"mlflow server not up after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module")
def data_root(synth_root, tmp_path_factory) -> Path:
    """Two classes copied, so a test may delete one's test images."""
    root = tmp_path_factory.mktemp("tracked-data")
    for name in CLASSES:
        shutil.copytree(synth_root / name, root / name)
    return root


@pytest.fixture(scope="module")
def tracked(data_root, tmp_path_factory):
    """A smoke benchmark logged to a fresh server: (server, client, store, result, run id)."""
    server = Server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        # the stream runs while the server starts
        store = ArtifactStore(tmp_path_factory.mktemp("tracked-store"))
        result = Replay(data_root, load_config("smoke", overrides=SMOKE), store).run()
        uri = server.wait()
        run_id = log_result(
            result,
            store,
            "benchmark",
            tracking_uri=uri,
            strict=True,
            flow_run_id=FLOW_RUN_ID,
            gallery=gallery(store, load_version(store, result.model)),
        )
        yield server, MlflowClient(uri), store, result, run_id
    finally:
        server.stop()


def test_parent_run_has_config_params_and_provenance_tags(tracked, data_root):
    _, client, store, result, run_id = tracked
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert re.fullmatch(
        r"smoke epochs=1 key_size=32 knowledge_size=64 · grain,nut · [0-9a-f]{6}",
        run.info.run_name,
    )
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == f"ucad benchmark {data_root.name}: grain,nut"
    params = run.data.params
    for field, value in result.config.model_dump(mode="json").items():
        assert params[field] == (value if isinstance(value, str) else json.dumps(value))
    assert params["routing"] == "agnostic" and params["epochs"] == "1"

    tags = run.data.tags
    assert tags["ucad.kind"] == "benchmark" and tags["ucad.model"] == result.model
    assert tags["ucad.model_version"] == "2" and tags["ucad.classes"] == "grain, nut"
    manifest = store.read_model(result.model, 2)
    digests = json.loads(tags["ucad.digests"])
    for entry in manifest["tasks"]:
        assert digests[entry["name"]]["prompts"] == entry["prompts"]
        assert digests[entry["name"]]["knowledge"] == entry["knowledge"]
    assert tags["versions.torch"] == torch.__version__
    assert tags["versions.ucad"] == ucad.__version__ and "versions.mlflow" in tags
    assert tags["prefect.flow_run_id"] == FLOW_RUN_ID
    if (Path(ucad.__file__).resolve().parent.parent / ".git").exists():
        assert len(tags["mlflow.source.git.commit"]) == 40


def test_nested_run_per_class_learned(tracked):
    _, client, store, result, run_id = tracked
    experiment = client.get_run(run_id).info.experiment_id
    children = client.search_runs(
        [experiment], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )
    by_class = {run.data.tags["ucad.class"]: run for run in children}
    assert sorted(by_class) == CLASSES
    second = by_class["nut"]
    assert second.info.run_name == "02 nut" and second.data.tags["ucad.model_version"] == "2"
    entry = store.read_model(result.model, 2)["tasks"][1]
    assert second.data.tags["ucad.digest.prompts"] == entry["prompts"]
    # its row of the results matrix, at its step
    matrix = result.results.matrix("image_auroc")
    grain_history = client.get_metric_history(second.info.run_id, "image_auroc/grain")
    assert [(m.step, m.value) for m in grain_history] == [(2, pytest.approx(matrix[1][0]))]
    metrics = second.data.metrics
    assert "usage/seconds/prompts" in metrics and "usage/cached/prompts" in metrics
    assert "forgetting/image_auroc" not in by_class["grain"].data.metrics  # one class: none


def test_metric_histories_have_one_step_per_class_learned(tracked):
    _, client, _, result, run_id = tracked
    for metric in ("image_auroc", "pixel_auroc", "routing_accuracy"):
        matrix = result.results.matrix(metric)
        grain = client.get_metric_history(run_id, f"{metric}/grain")
        assert [m.step for m in grain] == [1, 2]
        assert [m.value for m in grain] == pytest.approx([matrix[0][0], matrix[1][0]])
        nut = client.get_metric_history(run_id, f"{metric}/nut")
        assert [(m.step, m.value) for m in nut] == [(2, pytest.approx(matrix[1][1]))]
        mean = client.get_metric_history(run_id, f"mean/{metric}")
        assert [m.step for m in mean] == [1, 2]
        assert mean[-1].value == pytest.approx(result.results.final()[metric])
        forgetting = client.get_metric_history(run_id, f"forgetting/{metric}")
        assert [(m.step, m.value) for m in forgetting] == [
            (2, pytest.approx(result.results.forgetting()[metric]))
        ]


def test_stage_timings_counts_and_memory(tracked):
    _, client, _, result, run_id = tracked
    metrics = client.get_run(run_id).data.metrics
    assert metrics["usage/computed/prompts"] == 2 and metrics["usage/cached/prompts"] == 0
    assert metrics["usage/computed/total"] + metrics["usage/cached/total"] == len(result.stages)
    assert metrics["usage/seconds/prompts"] == pytest.approx(
        sum(s.seconds for s in result.stages if s.stage == "prompts")
    )
    assert metrics["usage/seconds/prompts"] > 0 and metrics["usage/memory/peak_rss_mb"] > 100


def test_figures_sort_before_what_the_run_cost(tracked):
    """The UI's chart view sorts its sections (a key's prefix) by name: every figure's section
    (aupro/..., mean, forgetting, routing_accuracy/...) comes before the cost's (usage/...)."""
    _, client, _, _, run_id = tracked
    sections = {key.rsplit("/", 1)[0] for key in client.get_run(run_id).data.metrics}
    cost = {section for section in sections if section.startswith("usage/")}
    assert cost == {"usage/seconds", "usage/computed", "usage/cached", "usage/memory"}
    assert max(sections - cost) < min(cost)


def test_run_names_differ_where_runs_differ(tracked):
    _, _, store, result, _ = tracked
    manifest = load_version(store, result.model)
    name = run_name(result, manifest, "benchmark")
    seed = replace(result, config=result.config.model_copy(update={"seed": 1}))
    assert run_name(seed, manifest, "benchmark").startswith(
        "smoke seed=1 epochs=1 key_size=32 knowledge_size=64 · grain,nut · "
    )
    reordered = replace(result, tasks=["nut", "grain"])
    oracle = replace(result, routing="oracle")
    names = {name, run_name(seed, manifest, "benchmark"), run_name(oracle, manifest, "benchmark")}
    assert len(names) == 3 and " · nut,grain · " in run_name(reordered, manifest, "benchmark")
    # what only changes speed changes no name
    faster = replace(result, config=result.config.model_copy(update={"workers": 1}))
    assert run_name(faster, manifest, "benchmark") == name
    assert run_name(result, manifest, "add-task").startswith(f"{result.model} v2 +nut · smoke ")


def test_artifacts_tables_figures_gallery_config_and_json(tracked, tmp_path):
    server, client, _, result, run_id = tracked
    listed = {f.path for f in client.list_artifacts(run_id)}
    assert {"config.yaml", "result.json", "results", "gallery"} <= listed
    results = {f.path for f in client.list_artifacts(run_id, "results")}
    for metric in result.results.metrics:
        assert {f"results/{metric}.csv", f"results/{metric}.png"} <= results
    assert "results/curves.png" in results
    gallery_files = client.list_artifacts(run_id, "gallery")
    assert sorted(f.path for f in gallery_files) == ["gallery/grain.png", "gallery/nut.png"]
    assert all(0 < f.file_size < 1_000_000 for f in gallery_files)

    table = client.download_artifacts(run_id, "results/image_auroc.csv", str(tmp_path))
    rows = list(csv.reader(open(table)))
    matrix = result.results.matrix("image_auroc")
    assert rows[0] == ["after learning", "grain", "nut"]
    assert rows[1][0] == "grain" and float(rows[1][1]) == pytest.approx(matrix[0][0])
    assert rows[1][2] == "" and float(rows[2][2]) == pytest.approx(matrix[1][1])
    logged = json.loads(
        Path(client.download_artifacts(run_id, "result.json", str(tmp_path))).read_text()
    )
    assert logged["matrix"] == result.as_json()["matrix"]
    # uploaded through the server, which keeps them under its artifacts destination
    assert list(server.artifacts.rglob("image_auroc.png"))


def test_by_default_logs_to_a_database_in_the_store(tracked, data_root, monkeypatch, caplog):
    """Also: a class whose test data is gone is left out of the gallery, with a warning."""
    _, _, store, result, _ = tracked
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.rmtree(data_root / "nut" / "test")
    with caplog.at_level(logging.WARNING, logger="ucad.gallery"):
        figures = gallery(store, load_version(store, result.model))
    run_id = log_result(result, store, "benchmark", strict=True, gallery=figures)
    assert "gallery: skipping class nut" in caplog.text
    root = Path(store.root).resolve()
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert client.get_run(run_id).data.tags["ucad.model"] == result.model
    assert [f.path for f in client.list_artifacts(run_id, "gallery")] == ["gallery/grain.png"]
    assert (root / "mlflow-artifacts" / run_id / "artifacts" / "results" / "curves.png").is_file()


def test_default_target_is_a_database_in_a_local_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = ArtifactStore(tmp_path / "store")
    config = load_config("smoke")
    target = resolve_target(store, config)
    assert target.uri == f"sqlite:///{(tmp_path / 'store').resolve() / 'mlflow.db'}"
    assert target.artifact_location == (tmp_path / "store" / "mlflow-artifacts").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_target(store, config).uri == "http://env:5000"
    configured = config.model_copy(update={"tracking_uri": "http://config:5000"})
    assert resolve_target(store, configured).uri == "http://config:5000"
    assert resolve_target(store, configured, "http://arg:5000").uri == "http://arg:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_target(ArtifactStore("memory://ucad-tracking-test"), config) is None


def test_a_down_server_is_a_warning_or_with_strict_an_error(data_root, tmp_path, caplog, capsys):
    closed = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "result.json"
    command = [
        "add-task", "--model", "m", "--task", "grain", "--data", str(data_root),
        "--preset", "smoke", "--store", str(tmp_path / "store"), "--json", str(out),
        "--set", f"tracking_uri={closed}",
    ] + [f"--set={k}={v}" for k, v in SMOKE.items()]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="ucad.tracking"):
        assert main(command) == 0
    assert f"could not log the run to MLflow at {closed}" in caplog.text
    assert json.loads(out.read_text())["version"] == 1  # the run itself is complete

    started = time.monotonic()  # the same request again: nothing to compute, only tracking
    assert main(command + ["--strict-tracking"]) == 1
    # MLflow's own retry defaults would keep a down server for minutes
    assert time.monotonic() - started < 60
    assert f"ucad: error: could not log the run to MLflow at {closed}" in capsys.readouterr().err


def test_a_remote_store_needs_a_tracking_uri(tracked, monkeypatch, caplog):
    _, _, _, result, _ = tracked
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    remote = ArtifactStore("memory://ucad-tracking-remote")
    with caplog.at_level(logging.WARNING, logger="ucad.tracking"):
        assert log_result(result, remote, "benchmark") is None
    assert "no tracking URI is set" in caplog.text
    with pytest.raises(TrackingError, match="no tracking URI is set"):
        log_result(result, remote, "benchmark", strict=True)


def test_a_request_that_changes_nothing_logs_no_run_and_loads_no_backbone(
    tracked, data_root, tmp_path, monkeypatch
):
    """A new model on the benchmark's artifacts: everything is found in the store, the new
    version is logged (its gallery loads the backbone); the same request again is a no-op."""
    _, _, store, _, _ = tracked
    database = tmp_path / "mlflow.db"
    command = [
        "add-task", "--model", "no-op", "--task", "grain", "--data", str(data_root),
        "--preset", "smoke", "--store", store.root, "--set", f"tracking_uri=sqlite:///{database}",
    ] + [f"--set={k}={v}" for k, v in SMOKE.items()]  # fmt: skip
    loads = []

    def counted(*args, **kwargs):
        loads.append(args)
        return create_backbone(*args, **kwargs)

    for module in ("ucad.backbone", "ucad.pipeline", "ucad.model"):
        monkeypatch.setattr(f"{module}.create_backbone", counted)
    assert main(command) == 0
    assert loads and len(_runs(database)) == 2  # the parent run and the class's nested run

    loads.clear()
    assert main(command) == 0  # the same request: nothing computed, no version written
    assert loads == [] and len(_runs(database)) == 2
    assert store.model_versions("no-op") == [1]


def _runs(database: Path) -> list:
    client = MlflowClient(f"sqlite:///{database}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])
