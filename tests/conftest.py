import os
import sys
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`-n`, set in pyproject.toml), each worker gets its share of the cores:
    torch in every worker, and the processes tests start (Dask workers, Prefect flow runs), would
    otherwise each run one thread per core. On the 2-vCPU CI machine, 2 workers at 2 threads each
    took 8.9 min against 6.7-8.6 min at 1 thread each (10.9 min without xdist)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = str(max(1, (cores or 1) // workers))
        # torch reads it when first imported, as do the processes the tests start
        os.environ["OMP_NUM_THREADS"] = threads
        if "torch" in sys.modules:  # imported already (by a plugin): set its pool too
            sys.modules["torch"].set_num_threads(int(threads))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic MVTec-layout dataset shared by the end-to-end tests."""
    from ucad.data.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, classes=3, seed=0, train=8, test_good=4, test_defect=6)
    return root


@pytest.fixture(autouse=True, scope="session")
def _isolated_services(tmp_path_factory):
    """Each test session gets its own Prefect home, result storage, store and MLflow database."""
    home = tmp_path_factory.mktemp("services")
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(home / "prefect" / "storage")
    os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = (
        f"sqlite+aiosqlite:///{home / 'prefect' / 'prefect.db'}"
    )
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    os.environ["UCAD_STORE"] = str(home / "artifacts")
    os.environ["UCAD_CACHE"] = str(home / "cache")
    yield


# Small enough for a few seconds a class; what runs elsewhere is compared with this.
STREAM_SMOKE = {"epochs": 1, "key_size": 32, "knowledge_size": 64}


@pytest.fixture(scope="session")
def smoke_stream(synth_root, tmp_path_factory) -> tuple[dict, Path]:
    """The synthetic stream replayed in this process, one stage at a time: its JSON and store.

    The reference that runs on Dask workers or through Prefect must reproduce.
    """
    from ucad.config import load_config
    from ucad.continual import Replay
    from ucad.store import ArtifactStore

    store = tmp_path_factory.mktemp("sequential-stream")
    config = load_config("smoke", overrides=STREAM_SMOKE)
    result = Replay(str(synth_root), config, ArtifactStore(store), model="stream").run()
    return result.as_json(), store
