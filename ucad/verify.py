"""`ucad store verify` and `ucad store prune`: find damage, move it aside, collect leftovers.

What is checked when (README, "A store you can trust"):
- every lookup of an artifact: its completion marker, the list and sizes of its files and the
  checksum of its attributes (a deleted or truncated chunk, an edited attribute);
- every read of an array: the array's content against its checksum (any altered byte);
- every read of a model version: the manifest's schema, and its version against its file name;
- before a version is extended: the artifacts the head names exist, and its memories read back;
- `ucad store verify`: all of the above for every artifact and every model version.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ucad.data.source import DataUnavailableError
from ucad.manifest import CLASS_STAGES, ManifestError, ModelVersion, TaskEntry, load_version
from ucad.store import ArtifactStore

log = logging.getLogger(__name__)

# Stages whose artifacts are read in full before a version is extended (small: the memories).
_READ_IN_FULL = ("keys", "prompts", "knowledge", "calibrate")
_DIGEST = re.compile(r"^[0-9a-f]{32}$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Problem:
    """One damaged thing in a store."""

    where: str  # file or folder
    detail: str
    stage: str | None = None  # set for a stage artifact, which --repair can move aside
    digest: str | None = None
    recomputable: bool | None = None  # whether the inputs to compute it again are readable

    @property
    def missing(self) -> bool:
        return self.detail.endswith(": missing")

    def __str__(self) -> str:
        note = ""
        if self.recomputable is True:
            note = " (recomputed by the next run that needs it)"
        elif self.recomputable is False:
            note = " (its class's data is no longer readable: it cannot be recomputed)"
        return f"{self.where}: {self.detail}{note}"


def version_problems(store: ArtifactStore, version: ModelVersion) -> list[Problem]:
    """What is wrong with the artifacts a model version names."""
    return [
        _artifact_problem(store, stage, digest, task, [version.ref], detail)
        for task, stage, digest, detail in _artifact_checks(store, version)
    ]


def _artifact_checks(
    store: ArtifactStore,
    version: ModelVersion,
    checked: dict[tuple[str, str], list[str]] | None = None,
) -> Iterator[tuple[TaskEntry, str, str, str]]:
    """(class, stage, digest, what is wrong) for each problem of the artifacts `version` names;
    `checked` keeps each artifact's findings, so versions naming the same one read it once."""
    checked = {} if checked is None else checked
    for task in version.tasks:
        for stage, digest in task.digests().items():
            if (stage, digest) not in checked:
                full = stage in _READ_IN_FULL
                checked[stage, digest] = store.check(stage, digest, full=full)
            for detail in checked[stage, digest]:
                yield task, stage, digest, detail


def _artifact_problem(
    store: ArtifactStore,
    stage: str,
    digest: str,
    task: TaskEntry,
    refs: list[str],
    detail: str,
) -> Problem:
    return Problem(
        store.artifact_location(stage, digest),
        f"{stage} artifact of class {task.name!r} in {', '.join(refs)}: {detail}",
        stage,
        digest,
        _readable(task),
    )


def check_version(store: ArtifactStore, version: ModelVersion) -> None:
    """Refuse to build on a version whose artifacts are missing or damaged."""
    # missing artifacts are computed again by the run (`continual.restore`); damaged ones stop it
    problems = [p for p in version_problems(store, version) if not p.missing]
    if problems:
        location = store.model_location(version.model, version.version)
        raise ValueError(
            f"model {version.ref} ({location}) names damaged artifacts, so no version is built "
            f"on it: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
            + "; run `ucad store verify --repair`, then this request again"
        )


