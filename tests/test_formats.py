"""The `visa` and `folder` dataset layouts end to end (README, "Datasets").

The same images laid out as VisA (split CSV) and as plain folders, with and without masks, are
benchmarked like the MVTec-layout original: the readers must hand the pipeline the same images,
labels and masks, so every figure is the same; without masks the pixel figures are null.
"""

import csv
import json
import shutil
from pathlib import Path

import pytest

from ucad.cli import main
from ucad.data.synth import generate
from ucad.metrics import METRICS

TINY = {"epochs": 1, "key_size": 16, "knowledge_size": 32, "image_size": 64}
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "aupro")


def mvtec_files(root: Path, name: str):
    """(training images, [(defect, image, mask or None)]) of one MVTec-layout class."""
    train = sorted((root / name / "train" / "good").glob("*.png"))
    test = []
    for image in sorted((root / name / "test").glob("*/*.png")):
        defect = image.parent.name
        mask = root / name / "ground_truth" / defect / f"{image.stem}_mask.png"
        test.append((defect, image, None if defect == "good" else mask))
    return train, test


def as_visa(source: Path, out: Path, names: list[str]) -> Path:
    """VisA: every image under <class>/Data/Images/{Normal,Anomaly}/, masks under
    <class>/Data/Masks/Anomaly/, the split in split_csv/1cls.csv."""
    rows = []
    for name in names:
        train, test = mvtec_files(source, name)
        images, masks = Path(name) / "Data" / "Images", Path(name) / "Data" / "Masks"
        for image in train:
            target = images / "Normal" / f"train_{image.name}"
            rows.append([name, "train", "normal", target, ""])
            _copy(image, out / target)
        for defect, image, mask in test:
            if mask is None:
                target = images / "Normal" / f"test_{image.name}"
                rows.append([name, "test", "normal", target, ""])
            else:
                target = images / "Anomaly" / f"{defect}_{image.name}"
                rows.append([name, "test", "anomaly", target, masks / "Anomaly" / target.name])
                _copy(mask, out / rows[-1][-1])
            _copy(image, out / target)
    (out / "split_csv").mkdir(parents=True)
    with (out / "split_csv" / "1cls.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["object", "split", "label", "image", "mask"], *rows])
    return out


def as_folder(source: Path, out: Path, names: list[str], masks: bool) -> Path:
    """Plain folders: <class>/train/*, <class>/test/<defect>/*, masks/<defect>/<stem>.png."""
    for name in names:
        train, test = mvtec_files(source, name)
        for image in train:
            _copy(image, out / name / "train" / image.name)
        for defect, image, mask in test:
            _copy(image, out / name / "test" / defect / image.name)
            if masks and mask is not None:
                _copy(mask, out / name / "masks" / defect / f"{image.stem}.png")
    return out


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)


def benchmark(data: Path, layout: str, store: Path, out: Path) -> dict:
    args = ["-q", "benchmark", "--data", str(data), "--format", layout, "--json", str(out)]
    args += ["--preset", "smoke", "--store", str(store), "--no-tracking"]
    assert main(args + [f"--set={k}={v}" for k, v in TINY.items()]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, dict]:
    """The benchmark of one tiny two-class dataset in each layout."""
    root = tmp_path_factory.mktemp("formats")
    names = sorted(
        generate(root / "mvtec", classes=2, train=4, test_good=2, test_defect=3, size=64)
    )
    data = {
        "mvtec": root / "mvtec",
        "visa": as_visa(root / "mvtec", root / "visa", names),
        "folder": as_folder(root / "mvtec", root / "folder", names, masks=True),
        "folder without masks": as_folder(root / "mvtec", root / "bare", names, masks=False),
    }
    return {
        layout: benchmark(path, layout.split()[0], root / "store", root / f"{i}.json")
        for i, (layout, path) in enumerate(data.items())
    }


def assert_same_figures(got: dict, want: dict, metric: str) -> None:
    """Every entry (t, j <= t) and the final figure of `metric`, to float32 rounding."""
    for t, row in enumerate(want["matrix"][metric]):
        for j, value in enumerate(row[: t + 1]):
            assert value is not None, (metric, t, j)
            assert got["matrix"][metric][t][j] == pytest.approx(value, abs=1e-6), (metric, t, j)
    assert got["final"][metric] == pytest.approx(want["final"][metric], abs=1e-6), metric


@pytest.mark.parametrize("layout", ["visa", "folder"])
def test_visa_and_folder_layouts_give_the_figures_of_the_same_images_as_mvtec(layouts, layout):
    mvtec, other = layouts["mvtec"], layouts[layout]
    assert other["tasks"] == mvtec["tasks"] and len(other["tasks"]) == 2
    for metric in METRICS:
        assert_same_figures(other, mvtec, metric)


def test_folder_without_masks_reports_image_figures_and_null_pixel_figures(layouts):
    mvtec, bare = layouts["mvtec"], layouts["folder without masks"]
    assert bare["tasks"] == mvtec["tasks"]
    for metric in METRICS:
        if metric in PIXEL_METRICS:
            assert bare["matrix"][metric] == [[None, None], [None, None]], metric
            assert bare["final"][metric] is None and bare["forgetting"][metric] is None
        else:
            assert_same_figures(bare, mvtec, metric)
