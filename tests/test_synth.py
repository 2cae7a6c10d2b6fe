import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ucad.data.datasets import list_tasks, read_mvtec
from ucad.data.images import Geometry, load_mask, load_test_set
from ucad.data.synth import DESIGNS, class_name, generate

SMALL = {"train": 2, "test_good": 1, "test_defect": 4, "size": 64}


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    assert generate(root, classes=2, seed=3, **SMALL) == ["stripes", "nut"]
    return root


def test_same_seed_gives_identical_files(dataset, tmp_path):
    generate(tmp_path / "again", classes=2, seed=3, **SMALL)
    assert digests(tmp_path / "again") == digests(dataset)
    generate(tmp_path / "other", classes=2, seed=4, **SMALL)
    other = digests(tmp_path / "other")
    assert other.keys() == digests(dataset).keys()
    assert other["nut/train/good/000.png"] != digests(dataset)["nut/train/good/000.png"]


def test_layout_reads_as_mvtec(dataset):
    assert list_tasks(dataset, "mvtec") == ["nut", "stripes"]
    task = read_mvtec(dataset, "stripes")
    assert len(task.train) == 2
    assert sorted(s.defect for s in task.test) == ["crack", "good", "hole", "scratch", "stain"]
    assert sorted(s.defect for s in read_mvtec(dataset, "nut").test) == [
        "good",
        "hole",
        "missing",
        "scratch",
        "stain",
    ]


def test_defect_masks_are_visible_and_good_images_have_none(dataset):
    for name in ("nut", "stripes"):
        task = read_mvtec(dataset, name)
        for sample in task.test:
            if sample.label == 0:
                assert sample.mask is None
                continue
            values = np.unique(np.asarray(Image.open(sample.mask)))
            assert set(values.tolist()) <= {0, 255}
            area = load_mask(sample.mask).mean()
            assert 0.004 <= area <= 0.2, (sample.image, area)
        test = load_test_set(task.test, Geometry(resize=64, crop=64))
        assert test.masks[test.labels == 0].sum() == 0


def test_normal_images_vary(dataset):
    first, second = (
        np.asarray(Image.open(dataset / "nut" / "train" / "good" / f"{i:03d}.png"), np.int16)
        for i in (0, 1)
    )
    assert first.shape == (64, 64, 3)
    assert np.abs(first - second).mean() > 2


def test_provenance_file(dataset):
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["seed"] == 3 and meta["classes"] == ["stripes", "nut"]
    assert meta["counts"] == {"train": 2, "test_good": 1, "test_defect": 4}
    assert meta["layout"] == "mvtec" and meta["size"] == 64


def test_class_names_unique_for_long_streams():
    names = [class_name(i) for i in range(30)]
    assert len(set(names)) == 30
    assert names[: len(DESIGNS)] == list(DESIGNS)
    assert names[len(DESIGNS)] == "stripes-2" and names[-1] == "tile-3"
    assert all(n == n.lower() for n in names)


def test_variants_are_generated(tmp_path):
    names = generate(tmp_path / "many", classes=12, train=1, test_good=1, test_defect=1, size=64)
    assert names[10:] == ["stripes-2", "nut-2"]
    base = np.asarray(Image.open(tmp_path / "many" / "nut" / "train" / "good" / "000.png"))
    variant = np.asarray(Image.open(tmp_path / "many" / "nut-2" / "train" / "good" / "000.png"))
    assert not np.array_equal(base, variant)


@pytest.mark.parametrize(
    "kwargs",
    [{"classes": 0}, {"train": 0}, {"test_defect": -1}, {"seed": -1}, {"size": 32}],
)
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate(tmp_path / "x", **kwargs)


def test_refuses_non_empty_output(tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        generate(tmp_path, classes=1)
    assert (tmp_path / "old.txt").read_text() == "keep me"


def test_rerun_with_the_same_settings_is_a_no_op(tmp_path):
    out = tmp_path / "data"
    names = generate(out, classes=1, train=2, test_good=1, test_defect=1, size=64)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert generate(out, classes=1, train=2, test_good=1, test_defect=1, size=64) == names
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    # other settings, or a dataset never finished (no dataset.json), are refused
    with pytest.raises(ValueError, match="not empty"):
        generate(out, classes=1, train=2, test_good=1, test_defect=1, size=64, seed=1)
    (out / "dataset.json").unlink()
    with pytest.raises(ValueError, match="not empty"):
        generate(out, classes=1, train=2, test_good=1, test_defect=1, size=64)