def verify_store(store: ArtifactStore, model: str | None = None) -> list[Problem]:
    """Every problem in the store (or in one model and the artifacts it names)."""
    problems: list[Problem] = []
    named: set[tuple[str, str]] = set()
    # one problem per damaged artifact, naming every version that names it
    shared: dict[tuple[str, str, str, str], tuple[TaskEntry, list[str]]] = {}
    checked: dict[tuple[str, str], list[str]] = {}
    for name in [model] if model else store.models():
        for number in store.model_versions(name):
            try:
                version = load_version(store, name, number)
            except (ManifestError, ValueError, OSError) as err:
                problems.append(Problem(store.model_location(name, number), str(err)))
                continue
            named |= {(s, d) for task in version.tasks for s, d in task.digests().items()}
            for task, stage, digest, detail in _artifact_checks(store, version, checked):
                _, refs = shared.setdefault((stage, digest, task.name, detail), (task, []))
                refs.append(version.ref)
    for (stage, digest, _, detail), (task, refs) in shared.items():
        problems.append(_artifact_problem(store, stage, digest, task, refs, detail))
    if model is None:
        seen = {(p.stage, p.digest) for p in problems}
        for stage, digest in store.artifacts():
            if (stage, digest) in seen or (stage, digest) in named:
                continue
            for detail in store.check(stage, digest):
                where = store.artifact_location(stage, digest)
                problems.append(Problem(where, f"{stage} artifact: {detail}", stage, digest, True))
    return problems


def repair(store: ArtifactStore, problems: list[Problem]) -> list[str]:
    """Move every damaged stage artifact aside (to damaged/); returns where each went."""
    moved = []
    damaged = {(p.stage, p.digest): p for p in problems if p.stage and p.digest and not p.missing}
    for (stage, digest), problem in damaged.items():
        moved.append(store.quarantine(stage, digest))
        log.info("moved %s aside to %s", problem.where, moved[-1])
    return moved


def prune(
    store: ArtifactStore,
    older_than_s: float = 24 * 3600,
    unreferenced: bool = False,
    dry_run: bool = False,
) -> list[str]:
    """Remove what killed runs left behind and, on request, artifacts no model version needs.

    A temporary is removed when the process that wrote it is known to be gone (same host, pid
    no longer running), or, where that cannot be told (another host), when it is older than
    `older_than_s`. A live writer's temporary is never removed.
    """
    removed = []
    now = time.time()
    for temporary in store.temporaries():
        alive = temporary.writer_alive()
        stale = temporary.modified is not None and now - temporary.modified > older_than_s
        if alive is False or (alive is None and stale):
            removed.append(temporary.path)
            if not dry_run:
                store.remove_temporary(temporary)
    if unreferenced:
        for stage, digest in sorted(_unreferenced(store)):
            removed.append(store.artifact_location(stage, digest))
            if not dry_run:
                store.remove(stage, digest)
    return removed


def _unreferenced(store: ArtifactStore) -> set[tuple[str, str]]:
    """Artifacts that no model version names and that no evaluation of one could read.

    Class artifacts are kept when a version names them; evaluation artifacts (features,
    routing, scores, evaluate) when every digest and fingerprint among their inputs is kept,
    found by repeating until nothing changes (scores read routing, which reads features).
    """
    kept: set[str] = set()
    fingerprints: set[str] = set()
    for name in store.models():
        for number in store.model_versions(name):
            try:
                version = load_version(store, name, number)
            except (ManifestError, ValueError, OSError):
                continue  # a damaged manifest keeps nothing alive; verify reports it
            for task in version.tasks:
                kept |= set(task.digests().values())
                fingerprints |= {task.data.train, task.data.test}
    candidates = [(s, d) for s, d in store.artifacts() if d not in kept]
    changed = True
    while changed:
        changed = False
        for stage, digest in candidates:
            if digest in kept or stage in CLASS_STAGES:
                continue
            try:
                inputs = store.get(stage, digest).attrs.get("inputs", {})
            except (OSError, FileNotFoundError):
                continue
            values = list(_strings(inputs))
            digests = [v for v in values if _DIGEST.match(v)]
            prints = [v for v in values if _FINGERPRINT.match(v)]
            if all(d in kept for d in digests) and all(p in fingerprints for p in prints):
                kept.add(digest)
                changed = True
    return {(s, d) for s, d in candidates if d not in kept}


def _strings(value: object):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _readable(task) -> bool:
    try:
        task.data.read("train")
    except DataUnavailableError:
        return False
    return True
