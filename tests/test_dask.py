"""A whole stream on a real Dask cluster of 2 local worker processes: through the `ucad`
command, with a worker killed mid-stream, and two workers asked for one digest at once. The
benchmark flow on Dask runs through a real Prefect server in test_prefect_e2e.py.

Each test closes the cluster it starts and checks that no process it started is left.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask
import pytest
from conftest import STREAM_SMOKE

from ucad.cli import main
from ucad.cluster import dask_runner
from ucad.config import load_config
from ucad.continual import Replay
from ucad.data.datasets import read_task
from ucad.data.source import TaskSource
from ucad.stages.keys import run_keys
from ucad.store import ArtifactStore
from ucad.verify import verify_store

pytestmark = pytest.mark.slow

DASK = {**STREAM_SMOKE, "task_runner": "dask", "max_workers": 2}


def outcome(result: dict) -> tuple[dict, list[tuple[str, str, str]]]:
    """What must not depend on where the stages ran: the figures and every artifact's digest."""
    digests = sorted({(r["stage"], r["task"], r["digest"]) for r in result["stages"]})
    return result["matrix"], digests


def computations(result: dict) -> int:
    return sum(not r["cached"] for r in result["stages"])


def same_outcome(result: dict, reference: dict) -> None:
    matrix, digests = outcome(result)
    expected_matrix, expected_digests = outcome(reference)
    assert digests == expected_digests
    # the same artifacts' arrays; torch's thread count may change the last float bits
    for metric, rows in expected_matrix.items():
        for row, expected in zip(matrix[metric], rows, strict=True):
            assert row == pytest.approx(expected, abs=1e-6), metric


def children() -> set[int]:
    """Processes below this one (from /proc), but Python's multiprocessing resource tracker,
    which the first spawned process starts and which lives as long as this interpreter."""
    own = os.getpid()
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == own and fields[0] != "Z" and b"resource_tracker" not in command:
            found.add(int(stat.parent.name))
    return found


@pytest.fixture
def no_process_left():
    """Fails a test that leaves a process of its own running."""
    before = children()
    yield
    deadline = time.monotonic() + 15
    while children() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not children() - before, "a process the test started is still running"


@pytest.fixture
def short_leases(monkeypatch):
    """A dead worker's claim on a digest expires in seconds, not the default 30 s."""
    settings = {
        "distributed.scheduler.locks.lease-timeout": "3s",
        "distributed.scheduler.locks.lease-validation-interval": "0.5s",
    }
    for key, value in settings.items():  # the workers read their settings from the environment
        name = "DASK_" + key.upper().replace(".", "__").replace("-", "_")
        monkeypatch.setenv(name, value)
    with dask.config.set(settings):
        yield


def test_the_ucad_command_on_two_workers_equals_the_sequential_run(
    smoke_stream, synth_root, tmp_path, no_process_left
):
    reference, _ = smoke_stream
    path = tmp_path / "run.json"
    common = ["--data", str(synth_root), "--preset", "smoke", "--no-tracking"]
    common += ["--store", str(tmp_path / "store"), "--json", str(path)]
    for field, value in DASK.items():
        common += ["--set", f"{field}={value}"]
    assert main(["benchmark", *common, "--model", "stream"]) == 0
    result = json.loads(path.read_text())
    same_outcome(result, reference)
    assert computations(result) == computations(reference) == len(reference["stages"])
    assert [r["task"] for r in result["stages"] if r["stage"] == "calibrate"] == reference["tasks"]

    # add-task on Dask too: the class is there, every version's evaluation is found in the store
    assert main(["add-task", *common, "--model", "stream", "--task", "nut"]) == 0
    again = json.loads(path.read_text())
    assert again["new_version"] is False and computations(again) == 0
    assert again["matrix"] == result["matrix"]


def test_a_worker_killed_mid_stream_changes_nothing(
    smoke_stream, synth_root, tmp_path, no_process_left, short_leases
):
    reference, _ = smoke_stream
    config = load_config("smoke", overrides=DASK)
    store = ArtifactStore(tmp_path / "store")
    killed: list[int] = []
    with dask_runner(config, store) as runner:
        client = runner.client

        def kill_a_worker_in_prompt_training() -> None:
            deadline = time.monotonic() + 300
            while not killed and time.monotonic() < deadline:
                for address, keys in client.processing().items():
                    if any(str(key).startswith("prompts-") for key in keys):
                        pid = client.run(os.getpid, workers=[address])[address]
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                        return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_a_worker_in_prompt_training)
        killer.start()
        result = Replay(str(synth_root), config, store, model="stream").run(runner)
        killer.join()
    assert killed, "no worker was seen training prompts"
    same_outcome(result.as_json(), reference)
    # only complete artifacts: the killed worker's were temporaries, never published
    assert verify_store(store) == []
    published = {(p.parent.name, p.stem) for p in Path(store.root, "stages").glob("*/*")}
    assert published == set(store.artifacts()) == set(ArtifactStore(smoke_stream[1]).artifacts())


def test_two_workers_asked_for_one_digest_compute_it_once(synth_root, tmp_path, no_process_left):
    config = load_config("smoke", overrides=DASK)
    store = ArtifactStore(tmp_path / "store")
    source = TaskSource.from_data(str(synth_root), "mvtec", read_task(synth_root, "grain", "mvtec"))
    with dask_runner(config, store) as runner:
        runner.client.run(__import__, "ucad.stages.keys")  # both workers ready at once
        with ThreadPoolExecutor(2) as threads:
            records = list(threads.map(lambda _: runner(run_keys, source), range(2)))
    assert records[0].digest == records[1].digest
    computed, waited = sorted(records, key=lambda record: record.cached)
    assert not computed.cached and not computed.raced
    assert waited.cached and waited.raced  # it waited for the other worker's artifact
    assert store.artifacts("keys") == [("keys", computed.digest)]
