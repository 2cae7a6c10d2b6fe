"""Versioned artifact store: stage outputs as Zarr groups named by digest, models as JSON manifests.

Layout under the root (a local folder or any fsspec URL such as ``s3://bucket/ucad``)::

    stages/<stage>/<digest>.zarr   one finished stage output: arrays + provenance attributes
    models/<name>/v0001.json       one model version: a JSON manifest written once, never changed
    .tmp/                          writes in progress; never read

A stage output is trusted only when its group attribute ``complete`` is true. That attribute is
written last, in a temporary group, and the group is then published: locally by one atomic
``os.rename``; on remote filesystems (no atomic rename) by copying it into place with the group
metadata that carries the marker copied last. A run killed at any point therefore leaves at most
an unfinished group that ``has`` reports as absent and the next ``put`` replaces.

Only Zarr arrays and JSON are ever read back; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.storage import FsspecStore, LocalStore

from ucad import __version__ as _ucad_version

DEFAULT_ROOT = "artifacts"
ENV_VAR = "UCAD_STORE"

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
_VERSION_FILE = re.compile(r"v(\d{4,})\.json")
_PROVENANCE_KEYS = ("stage", "digest", "created_utc", "library_versions", "complete")
_BLOCK = 1 << 20


class StoreError(OSError):
    """The store root cannot be used: not a folder, not readable, or no filesystem for its URL."""


class ModelVersionConflict(FileExistsError):
    """The model version exists already: another run published it first; retry on the new head."""


def resolve_root(root: str | os.PathLike | None = None) -> str:
    """The store root: ``root`` if given, else ``$UCAD_STORE``, else ``./artifacts``."""
    if root is not None and os.fspath(root) != "":
        return os.fspath(root)
    return os.environ.get(ENV_VAR) or DEFAULT_ROOT


def validate_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is safe as one path component, else raise ValueError naming it."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-100 characters from A-Z a-z 0-9 . _ - "
            "and do not start with '.'"
        )
    return value


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
        size, content = _hash_file(path)
        total.update(f"{name}\0{size}\0{content}\n".encode())
    return total.hexdigest()


def digest(
    stage: str, code_version: str, config: Mapping[str, Any], inputs: Mapping[str, str]
) -> str:
    """Name of a stage output: sha256 (first 32 hex digits) of the canonical JSON of all four parts.

    ``config`` holds only the config fields the stage reads; ``inputs`` maps input names to
    dataset fingerprints or upstream digests. Key order never matters.
    """
    payload = {
        "stage": validate_name(stage, "stage name"),
        "code_version": code_version,
        "config": dict(config),
        "inputs": dict(inputs),
    }
    return hashlib.sha256(_json(payload, "digest input").encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Artifact:
    """One complete stage output; arrays are read from the store on demand."""

    stage: str
    digest: str
    attrs: dict[str, Any]
    group: zarr.Group = field(repr=False, compare=False)

    @property
    def names(self) -> list[str]:
        return sorted(self.group.array_keys())

    def array(self, name: str) -> np.ndarray:
        try:
            node = self.group[name]
        except KeyError:
            raise KeyError(
                f"artifact {self.stage}/{self.digest} has no array {name!r}; it has {self.names}"
            ) from None
        return np.asarray(node[...])

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: self.array(name) for name in self.names}


class ArtifactStore:
    """Stage outputs and model manifests under one root (layout: see the module docstring)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = resolve_root(root)
        try:
            self._fs, self._path = fsspec.core.url_to_fs(self.root)
        except (ImportError, ValueError) as exc:
            raise StoreError(
                f"cannot open artifact store {self.root!r}: {exc} "
                "(for a URL, install its fsspec filesystem package, e.g. s3fs for s3://)"
            ) from exc
        self._local = isinstance(self._fs, LocalFileSystem)
        self._check_usable()

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

    # stage outputs

    def has(self, stage: str, digest: str) -> bool:
        """True only for a complete artifact; unfinished groups count as absent."""
        return self._open_complete(self._final(stage, digest)) is not None

    def get(self, stage: str, digest: str) -> Artifact:
        group = self._open_complete(self._final(stage, digest))
        if group is None:
            raise FileNotFoundError(f"no complete artifact {stage}/{digest} in store {self.root!r}")
        return Artifact(stage, digest, group.attrs.asdict(), group)

    def put(
        self,
        stage: str,
        digest: str,
        arrays: Mapping[str, Any],
        attrs: Mapping[str, Any] | None = None,
    ) -> Artifact:
        """Publish a stage output, or return the existing one with this digest.

        ``attrs`` is the caller's JSON-serialisable provenance (config, inputs, code version, small
        metadata); the store adds stage, digest, creation time, library versions and the marker.
        Racing writers of one digest are safe: one publishes, the others return its artifact.
        """
        final = self._final(stage, digest)
        if self._open_complete(final) is not None:
            return self.get(stage, digest)
        checked = {validate_name(n, "array name"): _numeric_array(n, a) for n, a in arrays.items()}
        attributes = {**_user_attrs(attrs), **_provenance(stage, digest)}
        tmp = self._join(".tmp", f"{stage}-{digest}-{uuid.uuid4().hex}.zarr")
        try:
            group = zarr.create_group(store=self._zarr_store(tmp), attributes=attributes)
            for name, array in checked.items():
                _write_array(group, name, array)
            group.attrs["complete"] = True  # written last: only a finished group carries it
            self._publish(tmp, final)
        finally:
            if self._fs.exists(tmp):
                self._fs.rm(tmp, recursive=True)
        return self.get(stage, digest)

    def artifacts(self, stage: str | None = None) -> list[tuple[str, str]]:
        """(stage, digest) of every complete artifact, optionally of one stage, sorted."""
        stages = [validate_name(stage, "stage name")] if stage else self._children("stages")
        return [
            (s, name[: -len(".zarr")])
            for s in stages
            for name in self._children("stages", s)
            if name.endswith(".zarr") and self.has(s, name[: -len(".zarr")])
        ]

    # models

    def models(self) -> list[str]:
        """Names of models with at least one version."""
        return [name for name in self._children("models") if self.model_versions(name)]

    def model_versions(self, name: str) -> list[int]:
        validate_name(name, "model name")
        matches = (_VERSION_FILE.fullmatch(f) for f in self._children("models", name))
        return sorted(int(m.group(1)) for m in matches if m)

    def read_model(self, name: str, version: int | None = None) -> dict[str, Any]:
        """The manifest of one model version; ``None`` means the latest."""
        versions = self.model_versions(name)
        if not versions:
            raise FileNotFoundError(f"no model {name!r} in store {self.root!r}")
        version = versions[-1] if version is None else version
        if version not in versions:
            raise FileNotFoundError(f"model {name!r} has no version {version}; it has {versions}")
        path = self._version_path(name, version)
        try:
            manifest = json.loads(self._fs.cat_file(path))
        except ValueError as exc:
            raise ValueError(f"corrupt model manifest {self._url(path)}: {exc}") from exc
        if not isinstance(manifest, dict):
            raise ValueError(f"corrupt model manifest {self._url(path)}: not a JSON object")
        return manifest

    def write_model(self, name: str, version: int, manifest: Mapping[str, Any]) -> None:
        """Create version ``version`` (must be the next one) of model ``name``, never overwriting.

        Raises ModelVersionConflict if that version exists, including when another run created it
        a moment ago. Locally the create is atomic (hard link of a finished temp file); on remote
        filesystems it is only as atomic as the backend's ``pipe_file(mode="create")``; fsspec's
        default for it checks and then writes, so two writers can still race there.
        """
        if not isinstance(manifest, Mapping):
            raise ValueError(f"model manifest must be a JSON object, got {type(manifest).__name__}")
        data = (_json(dict(manifest), "model manifest", indent=2) + "\n").encode()
        head = max(self.model_versions(name), default=0)
        if not isinstance(version, int) or version < 1 or version > head + 1:
            raise ValueError(
                f"model {name!r} is at version {head}; cannot write version {version!r}"
            )
        conflict = ModelVersionConflict(
            f"model {name!r} version {version} exists already in {self.root!r} "
            "(another run added it); retry on the new head"
        )
        if version <= head:
            raise conflict
        path = self._version_path(name, version)
        try:
            if self._local:
                _create_exclusive(path, data)
            else:
                self._fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            raise conflict from None

    def append_model(
        self,
        name: str,
        build: Callable[[dict[str, Any] | None], Mapping[str, Any]],
        retries: int = 10,
    ) -> int:
        """Write the next version of ``name`` as ``build(latest manifest or None)``; return it.

        If another run adds a version first, ``build`` is called again on the new head, so it must
        be cheap and free of side effects.
        """
        for _ in range(retries):
            head = max(self.model_versions(name), default=0)
            previous = self.read_model(name, head) if head else None
            try:
                self.write_model(name, head + 1, build(previous))
                return head + 1
            except ModelVersionConflict:
                continue
        raise ModelVersionConflict(
            f"model {name!r}: other runs kept adding versions; gave up after {retries} attempts"
        )

    # internals

    def _check_usable(self) -> None:
        try:
            exists = self._fs.exists(self._path)
            is_dir = exists and self._fs.isdir(self._path)
        except Exception as exc:  # any backend failure (credentials, network) means unusable
            raise StoreError(f"cannot read artifact store {self.root!r}: {exc}") from exc
        if exists and not is_dir:
            raise StoreError(f"artifact store {self.root!r} is not a folder")
        if self._local and exists and not os.access(self._path, os.R_OK | os.X_OK):
            raise StoreError(f"artifact store {self.root!r} is not readable (permission denied)")

    def _join(self, *parts: str) -> str:
        return "/".join([self._path.rstrip("/"), *parts])

    def _url(self, path: str) -> str:
        return path if self._local else self._fs.unstrip_protocol(path)

    def _final(self, stage: str, digest: str) -> str:
        stage = validate_name(stage, "stage name")
        return self._join("stages", stage, validate_name(digest, "digest") + ".zarr")

    def _version_path(self, name: str, version: int) -> str:
        return self._join("models", validate_name(name, "model name"), f"v{version:04d}.json")

    def _children(self, *parts: str) -> list[str]:
        """Sorted valid names directly under ``parts``; none if that folder does not exist."""
        try:
            entries = self._fs.ls(self._join(*parts), detail=False)
        except FileNotFoundError:
            return []
        names = (entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)
        return sorted(n for n in names if _NAME.fullmatch(n))

    def _zarr_store(self, path: str, read_only: bool = False) -> LocalStore | FsspecStore:
        if self._local:
            return LocalStore(path, read_only=read_only)
        return FsspecStore.from_mapper(self._fs.get_mapper(path), read_only=read_only)

    def _open_complete(self, path: str) -> zarr.Group | None:
        try:
            group = zarr.open_group(store=self._zarr_store(path, read_only=True), mode="r")
        except (FileNotFoundError, ValueError):  # missing, or metadata unreadable as a group
            return None
        return group if group.attrs.get("complete") is True else None

    def _publish(self, tmp: str, final: str) -> None:
        if self._local:
            self._publish_by_rename(tmp, final)
        else:
            self._publish_by_copy(tmp, final)

    def _publish_by_rename(self, tmp: str, final: str) -> None:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        if os.path.exists(final) and self._open_complete(final) is None:
            # An unfinished group at the final path is never trusted. Move it aside atomically
            # before deleting, so a concurrent publish never sees a half-deleted group there.
            trash = self._join(".tmp", f"discard-{uuid.uuid4().hex}")
            os.rename(final, trash)
            self._fs.rm(trash, recursive=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if self._open_complete(final) is None:
                raise
            # Another writer published this digest first; its artifact is equivalent to ours.

    def _publish_by_copy(self, tmp: str, final: str) -> None:
        # Overwrite key by key (each object write is atomic) and never delete at the final path,
        # so racing writers of one digest cannot remove each other's chunks.
        marker = f"{tmp}/zarr.json"
        for source in sorted(self._fs.find(tmp), key=lambda p: p == marker):
            self._fs.copy(source, final + source[len(tmp) :])


def _relative_name(path: str, base: str) -> str:
    name = os.path.relpath(path, base)
    if name.startswith(".."):
        raise ValueError(f"file {path} is not inside the fingerprint root {base}")
    return Path(name).as_posix()


def _hash_file(path: str) -> tuple[int, str]:
    content = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            content.update(block)
            size += len(block)
    return size, content.hexdigest()


def _json(value: Any, what: str, indent: int | None = None) -> str:
    """Canonical JSON (sorted keys; compact unless indented), or ValueError naming ``what``."""
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


def _numeric_array(name: str, value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "biufc":
        raise ValueError(
            f"array {name!r} has dtype {array.dtype}: the store keeps numeric and boolean arrays "
            "only; put text and other small metadata in attrs"
        )
    return array


def _user_attrs(attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    user = dict(attrs or {})
    reserved = sorted(set(user) & set(_PROVENANCE_KEYS))
    if reserved:
        raise ValueError(f"attrs {reserved} are reserved for the store's provenance")
    return json.loads(_json(user, "artifact attrs"))


def _provenance(stage: str, digest: str) -> dict[str, Any]:
    versions = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "ucad": _ucad_version,
    }
    if "torch" in sys.modules:  # recorded only when the stage used it; never imported here
        versions["torch"] = str(sys.modules["torch"].__version__)
    return {
        "stage": stage,
        "digest": digest,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "library_versions": versions,
        "complete": False,
    }


def _write_array(group: zarr.Group, name: str, array: np.ndarray) -> None:
    # Every chunk gets a key, even all-fill ones, so a group republished over an unfinished one
    # (remote copy) never keeps a stale chunk from the earlier attempt.
    group.create_array(name, data=array, config={"write_empty_chunks": True})


def _create_exclusive(path: str, data: bytes) -> None:
    """Create ``path`` with ``data`` or raise FileExistsError; never leaves a partial file there."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # atomic, and fails if path exists
    finally:
        os.unlink(tmp)
