"""A model version: the typed manifest every reader shares, validated when it is read.

A model version is one JSON file, ``models/<name>/v0003.json``, written once and never changed.
It names, per class in the order learned, where the class's data is and the digests of its
stage artifacts, plus the config the model was built with. Every reader (continual learning,
evaluation, inference, tracking, the benchmark) gets a `ModelVersion`, never the raw JSON, so a
damaged or hand-edited manifest is refused at the door with the file and the field named.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from ucad import __version__
from ucad.config import Config
from ucad.data.source import TaskSource
from ucad.store import ArtifactStore, validate_name

Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
Name = Annotated[str, AfterValidator(lambda value: validate_name(value, "class name"))]
Threshold = Annotated[float, Field(strict=True, allow_inf_nan=False)]

# The stages whose artifacts make up one learned class, in the order they are computed.
CLASS_STAGES = ("structure", "keys", "prompts", "knowledge", "calibrate")


class TaskEntry(BaseModel):
    """One learned class: its data and the digests of its stage artifacts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Name
    data: TaskSource
    structure: Digest
    keys: Digest
    prompts: Digest
    knowledge: Digest
    calibrate: Digest
    threshold: Threshold  # decision threshold from the calibrate stage

    def digests(self) -> dict[str, str]:
        """Stage name -> digest of every artifact this class is made of."""
        return {stage: getattr(self, stage) for stage in CLASS_STAGES}


class ModelVersion(BaseModel):
    """One version of a model: classes 0..t in the order learned, and the config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Name
    version: int = Field(ge=1)
    tasks: list[TaskEntry] = Field(min_length=1)
    config: Config
    created_utc: str
    ucad_version: str

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    @property
    def ref(self) -> str:
        return f"{self.model}@{self.version}"

    def find(self, name: str) -> TaskEntry | None:
        return next((task for task in self.tasks if task.name == name), None)

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def next_version(
    model: str, previous: ModelVersion | None, entry: TaskEntry, config: Config
) -> ModelVersion:
    """The version after `previous` (None: the first): its classes, then `entry`."""
    tasks = list(previous.tasks) if previous else []
    if any(task.name == entry.name for task in tasks):
        # Another run added this class between our read and our write.
        raise ValueError(
            f"class {entry.name!r} was added to model {model!r} by another run meanwhile; "
            "run the request again to see that version"
        )
    return ModelVersion(
        model=model,
        version=(previous.version if previous else 0) + 1,
        tasks=[*tasks, entry],
        config=config,
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        ucad_version=__version__,
    )


class ManifestError(ValueError):
    """A model manifest that fails validation: the message names the file and the field."""


def parse_version(data: Any, name: str, version: int, where: str) -> ModelVersion:
    """Validate the JSON of `name` version `version` (read from `where`)."""
    try:
        manifest = ModelVersion.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in err.errors()
        )
        raise ManifestError(f"{where}: invalid model manifest: {problems}") from None
    if manifest.version != version:
        raise ManifestError(
            f"{where}: the manifest says version {manifest.version}, its file name says "
            f"{version}; the file name is the version"
        )
    if manifest.model != name:
        raise ManifestError(f"{where}: the manifest says model {manifest.model!r}, not {name!r}")
    names = manifest.task_names
    if len(set(names)) != len(names):
        raise ManifestError(f"{where}: a class appears twice in tasks: {', '.join(names)}")
    return manifest


def load_version(store: ArtifactStore, name: str, version: int | None = None) -> ModelVersion:
    """Model `name` at `version` (None: the latest), validated."""
    versions = store.model_versions(name)
    version = versions[-1] if version is None and versions else version
    data = store.read_model(name, version)
    return parse_version(data, name, version, store.model_location(name, version))


def head_version(store: ArtifactStore, name: str) -> ModelVersion | None:
    """The latest version of `name`, or None for a new model."""
    return load_version(store, name) if store.model_versions(name) else None


def append_version(
    store: ArtifactStore, model: str, entry: TaskEntry, config: Config
) -> ModelVersion:
    """Write the version after the head of `model` with `entry` added; return it.

    If another run writes a version first, the new head is read (and validated) again.
    """

    def build(previous: dict[str, Any] | None) -> dict[str, Any]:
        head = None
        if previous is not None:  # the head of the moment: validated like every manifest read
            number = previous.get("version")
            where = store.model_location(model, number) if isinstance(number, int) else model
            head = parse_version(previous, model, number, where)
        return next_version(model, head, entry, config).as_json()

    return load_version(store, model, store.append_model(model, build))
