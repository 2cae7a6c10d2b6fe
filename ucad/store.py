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

import json
import os
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.storage import FsspecStore, LocalStore

from ucad.digests import array_checksum, canonical_json
from ucad.names import NAME, validate_name
from ucad.store_files import (
    Temporary,
    attrs_checksum,
    create_exclusive,
    files_problem,
    fsync_dir,
    fsync_tree,
    numeric_array,
    owner,
    provenance,
    seal_problem,
    user_attrs,
)

DEFAULT_ROOT = "artifacts"
ENV_VAR = "UCAD_STORE"

_VERSION_FILE = re.compile(r"v(\d{4,})\.json")
ROOT_METADATA = "zarr.json"
REPAIR_HINT = (
    "run `ucad store verify --repair` to move it aside; "
    "the next run that needs it computes it again"
)


class StoreError(OSError):
    """The store root cannot be used: not a folder, not readable, or no filesystem for its URL."""


class DamagedArtifactError(OSError):
    """A published artifact whose files, attributes or array contents are not what was published."""


class ModelVersionConflict(FileExistsError):
    """The model version exists already: another run published it first; retry on the new head."""


def resolve_root(root: str | os.PathLike | None = None) -> str:
    """The store root: ``root`` if given, else ``$UCAD_STORE``, else ``./artifacts``."""
    if root is not None and os.fspath(root) != "":
        return os.fspath(root)
    return os.environ.get(ENV_VAR) or DEFAULT_ROOT


