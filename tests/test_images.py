import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ucad.data.datasets import TestSample
from ucad.data.images import Geometry, load_image, load_images, load_mask, load_test_set


def save(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def rgb(height: int, width: int, value: int = 0) -> np.ndarray:
    return np.full((height, width, 3), value, dtype=np.uint8)


# --- load_image --------------------------------------------------------------------------


def test_rgb_image_is_returned_unchanged(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    img = load_image(save(tmp_path / "a.png", array))
    assert img.mode == "RGB" and img.size == (50, 40)
    np.testing.assert_array_equal(np.asarray(img), array)


def test_grayscale_is_replicated_to_rgb_and_logged(tmp_path, caplog):
    gray = np.arange(40 * 40, dtype=np.uint8).reshape(40, 40)
    with caplog.at_level(logging.INFO, logger="ucad.data.images"):
        img = load_image(save(tmp_path / "g.png", gray))
    np.testing.assert_array_equal(np.asarray(img), np.stack([gray] * 3, -1))
    assert "converting L image to RGB" in caplog.text


def test_palette_image_maps_indices_to_colours(tmp_path):
    img = Image.fromarray(np.tile(np.array([0, 1], dtype=np.uint8), (40, 20)))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    assert img.mode == "P"
    img.save(tmp_path / "p.png")
    out = np.asarray(load_image(tmp_path / "p.png"))
    np.testing.assert_array_equal(out[0, :2], [[10, 20, 30], [200, 100, 50]])


def test_rgba_drops_alpha(tmp_path):
    array = np.zeros((40, 40, 4), dtype=np.uint8)
    array[..., 0], array[..., 3] = 120, 0  # fully transparent red-ish
    out = np.asarray(load_image(save(tmp_path / "a.png", array)))
    assert out.shape == (40, 40, 3)
    assert (out == [120, 0, 0]).all()


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    values = np.array([0, 257, 257 * 100, 65535] * 10, dtype=np.uint16)
    gray = np.tile(values, (40, 1))
    out = np.asarray(load_image(save(tmp_path / "deep.png", gray)))
    np.testing.assert_array_equal(out[0, :4, 0], [0, 1, 100, 255])
    assert (out[..., 0] == out[..., 2]).all()


def test_32_bit_integer_gray_is_scaled_like_16_bit(tmp_path):
    gray = np.full((40, 40), 65535 * 2, dtype=np.int32)  # above 16 bit: clipped after scaling
    gray[0, 0] = 257 * 7
    out = np.asarray(load_image(save(tmp_path / "i.tif", gray)))
    assert out[0, 0, 0] == 7 and out[1, 1, 0] == 255


def test_one_bit_image_becomes_black_and_white(tmp_path):
    bits = np.zeros((40, 40), dtype=bool)
    bits[:, 20:] = True
    Image.fromarray(bits).save(tmp_path / "b.png")
    out = np.asarray(load_image(tmp_path / "b.png"))
    assert (out[:, :20] == 0).all() and (out[:, 20:] == 255).all()


def test_float_image_is_refused(tmp_path):
    save(tmp_path / "f.tif", np.zeros((40, 40), dtype=np.float32))
    with pytest.raises(ValueError, match="f.tif.*floating-point"):
        load_image(tmp_path / "f.tif")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")


def test_corrupt_file_names_the_file(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match=r"junk.png: cannot read image"):
        load_image(tmp_path / "junk.png")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_fails_at_load_time(tmp_path, suffix):
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = save(tmp_path / f"whole{suffix}", noise).read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=f"cut{suffix}: cannot read image"):
        load_image(tmp_path / f"cut{suffix}")


def test_tiny_image_is_refused(tmp_path):
    save(tmp_path / "tiny.png", rgb(20, 64))
    with pytest.raises(ValueError, match=r"tiny.png: image is 64x20 px.*minimum of 32"):
        load_image(tmp_path / "tiny.png")
    assert load_image(tmp_path / "tiny.png", min_size=16).size == (64, 20)


# --- load_mask ---------------------------------------------------------------------------


def test_mask_any_nonzero_value_is_defect(tmp_path):
    values = np.zeros((40, 40), dtype=np.uint8)
    values[0, 0], values[1, 1], values[2, 2] = 255, 1, 2  # VisA masks use small ints
    mask = load_mask(save(tmp_path / "m.png", values))
    assert mask.dtype == bool and mask.shape == (40, 40)
    assert mask.sum() == 3 and mask[0, 0] and mask[1, 1] and mask[2, 2]


def test_colour_mask_counts_any_channel(tmp_path):
    values = rgb(40, 40)
    values[5, 6] = [1, 0, 0]  # would round to 0 in a gray conversion
    mask = load_mask(save(tmp_path / "m.png", values))
    assert mask.sum() == 1 and mask[5, 6]


def test_corrupt_mask_names_the_file(tmp_path):
    (tmp_path / "m.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="m.png: cannot read image"):
        load_mask(tmp_path / "m.png")


# --- Geometry ----------------------------------------------------------------------------


def test_geometry_sizes_by_hand():
    geometry = Geometry(resize=256, crop=224)
    # VisA-like 1562x1000: shorter side 1000 -> 256, longer int(256 * 1.562) = 399.
    assert geometry.resized_size((1562, 1000)) == (399, 256)
    # (399 - 224) / 2 = 87.5 rounds half to even -> 88; (256 - 224) / 2 = 16.
    assert geometry.crop_box((1562, 1000)) == (88, 16, 312, 240)
    assert geometry.resized_size((100, 300)) == (256, 768)


@pytest.mark.parametrize(("resize", "crop"), [(100, 101), (0, 0)])
def test_geometry_rejects_crop_larger_than_resize(resize, crop):
    with pytest.raises(ValueError, match="crop"):
        Geometry(resize=resize, crop=crop)


def test_geometry_rejects_unknown_interpolation():
    with pytest.raises(ValueError, match="lanczos"):
        Geometry(resize=64, crop=64, interpolation="lanczos")


def test_image_and_mask_share_one_crop():
    # 200x100 image, resized by 1/2 to 100x50, then the middle 50x50 (x 25..75) is kept.
    geometry = Geometry(resize=50, crop=50)
    image, mask = rgb(100, 200), np.zeros((100, 200), dtype=bool)
    image[40:60, 100:140], mask[40:60, 100:140] = 255, True  # -> crop rows 20..30, cols 25..45
    image[:, :40], mask[:, :40] = 255, True  # left of x = 50: cropped away
    expected = np.zeros((50, 50), dtype=bool)
    expected[20:30, 25:45] = True
    np.testing.assert_array_equal(geometry.mask(mask), expected)
    cropped = geometry.image(Image.fromarray(image))
    assert cropped.shape == (50, 50, 3) and cropped.dtype == np.uint8
    assert cropped[22:28, 27:43].min() > 200  # inside the block
    assert cropped[~np.pad(np.ones((14, 24), bool), ((18, 18), (23, 3)))].max() < 30


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_geometry_matches_torchvision_resize_and_center_crop(interpolation):
    transforms = pytest.importorskip("torchvision.transforms")
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (150, 233, 3), np.uint8))
    mode = getattr(transforms.InterpolationMode, interpolation.upper())
    reference = transforms.Compose(
        [transforms.Resize(64, interpolation=mode), transforms.CenterCrop(56)]
    )(img)
    ours = Geometry(resize=64, crop=56, interpolation=interpolation).image(img)
    np.testing.assert_array_equal(ours, np.asarray(reference))


