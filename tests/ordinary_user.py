"""Run a check in a child process held to file permissions, as an ordinary user is.

Root reads any folder, so as root the child loses the two capabilities that let root ignore
file permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from its bounding set before it starts,
so it keeps no way to regain them. Dropping to `nobody` instead would also lock the child out of
an interpreter installed under /root. As an ordinary user the child simply runs as that user.
"""

import ctypes
import os
import subprocess
import sys
from pathlib import Path

# Run first in the child of `run_locked_out`: a child that can still read the locked folder
# (sys.argv[1]) stops, since whatever it checks next would prove nothing.
_LOCKED_OUT = """
import os, sys
try:
    os.listdir(sys.argv[1])
except PermissionError:
    pass
else:
    sys.exit("this process can read a folder of mode 000: the check would prove nothing")
"""
_PR_CAPBSET_DROP = 24
_FILE_PERMISSION_CAPABILITIES = (1, 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
REPO = Path(__file__).parents[1]


def _without_root_file_access() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in _FILE_PERMISSION_CAPABILITIES:
        if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_as_ordinary_user(code: str, *args: str) -> subprocess.CompletedProcess:
    """`python -c code args...` held to file permissions; stdout and stderr captured."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        preexec_fn=_without_root_file_access if os.geteuid() == 0 else None,
    )


def run_locked_out(code: str, folder: Path, *args: str) -> subprocess.CompletedProcess:
    """`run_as_ordinary_user(code, folder, *args)` with `folder` at mode 000 meanwhile; the child
    first makes sure it cannot read `folder`."""
    folder.chmod(0)
    try:
        return run_as_ordinary_user(_LOCKED_OUT + code, str(folder), *args)
    finally:
        folder.chmod(0o755)
