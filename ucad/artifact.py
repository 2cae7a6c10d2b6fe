"""One published stage output of the artifact store (`ucad.store`), read back and verified.

`ArtifactStore.get` hands out an `Artifact` after the cheap checks (files, sizes, attributes);
its arrays are read on demand and each one is compared with the checksum taken when it was
published, so a missing, truncated or altered chunk is a `DamagedArtifactError`, never data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import zarr

from ucad.digests import array_checksum

REPAIR_HINT = (
    "run `ucad store verify --repair` to move it aside; "
    "the next run that needs it computes it again"
)


class DamagedArtifactError(OSError):
    """A published artifact whose files, attributes or array contents are not what was published."""


def problem_of(err: DamagedArtifactError) -> str:
    """What a damage error says is wrong, without the artifact's name or the repair hint."""
    return str(err).split(": ", 1)[-1].split("; run")[0]


@dataclass(frozen=True)
class Artifact:
    """One complete stage output; arrays are read on demand and checked against their checksums."""

    stage: str
    digest: str
    path: str
    attrs: dict[str, Any]
    open_group: Callable[[], zarr.Group] = field(repr=False, compare=False)

    @cached_property
    def group(self) -> zarr.Group:
        """The Zarr group, opened at the first use: a lookup needs only `attrs`."""
        return self.open_group()

    def describe(self) -> str:
        task = self.attrs.get("task")
        of = f" of class {task!r}" if task else ""
        return f"{self.stage} artifact{of}, digest {self.digest} ({self.path})"

    @property
    def names(self) -> list[str]:
        """Its arrays, as published (each has a checksum)."""
        return sorted(self.attrs["checksums"])

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
                problems.append(problem_of(err))
        return problems
