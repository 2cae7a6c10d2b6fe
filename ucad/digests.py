"""Content identities: dataset fingerprints, weight-file hashes, stage digests, array checksums.

Every cache key in ucad is built here, from content, never from a path or a time stamp.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ucad.names import validate_name

_BLOCK = 1 << 20


def canonical_json(value: Any, what: str, indent: int | None = None) -> str:
    """Canonical JSON (sorted keys; compact unless indented), or ValueError naming ``what``.

    NaN and infinity are refused: JSON has no such numbers (use None).
    """
    separators = (",", ":") if indent is None else None
    try:
        return json.dumps(
            value,
            sort_keys=True,
            indent=indent,
            separators=separators,
            ensure_ascii=False,
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{what} must be plain JSON (str, int, float, bool, None, lists, dicts): {exc}"
        ) from exc


def digest(
    stage: str, code_version: Any, config: Mapping[str, Any], inputs: Mapping[str, Any]
) -> str:
    """Name of a stage output: sha256 (first 32 hex digits) of the canonical JSON of all four parts.

    ``config`` holds the config fields the stage depends on; ``inputs`` maps input names to
    dataset fingerprints, upstream digests and the identities of the models it runs. Key order
    never matters.
    """
    payload = {
        "stage": validate_name(stage, "stage name"),
        "code_version": code_version,
        "config": dict(config),
        "inputs": dict(inputs),
    }
    return hashlib.sha256(canonical_json(payload, "digest input").encode()).hexdigest()[:32]


def hash_file(path: str | os.PathLike) -> tuple[int, str]:
    """(size, sha256 hex) of a file's content."""
    content = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            content.update(block)
            size += len(block)
    return size, content.hexdigest()


def fingerprint_files(
    paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None
) -> str:
    """sha256 hex over the relative name, size and content hash of each file, in name order.

    Names are taken relative to ``root`` (default: the files' common parent folder), so a moved
    dataset keeps its fingerprint while renaming a file changes it; modification times are ignored.
    """
    files = sorted({os.path.abspath(p) for p in paths})
    if not files:
        raise ValueError("no files to fingerprint")
    base = (
        os.path.abspath(root)
        if root is not None
        else os.path.commonpath([os.path.dirname(f) for f in files])
    )
    entries = sorted((_relative_name(f, base), f) for f in files)
    total = hashlib.sha256()
    for name, path in entries:
        size, content = hash_file(path)
        total.update(f"{name}\0{size}\0{content}\n".encode())
    return total.hexdigest()


_FILE_HASHES: dict[tuple[str, int, int], str] = {}
_FILE_HASHES_LOCK = threading.Lock()


def file_identity(path: str | os.PathLike) -> str:
    """sha256 of a (weights) file's content, hashed once per path, size and modification time.

    Weight files are hundreds of MB; a process that asks again for an unchanged file pays a
    `stat`, not a read. A file replaced at the same path gets a new identity.
    """
    resolved = Path(path).expanduser().resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    with _FILE_HASHES_LOCK:
        if key not in _FILE_HASHES:
            _FILE_HASHES[key] = hash_file(resolved)[1]
        return _FILE_HASHES[key]


def array_checksum(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes: what the store verifies on every read."""
    array = np.ascontiguousarray(array)
    content = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    content.update(array.reshape(-1).view(np.uint8))
    return content.hexdigest()


def _relative_name(path: str, base: str) -> str:
    name = os.path.relpath(path, base)
    if name.startswith(".."):
        raise ValueError(f"file {path} is not inside the fingerprint root {base}")
    return Path(name).as_posix()
