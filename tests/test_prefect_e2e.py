"""End to end through Prefect, as a user runs it: a real server and a process worker on
loopback, deployments from prefect.yaml, and `prefect deployment run ucad/add-task` twice.

Everything lives under tmp_path (Prefect home and database, the artifact store); every process
the test starts is stopped, with whatever it started, before the test ends.
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
from loopback import free_port
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
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
    """SIGTERM the process and everything it started, SIGKILL what is left; returns the pids."""
    pids = [process.pid, *_children(process.pid)]
    for pid in pids:
        try:
            os.killpg(os.getpgid(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
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
            "UCAD_STORE": str(self.store),
        }
        self.env.pop("MLFLOW_TRACKING_URI", None)  # runs are logged to <store>/mlflow.db
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.processes: dict[str, subprocess.Popen] = {}
        # no scheduler: the nightly deployment must not start a run during the test
        self.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port),
                   "--no-scheduler", "--no-ui")  # fmt: skip

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


@pytest.fixture
def services(tmp_path) -> Iterator[Services]:
    running = Services(tmp_path)
    try:
        yield running
    finally:
        pids = running.stop()
        assert not [pid for pid in pids if _alive(pid)], "processes left running"


def _run_add_task(services: Services, data: Path) -> UUID:
    output = services.cli(
        "deployment", "run", "ucad/add-task",
        "-p", "task=grain", "-p", f"data={data}", "-p", "model=line-1", "-p", "preset=smoke",
        "-p", f"overrides={json.dumps(SMOKE)}",
        "--watch", "--watch-timeout", "400",
        timeout=420,
    )  # fmt: skip
    return UUID(re.search(r"UUID: ([0-9a-f-]{36})", output).group(1))


def _task_states(services: Services, flow_run_id: UUID) -> dict[str, str]:
    """Task run name -> state name, once the server has recorded them all (events lag)."""
    expected = len(CLASS_STAGES) + 1  # and one evaluation
    with services.client() as client:
        assert client.read_flow_run(flow_run_id).state.is_completed()
        deadline = time.monotonic() + 30
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            states = {run.name: run.state_name for run in runs}
            stages = [name for name in states if not name.startswith("structure-maps-")]
            finished = all(state in ("Completed", "Cached") for state in states.values())
            if (len(stages) >= expected and finished) or time.monotonic() > deadline:
                return states
            time.sleep(0.5)


def _deployment_schedule(services: Services, name: str) -> str:
    with services.client() as client:
        deployment = client.read_deployment_by_name(name)
        return deployment.schedules[0].schedule.cron


def _mlflow_runs(store: Path) -> set[str]:
    """The Prefect flow run ids of the parent runs logged to the store's MLflow database."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.`prefect.flow_run_id` != ''")
    return {run.data.tags["prefect.flow_run_id"] for run in runs}


def test_add_task_deployment_through_server_and_worker(services, synth_root):
    services.wait_healthy()
    services.cli("work-pool", "create", "ucad-pool", "--type", "process")
    services.cli("--no-prompt", "deploy", "--all")
    assert _deployment_schedule(services, "ucad-benchmark/nightly") == "0 2 * * *"
    services.start("worker", "worker", "start", "--pool", "ucad-pool")

    first_id = _run_add_task(services, synth_root)
    first = _task_states(services, first_id)
    store = ArtifactStore(services.store)
    manifest = store.read_model("line-1")
    assert manifest["version"] == 1 and [t["name"] for t in manifest["tasks"]] == ["grain"]
    (evaluation,) = store.artifacts("evaluate")
    assert 0.0 <= store.get(*evaluation).attrs["metrics"]["image_auroc"] <= 1.0
    stage_runs = {f"{stage}-grain" for stage in CLASS_STAGES} | {"evaluate-grain-v1"}
    chunks = {name for name in first if name.startswith("structure-maps-grain-")}
    assert set(first) - chunks == stage_runs and len(chunks) == SMOKE["max_workers"]
    assert set(first.values()) == {"Completed"}

    # A new flow run, in a new process: the store has every artifact, so every stage is cached.
    second_id = _run_add_task(services, synth_root)
    assert _task_states(services, second_id) == dict.fromkeys(stage_runs, "Cached")
    assert store.model_versions("line-1") == [1]
    # the second changed nothing: no MLflow run for it
    assert _mlflow_runs(services.store) == {str(first_id)}
