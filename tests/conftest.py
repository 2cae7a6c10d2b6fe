import os
from pathlib import Path

import pytest


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
