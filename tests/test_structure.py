import hashlib
from functools import partial

import numpy as np
import pytest
import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from ucad import sam_checkpoints
from ucad.backbone import WeightsUnavailableError
from ucad.structure import (
    SamCheckpoint,
    SamStructure,
    SuperpixelStructure,
    load_sam_weights,
    make_structure_source,
    paint_masks,
    patch_labels,
    resolve_sam_checkpoint,
)


def box(top, left, bottom, right, shape=(6, 6)):
    mask = np.zeros(shape, dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def test_paint_masks_largest_first_smaller_on_top():
    small = box(0, 0, 3, 3)  # area 9
    whole = box(0, 0, 6, 6)  # area 36
    middle = box(1, 1, 5, 5)  # area 16
    # Painted whole (id 1), middle (id 2), small (id 3), whatever the input order.
    expected = np.array(
        [
            [3, 3, 3, 1, 1, 1],
            [3, 3, 3, 2, 2, 1],
            [3, 3, 3, 2, 2, 1],
            [1, 2, 2, 2, 2, 1],
            [1, 2, 2, 2, 2, 1],
            [1, 1, 1, 1, 1, 1],
        ]
    )
    painted = paint_masks([small, whole, middle], (6, 6))
    assert painted.dtype == np.int32
    np.testing.assert_array_equal(painted, expected)


def test_paint_masks_uncovered_zero_and_equal_areas_keep_order():
    expected = np.array(
        [
            [2, 2, 2, 0, 0, 0],
            [2, 2, 2, 1, 1, 0],
            [2, 2, 2, 1, 1, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],
        ]
    )
    np.testing.assert_array_equal(paint_masks([box(0, 0, 3, 3), box(1, 1, 5, 5)], (6, 6)), expected)
    left, right = box(0, 0, 6, 3), box(0, 2, 6, 5)  # both area 18, overlapping in column 2
    painted = paint_masks([left, right], (6, 6))
    np.testing.assert_array_equal(painted[0], [1, 1, 2, 2, 2, 0])
    np.testing.assert_array_equal(paint_masks([], (2, 3)), np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="shape"):
        paint_masks([box(0, 0, 1, 1)], (5, 5))


def test_patch_labels_majority_vote_by_hand():
    label_map = np.array(
        [
            [1, 1, 2, 3],
            [1, 5, 3, 3],
            [6, 0, 9, 9],
            [0, 6, 7, 7],
        ]
    )
    # Patches in row-major order: {1,1,1,5} -> 1, {2,3,3,3} -> 3,
    # {6,0,0,6} tie -> 0, {9,9,7,7} tie -> 7 (smallest id, though 9 comes first).
    labels = patch_labels(np.stack([label_map, label_map.T]), 2)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels[0], [1, 3, 0, 7])
    # Transposed: {1,1,1,5} -> 1, {6,0,0,6} -> 0, {2,3,3,3} -> 3, {9,7,9,7} -> 7.
    np.testing.assert_array_equal(labels[1], [1, 0, 3, 7])


def test_patch_labels_matches_counting_on_random_maps():
    rng = np.random.default_rng(0)
    maps = rng.integers(0, 4, size=(3, 8, 12))
    labels = patch_labels(maps, 4)
    assert labels.shape == (3, 6)
    for n in range(3):
        for k in range(6):
            row, col = divmod(k, 3)
            patch = maps[n, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4]
            ids, counts = np.unique(patch, return_counts=True)
            assert labels[n, k] == ids[counts.argmax()]  # unique sorts ids: first max = smallest


def test_patch_labels_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 4"):
        patch_labels(np.zeros((1, 6, 8), np.int32), 4)
    with pytest.raises(ValueError, match="integer"):
        patch_labels(np.zeros((1, 8, 8), np.float32), 4)


def two_colour_image():
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32] = (200, 30, 30)
    image[:, 32:] = (20, 40, 220)
    return image