# --- batch loaders -----------------------------------------------------------------------


def test_load_images_keeps_order(tmp_path):
    paths = [save(tmp_path / f"{i}.png", rgb(40, 60, 10 * i)) for i in range(5)]
    out = load_images(paths, Geometry(resize=32, crop=32), workers=3)
    assert out.shape == (5, 32, 32, 3) and out.dtype == np.uint8
    assert out[:, 16, 16, 0].tolist() == [0, 10, 20, 30, 40]
    assert load_images([], Geometry(resize=32, crop=32)).shape == (0, 32, 32, 3)


def test_load_test_set(tmp_path):
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[:20] = 255
    samples = [
        TestSample(save(tmp_path / "good.png", rgb(40, 40)), 0, None, "good"),
        TestSample(
            save(tmp_path / "bad.png", rgb(40, 40)), 1, save(tmp_path / "bad_mask.png", mask), "cut"
        ),
    ]
    test = load_test_set(samples, Geometry(resize=32, crop=32), workers=2)
    assert test.images.shape == (2, 32, 32, 3)
    assert test.labels.tolist() == [0, 1]
    assert not test.masks[0].any()
    assert test.masks[1, :16].all() and not test.masks[1, 16:].any()


def test_mask_with_other_size_than_its_image(tmp_path):
    image = save(tmp_path / "bad.png", rgb(40, 50))
    mask = save(tmp_path / "bad_mask.png", np.zeros((40, 40), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"bad_mask.png: mask is 40x40.*bad.png is 50x40"):
        load_test_set([TestSample(image, 1, mask, "cut")], Geometry(resize=32, crop=32))


def test_masks_are_all_or_nothing(tmp_path):
    image = save(tmp_path / "x.png", rgb(40, 40))
    mask = save(tmp_path / "x_mask.png", np.zeros((40, 40), dtype=np.uint8))
    unmasked = [TestSample(image, 0, None, "good"), TestSample(image, 1, None, "cut")]
    test = load_test_set(unmasked, Geometry(resize=32, crop=32))
    assert test.masks is None and test.labels.tolist() == [0, 1]
    mixed = [*unmasked, TestSample(image, 1, mask, "cut")]
    with pytest.raises(ValueError, match="1 of 2 anomalous images have no mask"):
        load_test_set(mixed, Geometry(resize=32, crop=32))


# --- modes the loader converts, with the RGB pixels they must give ------------------------------


def test_cmyk_file_converts_to_rgb(tmp_path, caplog):
    # Inks without black, or black alone: RGB = 255 - ink (or 255 - black). Pillow versions
    # differ only where ink and black meet in one channel, which these pixels avoid.
    cmyk = np.zeros((40, 40, 4), dtype=np.uint8)
    cmyk[:, 10:20] = [255, 0, 0, 0]  # cyan ink only
    cmyk[:, 20:30] = [0, 100, 50, 0]
    cmyk[:, 30:] = [0, 0, 0, 100]  # black only: gray
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.tif")
    with caplog.at_level(logging.INFO, logger="ucad.data.images"):
        img = load_image(tmp_path / "c.tif")
    out = np.asarray(img)
    assert img.mode == "RGB" and out.shape == (40, 40, 3)
    np.testing.assert_array_equal(
        out[0, [0, 10, 20, 30]], [[255] * 3, [0, 255, 255], [255, 155, 205], [155] * 3]
    )
    assert "c.tif: converting CMYK image to RGB" in caplog.text


def test_gray_with_alpha_drops_the_alpha(tmp_path):
    la = np.zeros((40, 40, 2), dtype=np.uint8)
    la[:, :20] = [100, 0]  # fully transparent: the gray value stays, nothing is composited
    la[:, 20:] = [200, 128]
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    out = np.asarray(load_image(tmp_path / "la.png"))
    assert out.shape == (40, 40, 3)
    assert (out[:, :20] == 100).all() and (out[:, 20:] == 200).all()


@pytest.mark.parametrize("transparency", ["index", "bytes"])
def test_palette_with_transparency_keeps_the_palette_colours(tmp_path, transparency):
    img = Image.fromarray(np.tile(np.array([0, 1, 2, 2], dtype=np.uint8), (40, 10)), mode="P")
    img.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0] + [0] * 759)
    # index 1 fully transparent, or per-entry alpha (a tRNS chunk of several bytes)
    value = 1 if transparency == "index" else b"\xff\x00\x80"
    img.save(tmp_path / "p.png", transparency=value)
    with Image.open(tmp_path / "p.png") as check:
        assert check.mode == "P" and "transparency" in check.info
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when P+transparency goes straight to RGB
        out = np.asarray(load_image(tmp_path / "p.png"))
    np.testing.assert_array_equal(
        out[0, :4], [[10, 20, 30], [200, 100, 50], [0, 255, 0]] + [[0, 255, 0]]
    )
    np.testing.assert_array_equal(out[39, :4], out[0, :4])


