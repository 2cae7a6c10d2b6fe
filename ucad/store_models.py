"""Model versions in the artifact store: ``models/<name>/v0001.json``, one JSON manifest per
version, written once and never changed, plus a ``v0001.tracked`` marker once a run has logged it
to MLflow.

`ModelManifests` is the models/ half of `ucad.store.ArtifactStore`, which mixes it in and
provides the filesystem and the path helpers it uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from fsspec import AbstractFileSystem

from ucad.digests import canonical_json
from ucad.names import validate_name
from ucad.store_files import create_exclusive

_VERSION_FILE = re.compile(r"v(\d{4,})\.json")


class ModelVersionConflict(FileExistsError):
    """The model version exists already: another run published it first; retry on the new head."""


class ModelManifests:
    """Versions of models, each a JSON manifest (see the module docstring)."""

    # Provided by ArtifactStore: the store's root, its filesystem, and paths under the root.
    root: str
    _fs: AbstractFileSystem
    _local: bool
    _join: Callable[..., str]
    _url: Callable[[str], str]
    _children: Callable[..., list[str]]

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
        data = (canonical_json(dict(manifest), "model manifest", indent=2) + "\n").encode()
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
                create_exclusive(path, data)
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

    def model_location(self, name: str, version: int) -> str:
        """Where a version's manifest is, for messages."""
        return self._url(self._version_path(name, version))

    def is_tracked(self, name: str, version: int) -> bool:
        """Whether a run recorded this version in MLflow (`mark_tracked`)."""
        return self._fs.exists(self._tracked_path(name, version))

    def mark_tracked(self, name: str, version: int) -> None:
        path = self._tracked_path(name, version)
        if self._local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self._fs.pipe_file(path, b"")

    def _tracked_path(self, name: str, version: int) -> str:
        return self._join("models", validate_name(name, "model name"), f"v{version:04d}.tracked")

    def remove_model(self, name: str) -> list[int]:
        """Delete every version of a model; stage artifacts stay (`store prune` collects them)."""
        versions = self.model_versions(name)
        if not versions:
            raise FileNotFoundError(f"no model {name!r} in store {self.root!r}")
        for version in reversed(versions):  # newest first: a reader never sees a gap below head
            self._fs.rm(self._version_path(name, version))
            if self.is_tracked(name, version):
                self._fs.rm(self._tracked_path(name, version))
        # the model's folder too, once empty (a writer adding a version meanwhile keeps it)
        with contextlib.suppress(OSError):
            self._fs.rmdir(self._join("models", name))
        return versions

    def _version_path(self, name: str, version: int) -> str:
        return self._join("models", validate_name(name, "model name"), f"v{version:04d}.json")