def test_superpixel_regions_shape_dtype_determinism():
    source = SuperpixelStructure(n_segments=8)
    image = two_colour_image()
    labels = source.label_map(image)
    assert labels.shape == (64, 64) and labels.dtype == np.int32
    assert labels.min() >= 1  # every pixel belongs to a region
    assert labels[10, 5] != labels[10, 60]  # the colour edge separates regions
    np.testing.assert_array_equal(source.label_map(image), labels)
    batch = source.label_maps(np.stack([image, image[:, ::-1]]))
    assert batch.shape == (2, 64, 64) and batch.dtype == np.int32
    np.testing.assert_array_equal(batch[0], labels)
    with pytest.raises(ValueError, match="uint8"):
        source.label_map(image.astype(np.float32))


def tiny_sam(seed: int, depth: int = 1) -> Sam:
    """A randomly initialised SAM for 64x64 images with a 4x4 image embedding."""
    torch.manual_seed(seed)
    dim = 16
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=64,
            patch_size=16,
            embed_dim=32,
            depth=depth,
            num_heads=2,
            mlp_ratio=2.0,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            global_attn_indexes=(),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=4
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=32, num_heads=2),
            iou_head_hidden_dim=16,
        ),
    ).eval()


def test_sam_structure_paints_the_generators_masks(monkeypatch):
    source = SamStructure(tiny_sam(0), device="cpu", points_per_side=2)
    masks = [box(0, 0, 3, 3), box(0, 0, 6, 6), box(2, 2, 5, 6)]  # areas 9, 36, 12
    records = [{"segmentation": mask, "area": int(mask.sum())} for mask in masks]
    monkeypatch.setattr(source.generator, "generate", lambda image: records)
    # Painted largest first: the whole image (1), then rows 2-4 x cols 2-5 (2), then the corner (3).
    expected = np.array(
        [
            [3, 3, 3, 1, 1, 1],
            [3, 3, 3, 1, 1, 1],
            [3, 3, 3, 2, 2, 2],
            [1, 1, 2, 2, 2, 2],
            [1, 1, 2, 2, 2, 2],
            [1, 1, 1, 1, 1, 1],
        ],
        dtype=np.int32,
    )
    labels = source.label_map(np.zeros((6, 6, 3), np.uint8))
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, expected)


def test_sam_structure_runs_the_real_generator():
    # Random weights predict low IoU and unstable masks: zero thresholds keep them.
    source = SamStructure(
        tiny_sam(0),
        device="cpu",
        points_per_side=4,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
    )
    image = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    labels = source.label_map(image)
    assert labels.shape == (64, 64) and labels.dtype == np.int32
    assert labels.max() >= 1  # the lowered thresholds let masks through


def test_load_sam_weights_good_and_mismatching_files(tmp_path):
    good = tmp_path / "tiny.pth"
    torch.save(tiny_sam(1).state_dict(), good)
    model = tiny_sam(2)
    load_sam_weights(model, good)
    for name, value in tiny_sam(1).state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value)

    deeper = tmp_path / "deeper.pth"
    torch.save(tiny_sam(1, depth=2).state_dict(), deeper)
    with pytest.raises(ValueError, match="deeper.pth.*wrong model_type"):
        load_sam_weights(tiny_sam(2), deeper)


class NotATensor:
    pass


def test_load_sam_weights_refuses_pickled_objects(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"weight": NotATensor()}, path)
    with pytest.raises(ValueError, match="pickled.pth.*tensor-only"):
        load_sam_weights(tiny_sam(0), path)


def test_sam_structure_names_file_with_wrong_model_type(tmp_path):
    path = tmp_path / "tiny_for_vit_b.pth"
    torch.save(tiny_sam(0).state_dict(), path)
    with pytest.raises(ValueError, match="tiny_for_vit_b.pth"):
        SamStructure.from_checkpoint("vit_b", checkpoint=path, device="cpu")


def test_resolve_local_checkpoint(tmp_path):
    path = tmp_path / "mine.pth"
    path.write_bytes(b"weights")
    assert resolve_sam_checkpoint("vit_l", path) == path
    assert resolve_sam_checkpoint("vit_l", str(path)) == path
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        resolve_sam_checkpoint("vit_b", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="vit_x"):
        resolve_sam_checkpoint("vit_x", None)