@dataclass(frozen=True)
class Artifact:
    """One complete stage output; arrays are read on demand and checked against their checksums."""

    stage: str
    digest: str
    path: str
    attrs: dict[str, Any]
    group: zarr.Group = field(repr=False, compare=False)

    def describe(self) -> str:
        task = self.attrs.get("task")
        of = f" of class {task!r}" if task else ""
        return f"{self.stage} artifact{of}, digest {self.digest} ({self.path})"

    @property
    def names(self) -> list[str]:
        return sorted(self.group.array_keys())

    @property
    def stored_bytes(self) -> int:
        """Bytes its arrays take on disk (as published; metadata not counted)."""
        return sum(self.attrs["files"].values())

    def shape(self, name: str) -> tuple[int, ...]:
        """An array's shape, from its metadata alone."""
        return tuple(self.group[name].shape)

    def array(self, name: str) -> np.ndarray:
        """The array `name`, verified: a missing, truncated or altered chunk is an error."""
        if name not in self.attrs["checksums"]:
            raise KeyError(f"{self.describe()} has no array {name!r}; it has {self.names}")
        try:
            data = np.asarray(self.group[name][...])
        except Exception as exc:  # codec errors, missing metadata: any failure to decode
            raise DamagedArtifactError(
                f"{self.describe()}: array {name!r} cannot be read ({exc}); {REPAIR_HINT}"
            ) from exc
        if array_checksum(data) != self.attrs["checksums"][name]:
            raise DamagedArtifactError(
                f"{self.describe()}: array {name!r} does not match the checksum taken when it "
                f"was published (a chunk is missing or altered); {REPAIR_HINT}"
            )
        return data

    def verify(self) -> list[str]:
        """Problems found by reading every array in full; empty when the artifact is sound."""
        problems = []
        for name in self.attrs["checksums"]:
            try:
                self.array(name)
            except DamagedArtifactError as err:
                problems.append(str(err).split(": ", 1)[-1].split("; run")[0])
        return problems


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
        """True for a complete artifact; unfinished groups count as absent.

        A complete artifact whose files are missing, resized or whose attributes were altered is
        an error (DamagedArtifactError), never silently absent or present.
        """
        return self._open(stage, digest) is not None

    def get(self, stage: str, digest: str) -> Artifact:
        artifact = self._open(stage, digest)
        if artifact is None:
            raise FileNotFoundError(
                f"no complete artifact {stage}/{digest} in store {self.root!r} (never written, or "
                "moved aside by `ucad store verify --repair`): the next add-task on a model that "
                "names it computes it again"
            )
        return artifact

    def put(
        self,
        stage: str,
        digest: str,
        arrays: Mapping[str, Any],
        attrs: Mapping[str, Any] | None = None,
    ) -> Artifact:
        """Publish a stage output, or return the existing one with this digest.

        ``attrs`` is the caller's JSON-serialisable provenance (config, inputs, code version, small
        metadata); the store adds stage, digest, creation time, library versions, a checksum of
        each array, the size of each file, a checksum of the attributes and the marker.
        Racing writers of one digest are safe: one publishes, the others return its artifact.
        """
        final = self._final(stage, digest)
        if self._open(stage, digest) is not None:
            return self.get(stage, digest)
        checked = {validate_name(n, "array name"): numeric_array(n, a) for n, a in arrays.items()}
        checksums = {name: array_checksum(array) for name, array in checked.items()}
        attributes = {**user_attrs(attrs), **provenance(stage, digest), "checksums": checksums}
        tmp = self._join(".tmp", f"{stage}-{digest}-{owner()}-{uuid.uuid4().hex[:8]}.zarr")
        try:
            group = zarr.create_group(store=self._zarr_store(tmp), attributes=attributes)
            for name, array in checked.items():
                _write_array(group, name, array)
            sealed = {**attributes, "files": self._file_sizes(tmp), "complete": True}
            # written last: only a finished group carries the marker
            group.attrs.update({**sealed, "attrs_sha256": attrs_checksum(sealed)})
            self._publish(tmp, final)
        finally:
            if self._fs.exists(tmp):
                self._fs.rm(tmp, recursive=True)
        return self.get(stage, digest)

    def artifacts(self, stage: str | None = None) -> list[tuple[str, str]]:
        """(stage, digest) of every published artifact (damaged ones included), sorted."""
        stages = [validate_name(stage, "stage name")] if stage else self._children("stages")
        return [
            (s, name[: -len(".zarr")])
            for s in stages
            for name in self._children("stages", s)
            if name.endswith(".zarr")
            and self._open_complete(self._join("stages", s, name)) is not None
        ]

    def check(self, stage: str, digest: str, full: bool = True) -> list[str]:
        """What is wrong with an artifact: empty when it is sound.

        The files, their sizes and the attributes are checked always; with `full`, every array
        is also read and compared with its checksum.
        """
        if not self._fs.exists(self._final(stage, digest)):
            return ["missing"]
        try:
            artifact = self._open(stage, digest)
        except DamagedArtifactError as err:
            return [str(err).split(": ", 1)[-1].split("; run")[0]]
        if artifact is None:
            return ["unfinished (no completion marker)"]
        return artifact.verify() if full else []

    def artifact_location(self, stage: str, digest: str) -> str:
        return self._url(self._final(stage, digest))

    def quarantine(self, stage: str, digest: str) -> str:
        """Move an artifact to damaged/ so the next run that needs it computes it again."""
        final = self._final(stage, digest)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        target = self._join("damaged", stage, f"{digest}-{stamp}-{uuid.uuid4().hex[:6]}.zarr")
        self._move(final, target)
        return self._url(target)

    def remove(self, stage: str, digest: str) -> None:
        """Delete an artifact: moved aside first, so no reader ever sees half of it."""
        trash = self._join(".tmp", f"discard-{owner()}-{uuid.uuid4().hex[:8]}")
        self._move(self._final(stage, digest), trash)
        self._fs.rm(trash, recursive=True)

    def temporaries(self) -> list[Temporary]:
        """Writes in progress or left behind by killed runs: .tmp/ entries and manifest temps."""
        found = []
        for name in self._children_all(".tmp"):
            found.append(self._temporary(self._join(".tmp", name), name))
        for model in self._children("models"):
            for name in self._children_all("models", model):
                if name.startswith(".") and name.endswith(".tmp"):
                    found.append(self._temporary(self._join("models", model, name), name[1:]))
        return found

    def remove_temporary(self, temporary: Temporary) -> None:
        self._fs.rm(temporary.path, recursive=True)

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
        return versions

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
        return sorted(n for n in names if NAME.fullmatch(n))

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

    def _open(self, stage: str, digest: str) -> Artifact | None:
        """The published artifact after the cheap checks (files, sizes, attributes), or None."""
        path = self._final(stage, digest)
        group = self._open_complete(path)
        if group is None:
            return None
        attrs = group.attrs.asdict()
        artifact = Artifact(stage, digest, self._url(path), attrs, group)
        problem = seal_problem(attrs) or files_problem(attrs["files"], self._file_sizes(path))
        if problem:
            raise DamagedArtifactError(f"{artifact.describe()}: {problem}; {REPAIR_HINT}")
        return artifact

    def _file_sizes(self, path: str) -> dict[str, int]:
        """Relative name -> size of every file of a group but its root metadata (which holds
        these sizes itself)."""
        found = self._fs.find(path, detail=True)
        prefix = path.rstrip("/") + "/"
        sizes = {p[len(prefix) :]: int(info["size"]) for p, info in found.items()}
        sizes.pop(ROOT_METADATA, None)
        return sizes

    def _move(self, source: str, target: str) -> None:
        if not self._fs.exists(source):
            raise FileNotFoundError(f"{self._url(source)}: no such artifact")
        if self._local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(source, target)
        else:
            self._fs.mv(source, target, recursive=True)

    def _children_all(self, *parts: str) -> list[str]:
        """Every name directly under ``parts``, hidden ones included."""
        try:
            entries = self._fs.ls(self._join(*parts), detail=False)
        except FileNotFoundError:
            return []
        return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)

    def _temporary(self, path: str, name: str) -> Temporary:
        try:
            modified = self._fs.modified(path).timestamp()
        except (OSError, NotImplementedError):
            modified = None
        return Temporary(self._url(path) if not self._local else path, name, modified)

    def _publish(self, tmp: str, final: str) -> None:
        if self._local:
            self._publish_by_rename(tmp, final)
        else:
            self._publish_by_copy(tmp, final)

    def _publish_by_rename(self, tmp: str, final: str) -> None:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        fsync_tree(tmp)  # contents on disk before the rename makes them visible
        if os.path.exists(final) and self._open_complete(final) is None:
            # An unfinished group at the final path is never trusted. Move it aside atomically
            # before deleting, so a concurrent publish never sees a half-deleted group there.
            trash = self._join(".tmp", f"discard-{owner()}-{uuid.uuid4().hex[:8]}")
            os.rename(final, trash)
            self._fs.rm(trash, recursive=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if self._open_complete(final) is None:
                raise
            # Another writer published this digest first; its artifact is equivalent to ours.
        fsync_dir(os.path.dirname(final))  # the rename itself survives a power cut

    def _publish_by_copy(self, tmp: str, final: str) -> None:
        # Overwrite key by key (each object write is atomic) and never delete at the final path,
        # so racing writers of one digest cannot remove each other's chunks.
        marker = f"{tmp}/zarr.json"
        for source in sorted(self._fs.find(tmp), key=lambda p: p == marker):
            self._fs.copy(source, final + source[len(tmp) :])


def _write_array(group: zarr.Group, name: str, array: np.ndarray) -> None:
    # Every chunk gets a key, even all-fill ones, so a group republished over an unfinished one
    # (remote copy) never keeps a stale chunk from the earlier attempt.
    group.create_array(name, data=array, config={"write_empty_chunks": True})
