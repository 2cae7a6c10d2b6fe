from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ucad.data.datasets import (
    TaskData,
    TestSample,
    list_tasks,
    read_folder,
    read_mvtec,
    read_task,
    read_visa,
)
from ucad.data.images import Geometry, load_test_set


def image(path: Path, size: tuple[int, int] = (40, 40), value: int = 128) -> Path:
    """Write an RGB image of ``size`` = (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)
    return path


def mask(path: Path, size: tuple[int, int] = (40, 40), value: int = 255) -> Path:
    """Write a mask whose top half is ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    array[: size[1] // 2] = value
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def mvtec(tmp_path) -> Path:
    root = tmp_path / "mvtec"
    for cls in ("screw", "bottle"):
        image(root / cls / "train" / "good" / "001.png")
        image(root / cls / "train" / "good" / "000.PNG")
        image(root / cls / "test" / "good" / "000.png")
        image(root / cls / "test" / "broken" / "000.jpg")
        mask(root / cls / "ground_truth" / "broken" / "000_mask.png")
    (root / "bottle" / "train" / "good" / "notes.txt").write_text("not an image")
    (root / "bottle" / "train" / "good" / ".hidden.png").write_bytes(b"")
    (root / "license.txt").write_text("a file at the root is not a class")
    (root / "empty_dir").mkdir()
    return root


def test_read_mvtec(mvtec):
    task = read_mvtec(mvtec, "bottle")
    good = mvtec / "bottle" / "train" / "good"
    assert task == TaskData(
        name="bottle",
        train=(good / "000.PNG", good / "001.png"),
        test=(
            TestSample(
                mvtec / "bottle/test/broken/000.jpg",
                1,
                mvtec / "bottle/ground_truth/broken/000_mask.png",
                "broken",
            ),
            TestSample(mvtec / "bottle/test/good/000.png", 0, None, "good"),
        ),
    )


def test_list_tasks_is_sorted_and_skips_non_classes(mvtec):
    assert list_tasks(mvtec, "mvtec") == ["bottle", "screw"]


def test_list_tasks_without_classes(tmp_path):
    with pytest.raises(ValueError, match="no classes found"):
        list_tasks(tmp_path, "mvtec")
    with pytest.raises(FileNotFoundError, match="missing"):
        list_tasks(tmp_path / "missing", "folder")


def test_mvtec_missing_mask_names_expected_path(mvtec):
    (mvtec / "screw" / "ground_truth" / "broken" / "000_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"screw/ground_truth/broken/000_mask.png"):
        read_mvtec(mvtec, "screw")


def test_mvtec_empty_train_folder(mvtec):
    for path in (mvtec / "screw" / "train" / "good").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match=r"screw/train/good: no training images"):
        read_mvtec(mvtec, "screw")


def test_mvtec_without_test_images(mvtec):
    for folder in ("good", "broken"):
        for path in (mvtec / "screw" / "test" / folder).iterdir():
            path.unlink()
    with pytest.raises(ValueError, match="no test images"):
        read_mvtec(mvtec, "screw")


@pytest.mark.parametrize("name", ["", " ", ".", "..", "../screw", "a/b", "a\\b", "/abs", ".hid"])
def test_bad_class_names(mvtec, name):
    with pytest.raises(ValueError, match="invalid class name"):
        read_task(mvtec, name, "mvtec")


def test_unknown_class_lists_available(mvtec):
    with pytest.raises(ValueError, match=r"unknown class 'cable'.*available: bottle, screw"):
        read_task(mvtec, "cable", "mvtec")


def test_unknown_format(mvtec):
    with pytest.raises(ValueError, match="unknown dataset format 'coco'"):
        read_task(mvtec, "bottle", "coco")
    with pytest.raises(ValueError, match="unknown dataset format"):
        list_tasks(mvtec, "coco")


def test_split_csv_only_for_visa(mvtec):
    with pytest.raises(ValueError, match="split_csv"):
        read_task(mvtec, "bottle", "mvtec", split_csv=mvtec / "x.csv")


# --- VisA --------------------------------------------------------------------------------

VISA_HEADER = "object,split,label,image,mask\n"


@pytest.fixture
def visa(tmp_path) -> Path:
    """Two VisA classes with non-square JPGs and 0/1-valued PNG masks."""
    root = tmp_path / "visa"
    lines = [VISA_HEADER]
    for cls in ("pcb1", "candle"):
        images = root / cls / "Data" / "Images"
        for i in range(2):
            image(images / "Normal" / f"{i:04d}.JPG", size=(78, 50))
            lines.append(f"{cls},train,normal,{cls}/Data/Images/Normal/{i:04d}.JPG,\n")
        image(images / "Normal" / "0100.JPG", size=(78, 50))
        lines.append(f"{cls},test,normal,{cls}/Data/Images/Normal/0100.JPG,\n")
        image(images / "Anomaly" / "000.JPG", size=(78, 50))
        mask(root / cls / "Data" / "Masks" / "Anomaly" / "000.png", size=(78, 50), value=1)
        lines.append(
            f"{cls},test,anomaly,{cls}/Data/Images/Anomaly/000.JPG,"
            f"{cls}/Data/Masks/Anomaly/000.png\n"
        )
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("".join(lines))
    return root


def test_read_visa(visa):
    task = read_task(visa, "candle", "visa")
    images = visa / "candle" / "Data" / "Images"
    assert task.train == (images / "Normal" / "0000.JPG", images / "Normal" / "0001.JPG")
    assert task.test == (
        TestSample(
            images / "Anomaly" / "000.JPG",
            1,
            visa / "candle" / "Data" / "Masks" / "Anomaly" / "000.png",
            "anomaly",
        ),
        TestSample(images / "Normal" / "0100.JPG", 0, None, "good"),
    )
    assert list_tasks(visa, "visa") == ["candle", "pcb1"]


def test_visa_test_set_through_geometry(visa):
    # 78x50 -> shorter side 32: 49x32 (int(32 * 1.56)), center crop 32 -> cols 8..40 (round 8.5).
    test = load_test_set(read_visa(visa, "pcb1").test, Geometry(resize=32, crop=32))
    assert test.images.shape == (2, 32, 32, 3)
    assert test.labels.tolist() == [1, 0]
    expected = np.zeros((32, 32), dtype=bool)
    expected[:16] = True  # top half of the mask is defect (value 1)
    np.testing.assert_array_equal(test.masks[0], expected)
    assert not test.masks[1].any()


def test_visa_custom_split_csv_with_bom(visa, tmp_path):
    csv_path = tmp_path / "mine.csv"
    csv_path.write_text(
        "\ufeff" + VISA_HEADER + "pcb1,train,normal, pcb1/Data/Images/Normal/0000.JPG ,\n"
        "pcb1,test,normal,pcb1/Data/Images/Normal/0100.JPG,\n",
        encoding="utf-8",
    )
    task = read_visa(visa, "pcb1", split_csv=csv_path)
    assert task.train == (visa / "pcb1" / "Data" / "Images" / "Normal" / "0000.JPG",)
    assert [s.label for s in task.test] == [0]
    assert list_tasks(visa, "visa", split_csv=csv_path) == ["pcb1"]


@pytest.mark.parametrize(
    ("row", "error", "message"),
    [
        ("pcb1,val,normal,pcb1/Data/Images/Normal/0000.JPG,", ValueError, "split must be"),
        ("pcb1,test,bad,pcb1/Data/Images/Normal/0000.JPG,", ValueError, "label must be"),
        ("pcb1,test,anomaly,pcb1/Data/Images/Anomaly/000.JPG,", ValueError, "has no mask"),
        ("pcb1,test,normal,pcb1/nope.JPG,", FileNotFoundError, r"1cls.csv:\d+: file .*nope.JPG"),
        ("pcb1,train,anomaly,pcb1/Data/Images/Anomaly/000.JPG,", ValueError, "must be normal"),
    ],
)
def test_visa_bad_rows(visa, row, error, message):
    with (visa / "split_csv" / "1cls.csv").open("a") as f:
        f.write(row + "\n")
    with pytest.raises(error, match=message):
        read_visa(visa, "pcb1")


def test_visa_missing_columns(visa):
    (visa / "split_csv" / "1cls.csv").write_text("object,split,image\npcb1,train,x.JPG\n")
    with pytest.raises(ValueError, match=r"missing columns \['label', 'mask'\]"):
        read_visa(visa, "pcb1")


def test_visa_unknown_class_and_missing_csv(visa):
    with pytest.raises(ValueError, match="unknown class 'pcb9'.*candle, pcb1"):
        read_visa(visa, "pcb9")
    (visa / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(FileNotFoundError, match="1cls.csv: VisA split CSV not found"):
        read_visa(visa, "pcb1")


# --- plain folders -----------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "folder"
    image(root / "widget" / "train" / "a.bmp")
    image(root / "widget" / "train" / "b.tiff")
    image(root / "widget" / "test" / "good" / "n.png")
    image(root / "widget" / "test" / "dent" / "d1.png")
    image(root / "widget" / "test" / "dent" / "d2.jpeg")
    return root


def test_folder_without_masks(folder):
    task = read_task(folder, "widget", "folder")
    assert task.train == (folder / "widget/train/a.bmp", folder / "widget/train/b.tiff")
    assert [(s.image.name, s.label, s.mask, s.defect) for s in task.test] == [
        ("d1.png", 1, None, "dent"),
        ("d2.jpeg", 1, None, "dent"),
        ("n.png", 0, None, "good"),
    ]
    assert list_tasks(folder, "folder") == ["widget"]


def test_folder_with_masks_in_both_namings(folder):
    first = mask(folder / "widget" / "masks" / "dent" / "d1.png")
    second = mask(folder / "widget" / "masks" / "dent" / "d2_mask.png")
    task = read_folder(folder, "widget")
    assert [s.mask for s in task.test] == [first, second, None]


def test_folder_masks_all_or_nothing(folder):
    mask(folder / "widget" / "masks" / "dent" / "d1.png")
    with pytest.raises(FileNotFoundError, match=r"d2.jpeg: .*masks/dent/d2.png or .*d2_mask.png"):
        read_folder(folder, "widget")


def test_folder_train_is_flat(folder, tmp_path):
    image(tmp_path / "other" / "gadget" / "train" / "good" / "x.png")
    image(tmp_path / "other" / "gadget" / "test" / "good" / "y.png")
    with pytest.raises(ValueError, match=r"gadget/train: no training images"):
        read_folder(tmp_path / "other", "gadget")
