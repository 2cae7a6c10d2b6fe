"""Where one class's data lives, and what it is by content.

A model version records, per class, the dataset root, its format and fingerprints of the training
and test files. Stages name their inputs by these fingerprints, so a moved dataset keeps its
artifacts and a changed file never reuses them.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ucad.data.datasets import DatasetFormat, TaskData, read_task
from ucad.digests import fingerprint_files


class DataUnavailableError(FileNotFoundError):
    """A class's recorded data cannot be read any more, or its files have changed."""


def evaluation_files(data: TaskData) -> list[Path]:
    """The files a test set is: its images and its masks."""
    return [s.image for s in data.test] + [s.mask for s in data.test if s.mask]


class TaskSource(BaseModel):
    """One class of a dataset, by location and by content."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    root: str
    format: DatasetFormat
    train: str  # fingerprint of the training images
    test: str  # fingerprint of the test images and masks

    @classmethod
    def from_data(cls, root: str | Path, data_format: DatasetFormat, data: TaskData) -> TaskSource:
        return cls(
            name=data.name,
            root=os.path.abspath(root),  # flow runs and commands may start in other folders
            format=data_format,
            train=fingerprint_files(data.train, root),
            test=fingerprint_files(evaluation_files(data), root),
        )

    @property
    def label(self) -> str:
        """How runs name work on this class (Prefect task runs, log lines)."""
        return self.name

    def same_content(self, other: TaskSource) -> bool:
        """Same files by content; where the dataset lives may have changed."""
        return (self.format, self.train, self.test) == (other.format, other.train, other.test)

    def read(self, split: str) -> TaskData:
        """The class's data, verified by content: its `split` files must be those recorded.

        Earlier classes' data may be gone (or replaced) by the time a later class is learned;
        computing on other files under the recorded fingerprint would corrupt the store.
        """
        try:
            data = read_task(self.root, self.name, self.format)
        except (OSError, ValueError) as err:
            raise DataUnavailableError(
                f"class {self.name!r}: its data cannot be read: {err}"
            ) from err
        files = data.train if split == "train" else evaluation_files(data)
        if fingerprint_files(files, self.root) != getattr(self, split):
            raise DataUnavailableError(
                f"class {self.name!r}: the {split} files under {self.root} have changed since "
                "the class was learned"
            )
        return data
