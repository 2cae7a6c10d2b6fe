"""End to end through Prefect, as a user runs it: a real server and a process worker on
loopback, deployments from prefect.yaml, `prefect deployment run ucad/add-task` twice and a
3-class run of the nightly benchmark.

Everything lives under tmp paths (Prefect home and database, the artifact stores); every process
the module starts is stopped, with whatever it started, before the module ends.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID

import pytest
from conftest import STREAM_SMOKE
from loopback import free_port
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.settings import PREFECT_API_URL, temporary_settings

from ucad.manifest import CLASS_STAGES
from ucad.store import ArtifactStore

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]
SMOKE = {"epochs": 1, "key_size": 32, "knowledge_size": 64, "max_workers": 2}


def _children(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), including those in sessions of their own."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        below = [child for child, parent in parents.items() if parent in frontier]
        found += below
        frontier = below
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _stop(process: subprocess.Popen) -> list[int]:
    """SIGTERM the process and everything it started, SIGKILL what is left; returns the pids.

    The grace period is short: in the full suite the Prefect worker has stayed alive for over
    20 s after SIGTERM (0.6 s when this module runs alone), and what the module checks is only
    that nothing is left running."""
    pids = [process.pid, *_children(process.pid)]
    for pid in pids:
        try:
            os.killpg(os.getpgid(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 2
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in filter(_alive, pids):
        os.kill(pid, signal.SIGKILL)
    process.wait(timeout=10)
    return pids


class Services:
    """A Prefect server, and later a worker, started for one test; `stop` ends both."""

    def __init__(self, tmp: Path) -> None:
        port = free_port()
        self.api = f"http://127.0.0.1:{port}/api"
        self.store = tmp / "store"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(tmp / "prefect"),
            "PREFECT_API_URL": self.api,
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp / 'prefect.db'}",
            "PREFECT_LOCAL_STORAGE_PATH": str(tmp / "prefect" / "storage"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            # the scheduler looks at new deployments at once: a nightly that would queue runs
            # on deploy does so during the test
            "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
            "UCAD_STORE": str(self.store),
        }
        self.env.pop("MLFLOW_TRACKING_URI", None)  # runs are logged to <store>/mlflow.db
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.processes: dict[str, subprocess.Popen] = {}
        self.deployed = 0.0  # time.monotonic() of `prefect deploy --all`
        self.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port),
                   "--no-ui")  # fmt: skip

    def start(self, name: str, *args: str) -> None:
        with (self.logs / f"{name}.log").open("w") as log:
            self.processes[name] = subprocess.Popen(
                [*PREFECT, *args],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped as a whole
            )

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()[-6000:]

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.processes["server"].poll() is None, self.log("server")
            try:
                with urllib.request.urlopen(f"{self.api}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"server not healthy after {timeout} s:\n{self.log('server')}")

    def cli(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(
            [*PREFECT, *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        output = done.stdout + done.stderr
        worker = self.log("worker") if "worker" in self.processes else ""
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{output}\n{worker}"
        return output

    @contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        with temporary_settings({PREFECT_API_URL: self.api}), get_client(sync_client=True) as c:
            yield c

    def stop(self) -> list[int]:
        pids = []
        for name in ("worker", "server"):
            if name in self.processes:
                pids += _stop(self.processes.pop(name))
        return pids


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> Iterator[Services]:
    """A server with the deployments of prefect.yaml and a worker, for the module."""
    running = Services(tmp_path_factory.mktemp("prefect-e2e"))
    try:
        running.wait_healthy()
        running.cli("work-pool", "create", "ucad-pool", "--type", "process")
        running.cli("--no-prompt", "deploy", "--all")
        running.deployed = time.monotonic()
        running.start("worker", "worker", "start", "--pool", "ucad-pool")
        yield running
    finally:
        pids = running.stop()
        assert not [pid for pid in pids if _alive(pid)], "processes left running"


def _run(services: Services, deployment: str, **parameters: str) -> UUID:
    arguments = [arg for name, value in parameters.items() for arg in ("-p", f"{name}={value}")]
    output = services.cli(
        "deployment", "run", deployment, *arguments, "--watch", "--watch-timeout", "600",
        timeout=620,
    )  # fmt: skip
    return UUID(re.search(r"UUID: ([0-9a-f-]{36})", output).group(1))


def _run_add_task(services: Services, data: Path) -> UUID:
    return _run(
        services, "ucad/add-task", task="grain", data=str(data), model="line-1", preset="smoke",
        overrides=json.dumps(SMOKE),
    )  # fmt: skip


def _task_states(services: Services, flow_run_id: UUID, expected: int) -> dict[str, str]:
    """Task run name -> state name, once the server has recorded finished task runs for
    `expected` units of work (events lag; the one `found-in-store-<n>` run stands for n units);
    a name seen twice would be a stage run twice, which fails the test."""
    with services.client() as client:
        assert client.read_flow_run(flow_run_id).state.is_completed()
        deadline = time.monotonic() + 30
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            states = {run.name: run.state_name for run in runs}
            assert len(states) == len(runs), sorted(run.name for run in runs)
            finished = all(state in ("Completed", "Cached") for state in states.values())
            if (_units(states) >= expected and finished) or time.monotonic() > deadline:
                return states
            time.sleep(0.5)


FOUND = "found-in-store-"


def _units(states: dict[str, str]) -> int:
    return sum(int(n.rsplit("-", 1)[1]) if n.startswith(FOUND) else 1 for n in states)


def _ran_and_found(states: dict[str, str]) -> tuple[set[str], int]:
    """The stages run as task runs (structure-map chunks left out), and how many units of work
    the flow run found in the store instead (its one Cached task run). A task run is Cached too
    where a concurrent one computed everything it needed meanwhile (on Dask workers)."""
    found = [n for n in states if n.startswith(FOUND)]
    assert len(found) <= 1 and all(states[n] == "Cached" for n in found)
    ran = {n for n in states if not n.startswith(("structure-maps-", FOUND))}
    return ran, _units({n: states[n] for n in found})


def _flow_run(services: Services, flow_run_id: UUID) -> tuple[str, dict[str, object]]:
    """The flow run's name and its artifacts, key -> (type, data)."""
    with services.client() as client:
        name = client.read_flow_run(flow_run_id).name
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return name, {artifact.key: (artifact.type, artifact.data) for artifact in artifacts}


