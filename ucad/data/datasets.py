"""Dataset readers: a dataset folder and a class name in, a :class:`TaskData` (file lists) out.

Readers only list and check files; pixels are read by :mod:`ucad.data.images`.
Image files are recognised by extension: .png .jpg .jpeg .bmp .tif .tiff (any case).
Hidden files and folders (names starting with ".") are ignored.

MVTec AD (``format="mvtec"``)::

    <root>/<class>/train/good/*                       normal training images
    <root>/<class>/test/good/*                        normal test images
    <root>/<class>/test/<defect>/*                    anomalous test images
    <root>/<class>/ground_truth/<defect>/<stem>_mask.png   one mask per anomalous image

VisA (``format="visa"``): the split CSV (default ``<root>/split_csv/1cls.csv``) is the
authority. Columns ``object,split,label,image,mask``; split is train/test, label
normal/anomaly, image and mask are paths relative to ``<root>`` (mask empty for normal
images). Anomalies get the defect type "anomaly".

Plain folders (``format="folder"``), for your own data::

    <root>/<class>/train/*                            normal training images
    <root>/<class>/test/good/*                        normal test images
    <root>/<class>/test/<defect>/*                    anomalous test images
    <root>/<class>/masks/<defect>/<stem>.png          optional masks (or <stem>_mask.png)

Folder masks are all or nothing per class: without a ``masks`` folder, anomalous samples
carry ``mask=None`` and only image-level metrics can be computed; with one, every anomalous
image needs its mask.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
FORMATS = ("mvtec", "visa", "folder")
DatasetFormat = Literal["mvtec", "visa", "folder"]
NORMAL = "good"
_VISA_COLUMNS = ("object", "split", "label", "image", "mask")


@dataclass(frozen=True)
class TestSample:
    """One test image with its ground truth."""

    __test__ = False  # not a pytest test class

    image: Path
    label: int  # 0 normal, 1 anomalous
    mask: Path | None  # None for normal images (and anomalies of a folder dataset without masks)
    defect: str  # "good" for normal images, else the defect type


@dataclass(frozen=True)
class TaskData:
    """The files of one task (class): normal training images and labelled test images."""

    name: str
    train: tuple[Path, ...]  # sorted
    test: tuple[TestSample, ...]  # sorted by image path


def _check_name(task: str) -> None:
    """Class names are plain folder names; anything else could read outside the dataset."""
    if (
        not isinstance(task, str)
        or not task.strip()
        or task.startswith(".")
        or "/" in task
        or "\\" in task
        or Path(task).is_absolute()
    ):
        raise ValueError(f"invalid class name {task!r}: expected a plain folder name")


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown dataset format {format!r}; use one of {', '.join(FORMATS)}")


def _check_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    return root


def _entries(folder: Path) -> list[Path]:
    """Visible entries of ``folder``, sorted; a missing folder is an error."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return [p for p in _entries(folder) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]


def _train_images(folder: Path) -> tuple[Path, ...]:
    images = _images(folder)
    if not images:
        raise ValueError(f"{folder}: no training images (extensions {sorted(IMAGE_EXTENSIONS)})")
    return tuple(images)


def _test_samples(
    test_dir: Path, find_mask: Callable[[str, Path], Path | None]
) -> tuple[TestSample, ...]:
    """Samples from ``test/good`` and ``test/<defect>`` folders, sorted by path."""
    samples = []
    for defect_dir in (d for d in _entries(test_dir) if d.is_dir()):
        defect = defect_dir.name
        for image in _images(defect_dir):
            if defect == NORMAL:
                samples.append(TestSample(image, 0, None, NORMAL))
            else:
                samples.append(TestSample(image, 1, find_mask(defect, image), defect))
    if not samples:
        raise ValueError(f"{test_dir}: no test images in its good/ or <defect>/ folders")
    return tuple(sorted(samples, key=lambda s: s.image))


def _class_folders(root: Path) -> list[str]:
    return [d.name for d in _entries(root) if (d / "train").is_dir()]


def _class_dir(root: str | Path, task: str, format: DatasetFormat) -> Path:
    _check_name(task)
    root = _check_root(root)
    if not (root / task).is_dir():
        available = ", ".join(_class_folders(root)) or "none"
        raise ValueError(f"unknown class {task!r} in {root} ({format}); available: {available}")
    return root / task


def read_mvtec(root: str | Path, task: str) -> TaskData:
    """Read one MVTec AD class; every anomalous test image must have its mask."""
    class_dir = _class_dir(root, task, "mvtec")

    def find_mask(defect: str, image: Path) -> Path:
        mask = class_dir / "ground_truth" / defect / f"{image.stem}_mask.png"
        if not mask.is_file():
            raise FileNotFoundError(f"{image}: anomalous test image has no mask; expected {mask}")
        return mask

    return TaskData(
        name=task,
        train=_train_images(class_dir / "train" / NORMAL),
        test=_test_samples(class_dir / "test", find_mask),
    )


