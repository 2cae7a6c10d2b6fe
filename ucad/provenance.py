"""What a run was made with: library versions, the source commit, peak memory.

One place for each, read by the run JSON, MLflow tags, store attributes and the benchmark.
"""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

from ucad import __version__

PACKAGES = ("numpy", "zarr", "torchvision", "timm", "mlflow", "prefect")


def library_versions(packages: tuple[str, ...] = ()) -> dict[str, str]:
    """python, ucad and torch (its own string names its build, +cu130 or +cpu), then `packages`.

    torch is reported only when this process imported it: reading it must not import it.
    """
    versions = {"python": platform.python_version(), "ucad": __version__}
    torch = sys.modules.get("torch")
    if torch is not None:
        versions["torch"] = str(torch.__version__)
        if torch.version.cuda:
            versions["cuda"] = str(torch.version.cuda)
    for name in packages:
        version = _installed_version(name)
        if version is not None:
            versions[name] = version
    return versions


@cache
def _installed_version(name: str) -> str | None:
    """A distribution's version, read once per process (each read parses its metadata file, about
    a quarter of a millisecond, and every artifact the store publishes names two)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_state() -> tuple[str | None, bool]:
    """Commit of the ucad checkout this code runs from, and whether it has uncommitted changes.

    Only for a source checkout: an installed ucad inside some other repository must not report
    that repository's commit.
    """
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / ".git").exists():
        return None, False
    try:
        commit = _git(checkout, "rev-parse", "HEAD")
        dirty = bool(_git(checkout, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, False
    return commit or None, dirty


def _git(checkout: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=10, check=True
    )
    return done.stdout.strip()


def peak_rss_bytes() -> int:
    """Peak resident memory of this process: since the last `reset_peak_rss` where Linux tells
    (VmHWM), else over the whole process lifetime."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)  # bytes on macOS


def reset_peak_rss() -> bool:
    """Start a new peak-memory window (Linux >= 4.0); False where the system cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS
    except OSError:
        return False
    return True