def _mlflow_runs(store: Path) -> set[str]:
    """The Prefect flow run ids of the parent runs logged to the store's MLflow database."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.`prefect.flow_run_id` != ''")
    return {run.data.tags["prefect.flow_run_id"] for run in runs}


def test_add_task_deployment_through_server_and_worker(services, synth_root):
    first_id = _run_add_task(services, synth_root)
    stage_runs = {f"{stage}-grain" for stage in CLASS_STAGES} | {"evaluate-grain-v1", "row-v1"}
    first = _task_states(services, first_id, len(stage_runs) + SMOKE["max_workers"])
    store = ArtifactStore(services.store)
    manifest = store.read_model("line-1")
    assert manifest["version"] == 1 and [t["name"] for t in manifest["tasks"]] == ["grain"]
    (evaluation,) = store.artifacts("evaluate")
    assert 0.0 <= store.get(*evaluation).attrs["metrics"]["image_auroc"] <= 1.0
    chunks = {name for name in first if name.startswith("structure-maps-grain-")}
    assert set(first) - chunks == stage_runs and len(chunks) == SMOKE["max_workers"]
    assert set(first.values()) == {"Completed"}
    name, artifacts = _flow_run(services, first_id)
    assert name == "line-1 +grain"
    assert artifacts["model-line-1-results"][0] == "table"
    kind, summary = artifacts["model-line-1-summary"]
    assert kind == "markdown" and "| image_auroc |" in summary

    # A new flow run, in a new process: the class is in the head version, so nothing is learned
    # again, and version 1's row of results is in the store: nothing runs, and what was found
    # shows as one Cached task run.
    second_id = _run_add_task(services, synth_root)
    assert _task_states(services, second_id, 1) == {"found-in-store-1": "Cached"}
    assert store.model_versions("line-1") == [1]
    # the second changed nothing: no MLflow run for it
    assert _mlflow_runs(services.store) == {str(first_id)}


# What each version of the 3-class stream must compute: its new class's evaluation and its row.
NEW_WORK = {"evaluate-grain-v1", "evaluate-nut-v2", "evaluate-stripes-v3"}
NEW_WORK |= {"row-v1", "row-v2", "row-v3"}


def test_benchmark_runs_each_unit_of_work_once(services, synth_root, tmp_path):
    """The nightly deployment on a 3-class stream: each class's stages and each new version's
    evaluations once (no replays of earlier versions'), results as artifacts. A version's
    evaluation of an earlier class may be found in the store, once another evaluation of that
    version has computed the version's routing and none of the class's images changed class."""
    store = tmp_path / "benchmark-store"
    flow_run_id = _run(
        services, "ucad-benchmark/nightly", data=str(synth_root), preset="smoke", synth="false",
        store=str(store), model="stream", overrides=json.dumps(SMOKE),
    )  # fmt: skip
    classes = ["grain", "nut", "stripes"]
    learned = {f"{stage}-{name}" for stage in CLASS_STAGES for name in classes}
    evaluations = {f"evaluate-{classes[j]}-v{v}" for v in (1, 2, 3) for j in range(v)}
    evaluations |= {f"row-v{v}" for v in (1, 2, 3)}
    chunks = len(classes) * SMOKE["max_workers"]
    states = _task_states(services, flow_run_id, len(learned) + len(evaluations) + chunks)
    ran, found = _ran_and_found(states)
    assert len(evaluations) == 9 and len(ran) + found == len(learned) + len(evaluations)
    assert learned | NEW_WORK <= ran <= learned | evaluations
    assert {states[n] for n in learned | NEW_WORK} == {"Completed"}  # new work: computed
    assert len([n for n in states if n.startswith("structure-maps-")]) == chunks

    name, artifacts = _flow_run(services, flow_run_id)
    assert name == f"benchmark {synth_root.name} 3 classes (smoke)"
    kind, table = artifacts[f"benchmark-{synth_root.name.lower()}-results"]
    rows = json.loads(table)
    assert kind == "table" and len(rows) == 7 * len(classes)  # a row per metric and step
    (first,) = [r for r in rows if r["metric"] == "aupro" and r["after learning"] == "1 grain"]
    assert 0 <= first["grain"] <= 1 and first["nut"] == "" and first["stripes"] == ""
    kind, summary = artifacts[f"benchmark-{synth_root.name.lower()}-summary"]
    assert kind == "markdown" and "| routing_accuracy |" in summary and "forgetting" in summary
    assert _mlflow_runs(store) == {str(flow_run_id)}


def test_the_benchmark_on_a_dask_cluster_equals_the_sequential_run(
    services, synth_root, smoke_stream, tmp_path
):
    """The nightly deployment with `task_runner: dask`: the flow run starts a local cluster of 2
    worker processes, each stage is one task run (no structure-map chunks), and the store ends
    with the artifacts and figures of the sequential run in this process."""
    _, reference = smoke_stream
    store = tmp_path / "dask-store"
    overrides = {**STREAM_SMOKE, "task_runner": "dask", "max_workers": 2}
    flow_run_id = _run(
        services, "ucad-benchmark/nightly", data=str(synth_root), preset="smoke", synth="false",
        store=str(store), model="stream", overrides=json.dumps(overrides), tracking="false",
    )  # fmt: skip
    classes = ["grain", "nut", "stripes"]
    learned = {f"{stage}-{name}" for stage in CLASS_STAGES for name in classes}
    evaluations = {f"evaluate-{classes[j]}-v{v}" for v in (1, 2, 3) for j in range(v)}
    evaluations |= {f"row-v{v}" for v in (1, 2, 3)}
    states = _task_states(services, flow_run_id, len(learned) + len(evaluations))
    ran, found = _ran_and_found(states)
    assert learned | NEW_WORK <= ran <= learned | evaluations
    assert {states[n] for n in learned | NEW_WORK} == {"Completed"}  # new work: computed
    assert len(ran) + found == len(learned) + len(evaluations)
    assert not any(n.startswith("structure-maps-") for n in states)
    ours, theirs = ArtifactStore(store), ArtifactStore(reference)
    assert set(ours.artifacts()) == set(theirs.artifacts())
    for _, digest in ours.artifacts("evaluate"):
        expected = theirs.get("evaluate", digest).attrs["metrics"]
        assert ours.get("evaluate", digest).attrs["metrics"] == pytest.approx(expected, abs=1e-6)


def test_deploying_queues_no_nightly_run(services):
    """The nightly's schedule is created paused: deploying queues nothing for 02:00."""
    time.sleep(max(0.0, services.deployed + 10 - time.monotonic()))  # the scheduler has looked
    with services.client() as client:
        deployment = client.read_deployment_by_name("ucad-benchmark/nightly")
        (schedule,) = deployment.schedules
        assert schedule.schedule.cron == "0 2 * * *" and schedule.active is False
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        )
    assert [run for run in runs if run.state_name == "Scheduled"] == []


def test_the_nightly_writes_its_synthetic_stream_where_none_is(tmp_path, monkeypatch):
    """`synth: true` (the nightly's default): a missing or empty data folder gets the 3-class
    synthetic stream, once; a folder with data is left as it is."""
    import logging

    import flows.continual as flows

    monkeypatch.setattr(flows, "get_run_logger", lambda: logging.getLogger("test"))
    root = tmp_path / "synth"
    assert flows._stream_length(str(root), {"synth": True}) == flows.SYNTH_CLASSES
    assert flows._stream_length(str(root), {}) is None  # the run itself says what is missing
    flows.synthesize(str(root))
    assert flows._stream_length(str(root), {}) == flows.SYNTH_CLASSES
    written = {path: path.stat().st_mtime_ns for path in root.rglob("*")}
    flows.synthesize(str(root))
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*")} == written
    assert [p.name for p in tmp_path.iterdir()] == ["synth"]  # no partial folder left