def read_folder(root: str | Path, task: str) -> TaskData:
    """Read one class of the plain folder layout (see the module docstring)."""
    class_dir = _class_dir(root, task, "folder")
    masks_dir = class_dir / "masks"

    def find_mask(defect: str, image: Path) -> Path | None:
        if not masks_dir.is_dir():
            return None
        candidates = [masks_dir / defect / f"{image.stem}{s}.png" for s in ("", "_mask")]
        for mask in candidates:
            if mask.is_file():
                return mask
        raise FileNotFoundError(
            f"{image}: anomalous test image has no mask; expected {candidates[0]} or "
            f"{candidates[1]} (masks are required for all anomalous images once {masks_dir} exists)"
        )

    return TaskData(
        name=task,
        train=_train_images(class_dir / "train"),
        test=_test_samples(class_dir / "test", find_mask),
    )


def _visa_csv(root: Path, split_csv: str | Path | None) -> Path:
    path = Path(split_csv) if split_csv is not None else root / "split_csv" / "1cls.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: VisA split CSV not found")
    return path


def _visa_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` pairs of a VisA split CSV, stripped and checked."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; expected {list(_VISA_COLUMNS)}")
        rows = []
        for row in reader:
            row = {c: (row[c] or "").strip() for c in _VISA_COLUMNS}
            line = reader.line_num
            if row["split"] not in ("train", "test"):
                raise ValueError(
                    f"{path}:{line}: split must be train or test, got {row['split']!r}"
                )
            if row["label"] not in ("normal", "anomaly"):
                raise ValueError(
                    f"{path}:{line}: label must be normal or anomaly, got {row['label']!r}"
                )
            rows.append((line, row))
    return rows


def _visa_file(root: Path, relative: str, where: str) -> Path:
    path = root / relative
    if not relative or not path.is_file():
        raise FileNotFoundError(f"{where}: file {path} not found")
    return path


def _visa_sample(root: Path, row: dict[str, str], where: str) -> TestSample:
    image = _visa_file(root, row["image"], where)
    if row["label"] == "normal":
        return TestSample(image, 0, None, NORMAL)
    if not row["mask"]:
        raise ValueError(f"{where}: anomalous image {image} has no mask in the CSV")
    return TestSample(image, 1, _visa_file(root, row["mask"], where), "anomaly")


def read_visa(root: str | Path, task: str, split_csv: str | Path | None = None) -> TaskData:
    """Read one VisA class as listed in the split CSV (see the module docstring)."""
    _check_name(task)
    root = _check_root(root)
    csv_path = _visa_csv(root, split_csv)
    rows = _visa_rows(csv_path)
    available = sorted({row["object"] for _, row in rows})
    if task not in available:
        raise ValueError(
            f"unknown class {task!r} in {csv_path} (visa); available: {', '.join(available)}"
        )
    train, test = [], []
    for line, row in rows:
        if row["object"] != task:
            continue
        where = f"{csv_path}:{line}"
        if row["split"] == "test":
            test.append(_visa_sample(root, row, where))
        elif row["label"] == "normal":
            train.append(_visa_file(root, row["image"], where))
        else:
            raise ValueError(f"{where}: training images must be normal, got an anomaly")
    if not train:
        raise ValueError(f"{csv_path}: no training images for class {task!r}")
    if not test:
        raise ValueError(f"{csv_path}: no test images for class {task!r}")
    return TaskData(task, tuple(sorted(train)), tuple(sorted(test, key=lambda s: s.image)))


def list_tasks(
    root: str | Path, format: DatasetFormat, split_csv: str | Path | None = None
) -> list[str]:
    """Class names of a dataset, sorted alphabetically (the default task order).

    MVTec and folder datasets: the folders of ``root`` that have a ``train`` folder.
    VisA: the objects of the split CSV.
    """
    _check_format(format)
    root = _check_root(root)
    if format == "visa":
        csv_path = _visa_csv(root, split_csv)
        tasks = sorted({row["object"] for _, row in _visa_rows(csv_path)})
        where = str(csv_path)
    else:
        _no_split_csv(format, split_csv)
        tasks = _class_folders(root)
        where = f"{root} (expected <root>/<class>/train/)"
    if not tasks:
        raise ValueError(f"no classes found in {where} for format {format!r}")
    return tasks


def _no_split_csv(format: str, split_csv: str | Path | None) -> None:
    if split_csv is not None:
        raise ValueError(f"split_csv is only used by the visa format, not {format!r}")


def read_task(
    root: str | Path, task: str, format: DatasetFormat, split_csv: str | Path | None = None
) -> TaskData:
    """Read one class of a dataset in the given format."""
    _check_format(format)
    if format == "visa":
        return read_visa(root, task, split_csv)
    _no_split_csv(format, split_csv)
    return read_mvtec(root, task) if format == "mvtec" else read_folder(root, task)
