"""`ucad ui`: the MLflow UI on a store's runs, started light, and the link to a model's charts.

Where the runs are is resolved as they are logged (`ucad.tracking_target.resolve_target`):
``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the store's ``<store>/mlflow.db``. A
database is served by an ``mlflow server`` started here, light (one worker, no job runner, on
loopback unless ``--host`` says otherwise) until Ctrl-C; a tracking server (http) is only linked
to. The link opens the model-training view of the model's experiment (``--model``; default: the
experiment of the latest run) in chart view.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # MLflow takes seconds to import: only `ucad ui` itself pays for it
    from mlflow import MlflowClient
    from mlflow.entities import Experiment

    from ucad.config import Config
    from ucad.store import ArtifactStore

# The model-training view (not GenAI) of an experiment's runs, as charts.
VIEW = "workflowType=machine_learning&compareRunsMode=CHART"
# One worker process and no job runner (MLflow's background job executor): a UI for one person.
LIGHT_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
WORKERS = "1"


def add_ui_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`ucad ui [--model NAME] [--store PATH] [--tracking-uri URI] [--host H] [--port N]`."""
    ui = subparsers.add_parser(
        "ui",
        help="start the MLflow UI on the store's runs and print the link to a model's charts",
        description="Start the MLflow UI (one worker, no job runner) on the runs logged for "
        "this store and print the link to the model-training chart view of a model's "
        "experiment. A tracking server (http URI) is not started, only linked to. Ctrl-C stops.",
    )
    ui.add_argument(
        "--model",
        metavar="NAME",
        help="a model (add-task) or benchmark model name; default: the latest run's experiment",
    )
    ui.add_argument(
        "--store", help="artifact store root or fsspec URL (default: $UCAD_STORE or ./artifacts)"
    )
    ui.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="where the runs are (default: $MLFLOW_TRACKING_URI, else <store>/mlflow.db)",
    )
    ui.add_argument("--host", default="127.0.0.1", help="interface to listen on (127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000, help="port to listen on (5000)")
    ui.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        metavar="SECONDS",
        help="how long to wait for the server to answer (default 180)",
    )
    ui.set_defaults(run=cmd_ui)
    return ui


def cmd_ui(args: argparse.Namespace) -> None:
    from ucad.config import Config
    from ucad.store import ArtifactStore, validate_name
    from ucad.tracking_target import ENV_VAR, resolve_target

    if args.model is not None:
        validate_name(args.model, "model name")
    store = ArtifactStore(args.store)
    target = resolve_target(store, Config(), args.tracking_uri)
    if target is None:
        raise ValueError(
            f"the store {store.root!r} is remote and keeps no MLflow database: name the "
            f"tracking server with --tracking-uri or ${ENV_VAR}"
        )
    if is_server(target.uri):  # a running tracking server: nothing to start
        experiment = find_experiment(target.uri, args.model)
        print(f"MLflow UI at {target.uri}:")
        print(f"  {chart_url(target.uri, experiment)}{_about(experiment)}", flush=True)
        return
    database = sqlite_path(target.uri)
    if database is not None and not database.is_file():
        raise FileNotFoundError(
            f"{database}: no MLflow runs logged yet (ucad add-task and ucad benchmark log "
            "there; see --tracking-uri)"
        )
    serve(target.uri, target.artifact_location, args.host, args.port, args.model, args.timeout)


def serve(
    uri: str,
    artifact_location: str | None,
    host: str,
    port: int,
    model: str | None,
    timeout: float,
) -> None:
    """Run `mlflow server` on the database `uri` until Ctrl-C or SIGTERM; print the link once
    it answers."""
    base = f"http://{_link_host(host)}:{port}"
    log = Path(tempfile.mkstemp(prefix="ucad-ui-", suffix=".log")[1])
    with log.open("w") as out:
        server = subprocess.Popen(
            server_command(uri, artifact_location, host, port),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **LIGHT_ENV},
            start_new_session=True,  # its own process group: stopped as a whole, below
        )
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        experiment = find_experiment(uri, model)  # while the server starts
        wait_until_up(base, server, log, timeout)
        print(f"MLflow UI on {uri} (Ctrl-C stops it; server log: {log}):")
        print(f"  {chart_url(base, experiment)}{_about(experiment)}", flush=True)
        code = server.wait()
        raise RuntimeError(f"the MLflow server stopped (exit {code}):\n{_tail(log)}")
    except KeyboardInterrupt:
        print("stopping the MLflow UI", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop(server)


def server_command(uri: str, artifact_location: str | None, host: str, port: int) -> list[str]:
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", uri,
        "--host", host, "--port", str(port), "--workers", WORKERS,
    ]  # fmt: skip
    if artifact_location:  # where experiments made in the UI keep artifacts, as ucad's do
        command += ["--default-artifact-root", artifact_location]
    return command


def wait_until_up(base: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(
                f"the MLflow server exited (code {server.returncode}):\n{_tail(log)}"
            )
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the MLflow server did not answer at {base} in {timeout:.0f} s")


def stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (uvicorn and its worker), SIGKILL after 20 s."""
    if server.poll() is None:
        try:
            os.killpg(server.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(server.pid, signal.SIGKILL)  # whatever of the group is left
    except ProcessLookupError:
        pass
    server.wait()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# Which experiment, which link -------------------------------------------------------------------


def find_experiment(uri: str, model: str | None) -> Experiment | None:
    """The experiment of the latest run of `model` (add-task and benchmark runs alike), or of
    the latest run at all; None when there are no runs. A model without runs is an error."""
    from ucad.tracking_target import http_limits

    with http_limits():
        client = _client(uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        found = []
        if experiments:
            condition = f"tags.`ucad.model` = '{model}'" if model else ""
            found = client.search_runs(
                experiments, condition, max_results=1, order_by=["attributes.start_time DESC"]
            )
        if found:
            return client.get_experiment(found[0].info.experiment_id)
    if model:
        raise ValueError(f"no MLflow runs of model {model!r} in {uri}")
    return None


def chart_url(base: str, experiment: Experiment | None) -> str:
    """The experiment's runs in the model-training view, as charts; the experiment list if
    there is none."""
    if experiment is None:
        return f"{base.rstrip('/')}/#/experiments"
    return f"{base.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs?{VIEW}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def run_link(store: ArtifactStore, config: Config, run_id: str) -> str | None:
    """The link to a logged run where runs go to a tracking server (http); None otherwise (a
    database has no address until `ucad ui` serves it) or when the server cannot be asked."""
    from ucad.tracking_target import http_limits, resolve_target

    target = resolve_target(store, config)
    if target is None or not is_server(target.uri):
        return None
    try:
        with http_limits():
            experiment = _client(target.uri).get_run(run_id).info.experiment_id
    except Exception:  # a link is a convenience: the run id is given either way
        return None
    return run_url(target.uri, experiment, run_id)


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI (None for other databases)."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) else None


def _client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _about(experiment: Experiment | None) -> str:
    return "" if experiment is None else f"\n  (experiment {experiment.name!r}, chart view)"


def _link_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):  # every interface: this machine reaches it on loopback
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _tail(log: Path, size: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-size:]
    except OSError:
        return ""
