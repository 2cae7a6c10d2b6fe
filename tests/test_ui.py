"""`ucad ui`: which experiment it links to, how it starts the MLflow server, and the command itself
against a real server on a free loopback port (stopped, with all it started, before the test
ends)."""

from __future__ import annotations

import argparse
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback import free_port
from mlflow import MlflowClient

from ucad.ui import LIGHT_ENV, add_ui_parser, chart_url, cmd_ui, find_experiment, server_command

VIEW = "runs?workflowType=machine_learning&compareRunsMode=CHART"


@pytest.fixture
def database(tmp_path, monkeypatch) -> tuple[Path, dict[str, str]]:
    """A store whose MLflow database has two models' runs, line-b's the latest."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = (tmp_path / "store").resolve() / "mlflow.db"
    path.parent.mkdir()
    client = MlflowClient(f"sqlite:///{path}")
    ids = {}
    for started, model in ((1_000, "line-a"), (2_000, "line-b")):
        ids[model] = client.create_experiment(f"ucad model {model}")
        client.create_run(ids[model], start_time=started, tags={"ucad.model": model})
    return path, ids


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ucad")
    add_ui_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["ui", *argv])


def test_links_a_models_experiment_or_the_latest_runs(database):
    path, ids = database
    uri = f"sqlite:///{path}"
    assert find_experiment(uri, "line-a").experiment_id == ids["line-a"]
    latest = find_experiment(uri, None)
    assert latest.experiment_id == ids["line-b"]
    assert chart_url("http://127.0.0.1:5000", latest) == (
        f"http://127.0.0.1:5000/#/experiments/{ids['line-b']}/{VIEW}"
    )
    with pytest.raises(ValueError, match="no MLflow runs of model 'line-c'"):
        find_experiment(uri, "line-c")


def test_no_runs_links_the_experiment_list(tmp_path):
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    experiment = find_experiment(uri, None)
    assert experiment is None
    assert chart_url("http://h:1", experiment) == "http://h:1/#/experiments"


def test_the_server_is_light_and_on_the_stores_database(tmp_path):
    command = server_command("sqlite:////s/mlflow.db", "file:///s/mlflow-artifacts", "::1", 5001)
    assert command[command.index("--workers") + 1] == "1"
    assert command[command.index("--backend-store-uri") + 1] == "sqlite:////s/mlflow.db"
    assert command[command.index("--default-artifact-root") + 1] == "file:///s/mlflow-artifacts"
    assert LIGHT_ENV == {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner


def test_clear_errors_without_runs_or_without_a_place(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(FileNotFoundError, match="no MLflow runs logged yet"):
        cmd_ui(_parse("--store", str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="is remote .* --tracking-uri"):
        cmd_ui(_parse("--store", "memory://ucad-ui-test"))


def _processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, ...) of
    every process still there."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        yield int(stat.parent.name), fields


def _group(pid: int) -> list[int]:
    """Processes of the process group `pid` leads (the server and its workers)."""
    return [p for p, fields in _processes() if int(fields[2]) == pid and fields[0] != "Z"]


def _lines(stream) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


@pytest.mark.slow
def test_ucad_ui_serves_the_store_and_prints_the_link(database):
    path, ids = database
    port = free_port()
    command = [sys.executable, "-m", "ucad.cli", "ui", "--store", str(path.parent),
               "--model", "line-a", "--port", str(port), "--timeout", "150"]  # fmt: skip
    ui = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    server: list[int] = []
    output = []
    try:
        lines = _lines(ui.stdout)
        link = None
        deadline = time.monotonic() + 180
        while link is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            output.append(line)
            if "/#/experiments/" in line:
                link = line.strip()
        assert link == f"http://127.0.0.1:{port}/#/experiments/{ids['line-a']}/{VIEW}", output
        server = _children_groups(ui.pid)
        with urllib.request.urlopen(link, timeout=30) as page:
            assert page.status == 200 and "<html" in page.read(4096).decode().lower()
        api = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/get-by-name"
        with urllib.request.urlopen(f"{api}?experiment_name=ucad%20model%20line-a") as answer:
            assert ids["line-a"] in answer.read().decode()

        ui.send_signal(signal.SIGTERM)  # what Ctrl-C does too: ucad stops its server
        assert ui.wait(timeout=60) == 0, "".join(output)
        assert server and not [pid for group in server for pid in _group(group)]
    finally:
        for pid in [ui.pid, *server]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        ui.wait(timeout=30)


def _children_groups(pid: int) -> list[int]:
    """Process groups led by children of `pid` (the server ucad started in a session of its
    own)."""
    return [p for p, fields in _processes() if int(fields[1]) == pid and int(fields[2]) == p]
