"""The store's file-level safety: checksums and seals, durable writes, exclusive creates, and
the temporaries of writes in progress (`ucad.store` and `ucad.store_models` use these; nothing
else needs them)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from ucad.digests import canonical_json
from ucad.provenance import library_versions

PROVENANCE_KEYS = (
    "stage",
    "digest",
    "created_utc",
    "library_versions",
    "complete",
    "checksums",
    "files",
    "attrs_sha256",
)


def numeric_array(name: str, value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "biufc":
        raise ValueError(
            f"array {name!r} has dtype {array.dtype}: the store keeps numeric and boolean arrays "
            "only; put text and other small metadata in attrs"
        )
    return array


def user_attrs(attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    user = dict(attrs or {})
    reserved = sorted(set(user) & set(PROVENANCE_KEYS))
    if reserved:
        raise ValueError(f"attrs {reserved} are reserved for the store's provenance")
    return json.loads(canonical_json(user, "artifact attrs"))


def provenance(stage: str, digest: str) -> dict[str, Any]:
    return {
        "stage": stage,
        "digest": digest,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "library_versions": library_versions(("numpy", "zarr")),
        "complete": False,
    }


def create_exclusive(path: str, data: bytes) -> None:
    """Create ``path`` with ``data`` or raise FileExistsError; never leaves a partial file there."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{owner()}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # atomic, and fails if path exists
    finally:
        os.unlink(tmp)
    fsync_dir(directory)


def fsync_tree(path: str) -> None:
    """Flush every file and folder under `path` to disk."""
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def owner() -> str:
    """host and pid of this process, in temporary names: `store prune` keeps those still alive."""
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"


@dataclass(frozen=True)
class Temporary:
    """A write in progress, or one a killed run left behind."""

    path: str
    name: str  # <stage>-<digest>-<host>-<pid>-<random>.zarr, discard-<host>-<pid>-..., ...
    modified: float | None  # POSIX time of its last change, where the filesystem tells

    def writer_alive(self) -> bool | None:
        """Whether the process that made it still runs: None when it cannot be told (another
        host, or a name without an owner)."""
        match = re.search(r"(?:^|-)([A-Za-z0-9_.]+)-(\d+)-[0-9a-z]+(?:\.zarr|\.tmp)?$", self.name)
        return owner_alive(match.group(1), int(match.group(2))) if match else None


def owner_alive(host: str, pid: int) -> bool | None:
    """Whether the process an `owner()` names still runs: None when it cannot be told (another
    host)."""
    if host != socket.gethostname().replace("-", "_"):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):  # not a pid this system can have
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def attrs_checksum(attrs: Mapping[str, Any]) -> str:
    payload = {k: v for k, v in attrs.items() if k != "attrs_sha256"}
    return hashlib.sha256(canonical_json(payload, "artifact attrs").encode()).hexdigest()


def seal_problem(attrs: Mapping[str, Any]) -> str | None:
    if "checksums" not in attrs or "files" not in attrs or "attrs_sha256" not in attrs:
        return "it carries no checksums (written by ucad 0.1, or altered)"
    if attrs_checksum(attrs) != attrs["attrs_sha256"]:
        return "its attributes do not match their checksum (the metadata was altered)"
    return None


def files_problem(recorded: Mapping[str, int], found: Mapping[str, int]) -> str | None:
    missing = sorted(set(recorded) - set(found))
    if missing:
        return f"{len(missing)} file(s) missing, e.g. {missing[0]}"
    resized = sorted(k for k in recorded if found[k] != recorded[k])
    if resized:
        name = resized[0]
        return f"file {name} has {found[name]} bytes, {recorded[name]} when published"
    extra = sorted(set(found) - set(recorded))
    if extra:
        return f"unexpected file(s), e.g. {extra[0]}"
    return None
