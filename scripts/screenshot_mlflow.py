"""Screenshot of the MLflow UI comparing two smoke benchmarks (docs/mlflow-compare.png).

Starts an `mlflow server` as `ucad ui` does (one worker, no job runner) on a temporary SQLite
database, runs two smoke benchmarks of a synthetic stream (seeds 0 and 1) with tracking to it,
opens the experiment's chart view with both runs in headless Chromium (the link `ucad ui`
prints), keeps the charts whose name contains `--charts` (default: the per-class AUROC charts;
`--charts ''` keeps all, figures first and what the runs cost last) and saves the page. Not part
of the tests; needs `chromium` (Debian: `apt-get install chromium`) and `pip install playwright`
(it drives the system Chromium; no browser download), and takes a few minutes on a CPU.

    python scripts/screenshot_mlflow.py [--out docs/mlflow-compare.png] [--charts auroc/] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from screenshots import browser_page, free_port, start_server, stop, wait_for

from ucad.config import load_config
from ucad.continual import Replay
from ucad.data.synth import generate
from ucad.store import ArtifactStore
from ucad.tracking import log_result
from ucad.ui import LIGHT_ENV, chart_url, server_command

SMOKE = {"epochs": 1, "key_size": 32, "knowledge_size": 64}
SEEDS = (0, 1)


def run_benchmarks(root: Path, uri: str) -> list[str]:
    data = root / "data"
    generate(data, classes=3, seed=0, train=8, test_good=4, test_defect=6)
    store = ArtifactStore(root / "store")
    run_ids = []
    for seed in SEEDS:
        config = load_config("smoke", overrides={**SMOKE, "seed": seed})
        started = time.time()
        result = Replay(data, config, store, model=f"smoke-seed{seed}").run()
        run_ids.append(log_result(result, store, "benchmark", uri, strict=True, started=started))
    return run_ids


def compare_url(uri: str, run_ids: list[str]) -> str:
    """The experiment's runs in chart view, in the UI's model-training mode (as `ucad ui`)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return chart_url(uri, client.get_experiment(client.get_run(run_ids[0]).info.experiment_id))


def screenshot(url: str, out: Path, charts: str) -> None:
    """Open `url`, keep the charts whose name contains `charts`, save the page as PNG."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with browser_page(1600, 1250) as page:
        page.goto(url)
        page.wait_for_selector("text=seed=1", timeout=60_000)
        close = page.get_by_role("button", name="Close")  # the assistant panel, if it opens
        if close.count():
            close.first.click()
        if charts:
            page.get_by_placeholder("Search metric charts").fill(charts)
        page.add_style_tag(content=".modebar-container { display: none !important; }")
        page.wait_for_timeout(3000)  # charts draw after their data arrives
        page.screenshot(path=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/mlflow-compare.png"))
    parser.add_argument(
        "--charts", default="auroc/", help="show charts whose name contains this (default: auroc/)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ucad-mlflow-"))
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    database, artifacts = f"sqlite:///{root / 'mlflow.db'}", (root / "mlflow-artifacts").as_uri()
    command = server_command(database, artifacts, "127.0.0.1", port)
    server = start_server(command, root / "server.log", LIGHT_ENV)
    try:
        wait_for(uri, server, "mlflow server", timeout=180)
        url = compare_url(uri, run_ids=run_benchmarks(root, uri))
        screenshot(url, args.out, args.charts)
        print(f"wrote {args.out} from {url}")
    finally:
        stop(server, timeout=20)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