@pytest.fixture
def served(tmp_path):
    """A fake checkpoint behind a file:// URL, named like the official vit_b file."""
    server = tmp_path / "server"
    server.mkdir()
    payload = b"not really SAM weights" * 100
    (server / "sam_vit_b_01ec64.pth").write_bytes(payload)
    url = (server / "sam_vit_b_01ec64.pth").as_uri()
    return url, payload, hashlib.sha256(payload).hexdigest()


def test_download_verifies_and_caches(tmp_path, served, monkeypatch):
    url, payload, sha = served
    monkeypatch.setitem(sam_checkpoints.SAM_CHECKPOINTS, "vit_b", SamCheckpoint(url, sha))
    monkeypatch.setenv("UCAD_CACHE", str(tmp_path / "cache"))
    path = resolve_sam_checkpoint("vit_b", None)
    assert path == tmp_path / "cache" / "sam" / "sam_vit_b_01ec64.pth"
    assert path.read_bytes() == payload
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind

    def no_network(*args, **kwargs):
        raise AssertionError("a cached checkpoint must not be downloaded again")

    monkeypatch.setattr(sam_checkpoints.urllib.request, "urlopen", no_network)
    assert resolve_sam_checkpoint("vit_b", None) == path


def test_download_with_bad_checksum_leaves_nothing(tmp_path, served, monkeypatch):
    url, _, _ = served
    monkeypatch.setitem(sam_checkpoints.SAM_CHECKPOINTS, "vit_b", SamCheckpoint(url, "0" * 64))
    cache = tmp_path / "cache"
    with pytest.raises(WeightsUnavailableError, match="SHA-256"):
        resolve_sam_checkpoint("vit_b", None, cache_dir=cache)
    assert list((cache / "sam").iterdir()) == []


def test_download_failure_says_how_to_provide_the_file(tmp_path, monkeypatch):
    url = (tmp_path / "nowhere" / "sam_vit_h_4b8939.pth").as_uri()
    monkeypatch.setitem(sam_checkpoints.SAM_CHECKPOINTS, "vit_h", SamCheckpoint(url, "0" * 64))
    cache = tmp_path / "cache"
    with pytest.raises(WeightsUnavailableError) as error:
        resolve_sam_checkpoint("vit_h", None, cache_dir=cache)
    message = str(error.value)
    assert url in message
    assert "sam_checkpoint: /path/to/sam_vit_h_4b8939.pth" in message
    assert str(cache / "sam" / "sam_vit_h_4b8939.pth") in message
    assert list((cache / "sam").iterdir()) == []


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("stall", "timed out"),
        ("hang up", "closed after 1000 of 1000000 bytes"),
        ("hang up chunked", "IncompleteRead"),
    ],
)
def test_broken_download_fails_and_leaves_nothing(tmp_path, monkeypatch, mode, message):
    """A server that sends part of the file and then nothing (the read times out) or hangs up,
    with a length or in chunks: the error says how to provide the file, and no partial file
    stays in the cache."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            if mode == "hang up chunked":
                head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                connection.sendall(head + b"f4240\r\n" + b"x" * 1000)  # a 1,000,000-byte chunk
                return
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
            if mode == "stall":
                stop.wait(30)  # silent until the test is over

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/sam_vit_b_01ec64.pth"
    monkeypatch.setitem(sam_checkpoints.SAM_CHECKPOINTS, "vit_b", SamCheckpoint(url, "0" * 64))
    monkeypatch.setattr(sam_checkpoints, "DOWNLOAD_TIMEOUT_S", 0.5)
    cache = tmp_path / "cache"
    try:
        with pytest.raises(WeightsUnavailableError, match=message) as error:
            resolve_sam_checkpoint("vit_b", None, cache_dir=cache)
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert "sam_checkpoint: /path/to/sam_vit_b_01ec64.pth" in str(error.value)
    assert list((cache / "sam").iterdir()) == []


def test_make_structure_source(tmp_path):
    source = make_structure_source("superpixel", n_segments=12)
    assert isinstance(source, SuperpixelStructure)
    assert source.name == "superpixel" and source.n_segments == 12
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        make_structure_source("sam", checkpoint=tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="'sam', 'sam_reference', 'superpixel'"):
        make_structure_source("slic")