# --- arrays through the Python API (README: "converts numpy arrays the same way") ---------------


@pytest.fixture(scope="module")
def inspector(tmp_path_factory, synth_root):
    """An Inspector over a one-class model learned at 32 px: conversion, not accuracy."""
    from ucad.cli import main
    from ucad.inference import Inspector
    from ucad.store import ArtifactStore

    store = tmp_path_factory.mktemp("images") / "store"
    settings = ("epochs=1", "image_size=32", "key_size=8", "knowledge_size=8", "workers=2")
    args = ["add-task", "--model", "m", "--task", "grain", "--data", str(synth_root)]
    args += ["--preset", "smoke", "--store", str(store), "--no-tracking"]
    args += [item for setting in settings for item in ("--set", setting)]
    assert main(args) == 0
    return Inspector.load(ArtifactStore(store), "m")


def test_uint16_array_is_scaled_like_a_16_bit_file(inspector, tmp_path):
    values = np.array([0, 257, 257 * 100, 65535], dtype=np.uint16)
    deep = np.tile(np.repeat(values, 12), (48, 1))  # 48 x 48, four vertical bands
    expected = np.stack(
        [np.tile(np.repeat(np.array([0, 1, 100, 255], np.uint8), 12), (48, 1))] * 3, -1
    )
    save(tmp_path / "deep.png", deep)
    by_array, by_file, by_rgb = inspector.predict([deep, tmp_path / "deep.png", expected])
    np.testing.assert_array_equal(np.asarray(by_array.image), expected)
    np.testing.assert_array_equal(np.asarray(by_file.image), expected)
    # what was scored is the converted image: the same score as the 8-bit RGB array
    # (same pixels, other rows of one batch: equal up to float rounding)
    assert by_array.score == pytest.approx(by_rgb.score, rel=1e-6)
    assert by_file.score == pytest.approx(by_rgb.score, rel=1e-6)
    np.testing.assert_allclose(by_array.map, by_rgb.map, rtol=1e-5, atol=1e-6)


def test_rgba_array_drops_the_alpha(inspector):
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (40, 56, 4), dtype=np.uint8)
    rgba[..., 3] = rng.choice([0, 128, 255], (40, 56))
    by_rgba, by_rgb = inspector.predict([rgba, np.ascontiguousarray(rgba[..., :3])])
    assert by_rgba.image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(by_rgba.image), rgba[..., :3])
    assert by_rgba.score == pytest.approx(by_rgb.score, rel=1e-6)
    assert by_rgba.map.shape == (40, 56)
    np.testing.assert_allclose(by_rgba.map, by_rgb.map, rtol=1e-5, atol=1e-6)


def test_gray_array_is_replicated(inspector):
    gray = np.arange(48 * 48, dtype=np.uint8).reshape(48, 48)
    (result,) = inspector.predict([gray])
    np.testing.assert_array_equal(np.asarray(result.image), np.stack([gray] * 3, -1))
