"""Screenshots of a Prefect flow run of `ucad add-task` (docs/prefect-flow-run.png) and of
its summary artifact (docs/prefect-artifacts.png).

Starts a Prefect server with its UI on a free loopback port and a temporary database, adds three
classes of a synthetic stream to a model, one flow run each (smoke preset), and opens the third
flow run (`line-3 +stripes`) in headless Chromium: its task runs (the new class's stages and
the new version's evaluations, and one Cached task run for the history found in the store) and
its summary artifact (the final means and forgetting). Not part of the tests;
needs `chromium` (Debian: `apt-get install chromium`) and `pip install playwright` (it drives
the system Chromium; no browser download), and takes a few minutes on a CPU.

    python scripts/screenshot_prefect.py [--out docs] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from screenshots import browser_page, free_port, start_server, stop, wait_for

SMOKE = {"epochs": 1, "key_size": 32, "knowledge_size": 64, "max_workers": 2}
CLASSES = ("grain", "nut", "stripes")


def settings(root: Path, port: int) -> dict[str, str]:
    """Prefect's settings for the server and this process: all under `root`."""
    return {
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "ucad",
        "UCAD_STORE": str(root / "store"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
    }


def server_command(port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start",
            "--host", "127.0.0.1", "--port", str(port), "--no-scheduler"]  # fmt: skip


def run_flows(root: Path) -> str:
    """Three add-task flow runs; returns the last one's id."""
    from flows.continual import add_task_flow
    from ucad.data.synth import generate

    data = root / "data"
    generate(data, classes=len(CLASSES), seed=0, train=8, test_good=4, test_defect=6)
    for name in CLASSES:
        state = add_task_flow(
            task=name,
            data=str(data),
            model="line-3",
            preset="smoke",
            overrides=SMOKE,
            return_state=True,
        )
    return str(state.state_details.flow_run_id)


def screenshot(url: str, out: Path) -> None:
    """The flow run's task runs, then its artifacts, as PNGs in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with browser_page(1500, 1100) as page:
        page.goto(url)
        try:
            _take(page, out)
        except Exception:
            page.screenshot(path=out / "prefect-failed.png")
            (out / "prefect-failed.html").write_text(page.content())
            raise


def _take(page, out: Path) -> None:
    """The task runs tab, then the artifacts tab of the flow run open in `page`."""
    page.wait_for_selector("text=line-3 +stripes", timeout=120_000)
    page.get_by_text("Task Runs", exact=True).click()
    page.wait_for_selector("text=found-in-store", timeout=60_000)
    page.wait_for_timeout(3000)  # the graph and the list settle
    page.screenshot(path=out / "prefect-flow-run.png")
    page.get_by_text("Artifacts", exact=True).click()
    page.get_by_text("model-line-3-summary").click()  # the summary, as the artifact's page
    page.wait_for_selector("text=final mean", timeout=60_000)
    page.wait_for_timeout(2000)
    page.screenshot(path=out / "prefect-artifacts.png", full_page=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder of the PNGs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--root", type=Path, help="work here and keep it; a second call reuses its flow runs"
    )
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="ucad-prefect-"))
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    os.environ.update(settings(root, port))  # before Prefect is imported
    server = start_server(server_command(port), root / "server.log", settings(root, port))
    done = root / "flow-run.txt"
    try:
        wait_for(os.environ["PREFECT_API_URL"], server, "Prefect server", timeout=300)
        if not done.exists():
            done.write_text(run_flows(root))
        url = f"http://127.0.0.1:{port}/runs/flow-run/{done.read_text()}"
        screenshot(url, args.out)
        print(f"wrote {args.out / 'prefect-flow-run.png'} and prefect-artifacts.png from {url}")
    finally:
        stop(server, timeout=30)
        if not (args.keep or args.root):
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
