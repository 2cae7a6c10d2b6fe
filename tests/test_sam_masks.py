import dataclasses
import time
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

from ucad import sam_masks
from ucad.config import Config
from ucad.sam_masks import SamMaskGenerator, SamSettings, resize_matrix
from ucad.structure import (
    BatchedSamStructure,
    SamStructure,
    compare_with_reference,
    config_settings,
    make_structure_source,
    partition_agreement,
)

IMG_SIZE = 128  # the encoder's input side; images are resized to it as SAM does with 1024
# Thresholds that drop about a third of the candidates each, on the model below.
SETTINGS = SamSettings(
    points_per_side=8,
    pred_iou_thresh=0.43,
    stability_score_thresh=0.6,
    box_nms_thresh=0.7,
)


def small_sam(seed: int = 1) -> Sam:
    """A seeded random SAM (128 px input, 8x8 embedding) whose masks follow image regions.

    Random weights give near-constant, unstable logits: these adjustments make masks unions of
    image regions (nearest-neighbour upscaling, no constant mask-embedding offset), with logits
    large enough to be stable, and IoU predictions shifted to be positive so a positive
    pred_iou_thresh filters (the generators skip the filter for thresholds <= 0).
    """
    torch.manual_seed(seed)
    dim, grid = 64, IMG_SIZE // 16
    model = Sam(
        image_encoder=ImageEncoderViT(
            img_size=IMG_SIZE,
            patch_size=16,
            embed_dim=64,
            depth=2,
            num_heads=2,
            mlp_ratio=2.0,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(IMG_SIZE, IMG_SIZE),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=128, num_heads=2),
            iou_head_hidden_dim=16,
        ),
    ).eval()
    decoder = model.mask_decoder
    with torch.no_grad():
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight *= 1000.0
        for conv in (decoder.output_upscaling[0], decoder.output_upscaling[3]):
            conv.weight.copy_(conv.weight.mean(dim=(2, 3), keepdim=True).expand_as(conv.weight))
            conv.bias.zero_()
        model.prompt_encoder.no_mask_embed.weight.zero_()
        decoder.iou_prediction_head.layers[-1].bias += 0.5
    return model


def block_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Images of a few flat coloured rectangles on a flat background."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, height, width, 3), np.uint8)
    for image in images:
        image[:] = rng.integers(0, 256, 3)
        for _ in range(6):
            top, left = rng.integers(0, height - 8), rng.integers(0, width - 8)
            bottom, right = top + rng.integers(8, height // 2), left + rng.integers(8, width // 2)
            image[top:bottom, left:right] = rng.integers(0, 256, 3)
    return images


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one thread is faster than two, which stall when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> Sam:
    return small_sam()


@pytest.mark.parametrize("shape", [(64, 64), (48, 64)])
def test_masks_and_maps_match_the_reference_generator(model, shape):
    images = block_images(4, *shape)
    fast = BatchedSamStructure(model, "cpu", SETTINGS, batch_size=3)
    reference = SamStructure(model, "cpu", SETTINGS)
    masks = fast.generator.generate(images)
    counts = [len(image_masks) for image_masks in masks]
    assert min(counts) >= 5, counts  # enough masks survive: the comparison is not vacuous
    for image, image_masks in zip(images, masks, strict=True):
        expected = [record["segmentation"] for record in reference.generator.generate(image)]
        assert len(image_masks) == len(expected)
        # Same masks in the same order, up to the odd pixel where float rounding flips a logit.
        same = (image_masks.numpy() == np.stack(expected)).mean(axis=(1, 2))
        assert same.min() > 0.99
    fast_maps, reference_maps = fast.label_maps(images), reference.label_maps(images)
    assert fast_maps.shape == images.shape[:3] and fast_maps.dtype == np.int32
    assert partition_agreement(fast_maps, reference_maps, 8) >= 0.95


def test_batched_maps_equal_one_by_one(model):
    images = block_images(3, 64, 64, seed=1)
    batched = BatchedSamStructure(model, "cpu", SETTINGS, batch_size=3).label_maps(images)
    single = BatchedSamStructure(model, "cpu", SETTINGS, batch_size=1)
    assert len(np.unique(batched)) > 3
    np.testing.assert_array_equal(batched, np.stack([single.label_map(image) for image in images]))


def test_prompt_chunks_decoded_in_threads_give_the_masks_of_one_at_a_time(model, monkeypatch):
    images = block_images(2, 64, 64, seed=2)
    results = {}
    for threads in (1, 3):
        monkeypatch.setattr(sam_masks, "CPU_DECODE_THREADS", threads)
        generator = SamMaskGenerator(model, SETTINGS, "cpu")
        results[threads] = (generator.generate(images), generator.prompts_decoded)
    (one, decoded_one), (three, decoded_three) = results[1], results[3]
    assert decoded_one == decoded_three == 2 * SETTINGS.points_per_side**2
    assert min(len(masks) for masks in one) >= 5  # not a comparison of empty mask sets
    for masks_one, masks_three in zip(one, three, strict=True):
        assert torch.equal(masks_one, masks_three)


def test_prompts_per_pass_change_no_mask(model, monkeypatch):
    """How many prompts are decoded together is a speed setting: the masks are the same bit for
    bit (uneven chunks included), so it is not in the maps' digests."""
    images = block_images(2, 64, 64, seed=3)
    results = []
    for per_pass in (1, 3, sam_masks.CPU_PROMPTS_PER_PASS, SETTINGS.points_per_batch):
        monkeypatch.setattr(sam_masks, "CPU_PROMPTS_PER_PASS", per_pass)
        results.append(SamMaskGenerator(model, SETTINGS, "cpu").generate(images))
    assert min(len(masks) for masks in results[0]) >= 5  # not a comparison of empty mask sets
    for other in results[1:]:
        for expected, masks in zip(results[0], other, strict=True):
            assert torch.equal(masks, expected)


def test_an_error_in_one_chunk_stops_the_image_without_running_the_rest(model, monkeypatch):
    generator = SamMaskGenerator(model, SETTINGS, "cpu")
    chunks = SETTINGS.points_per_side**2 // sam_masks.CPU_PROMPTS_PER_PASS
    calls = []
    decode = SamMaskGenerator._candidates

    def failing_third(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("chunk 3 failed")
        if len(calls) > 3:
            time.sleep(0.05)  # chunks after the failure are slow: the rest cannot all slip in
        return decode(self, *args)

    monkeypatch.setattr(SamMaskGenerator, "_candidates", failing_third)
    with pytest.raises(RuntimeError, match="chunk 3 failed"):
        generator.generate(block_images(1, 64, 64))
    assert len(calls) < chunks  # the chunks not yet started were cancelled


def test_bf16_autocast_gives_maps(model):
    images = block_images(2, 64, 64)
    source = BatchedSamStructure(model, "cpu", SETTINGS, autocast_dtype=torch.bfloat16)
    maps = source.label_maps(images)
    assert maps.shape == (2, 64, 64) and maps.dtype == np.int32
    reference = SamStructure(model, "cpu", SETTINGS, autocast_dtype=torch.bfloat16)
    assert reference.label_map(images[0]).shape == (64, 64)


def test_resize_matrix_is_sams_postprocessing():
    logits = torch.randn(2, 1, 16, 16)
    # A 48x64 image becomes 96x128 for a 128 px encoder: rows keep 96 of 128 padded samples.
    expected = model_free_postprocess(logits, img_size=128, input_size=(96, 128), size=(48, 64))
    rows, cols = resize_matrix(16, 128, 96, 48), resize_matrix(16, 128, 128, 64)
    torch.testing.assert_close(rows @ logits[:, 0] @ cols.T, expected[:, 0])


def model_free_postprocess(logits, img_size, input_size, size):
    """`Sam.postprocess_masks`, step by step."""
    up = torch.nn.functional.interpolate(logits, (img_size, img_size), mode="bilinear")
    cropped = up[..., : input_size[0], : input_size[1]]
    return torch.nn.functional.interpolate(cropped, size, mode="bilinear")


def test_generator_rejects_bad_input(model):
    generator = SamMaskGenerator(model, SamSettings(points_per_side=2), "cpu")
    with pytest.raises(ValueError, match="uint8"):
        generator.generate(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="batch_size"):
        generator.generate(np.zeros((1, 8, 8, 3), np.uint8), batch_size=0)


def test_make_structure_source_builds_fast_and_reference(tmp_path, model, monkeypatch):
    path = tmp_path / "small.pth"
    torch.save(model.state_dict(), path)
    # "vit_b" builds the small architecture here; the weights must come from the file.
    registry = {"vit_b": lambda checkpoint=None: small_sam(seed=0)}
    monkeypatch.setattr("ucad.sam_checkpoints.sam_model_registry", registry)
    # The settings as one SamSettings, or field by field (as ucad.pipeline passes them).
    fast = make_structure_source("sam", checkpoint=path, device="cpu", settings=SETTINGS)
    fields = dataclasses.asdict(SETTINGS)
    reference = make_structure_source("sam_reference", checkpoint=path, device="cpu", **fields)
    assert isinstance(fast, BatchedSamStructure) and fast.name == "sam"
    assert isinstance(reference, SamStructure) and reference.name == "sam_reference"
    for source in (fast, reference):  # both loaded the file's weights, not seed 0's
        for name, value in model.state_dict().items():
            torch.testing.assert_close(source.model.state_dict()[name], value)


def test_config_settings_are_the_configs_sam_fields():
    config = Config(sam_points_per_side=8, sam_pred_iou_thresh=0.5, sam_box_nms_thresh=0.6)
    assert config_settings(config) == SamSettings(
        points_per_side=8, pred_iou_thresh=0.5, stability_score_thresh=0.95, box_nms_thresh=0.6
    )
    assert config_settings(config, torch.float32).autocast_dtype is None
    assert config_settings(config, torch.bfloat16).autocast_dtype == torch.bfloat16
    with pytest.raises(TypeError, match="points_per_sid"):
        SamSettings.of(config_settings(config), points_per_sid=4)


def test_compare_with_reference_reports(model):
    images = block_images(2, 64, 64)
    report = compare_with_reference(
        BatchedSamStructure(model, "cpu", SETTINGS), SamStructure(model, "cpu", SETTINGS), images, 8
    )
    assert set(report) == {
        "reference_s_per_image",
        "s_per_image",
        "speedup",
        "agreement",
        "regions_per_image",
    }
    assert report["reference_s_per_image"] > 0 and report["s_per_image"] > 0
    assert report["speedup"] == pytest.approx(
        report["reference_s_per_image"] / report["s_per_image"]
    )
    assert 0.95 <= report["agreement"] <= 1.0
    assert report["regions_per_image"] >= 3


def test_partition_agreement_identical_and_relabelled():
    rng = np.random.default_rng(0)
    # Uniform 4x4 patches: the majority vote has no ties, whose smallest-id rule is not
    # invariant to relabelling.
    maps = np.kron(rng.integers(0, 5, size=(2, 4, 4)), np.ones((1, 4, 4))).astype(np.int32)
    assert partition_agreement(maps, maps, 4) == 1.0
    relabelled = np.array([7, 3, 9, 1, 4], np.int32)[maps]  # a permutation of the ids
    assert partition_agreement(maps, relabelled, 4) == 1.0


def test_partition_agreement_by_hand():
    a = np.array([[[1, 1], [2, 2]]], np.int32)  # patches 1 1 2 2 (patch size 1)
    b = np.array([[[1, 2], [2, 2]]], np.int32)  # patches 1 2 2 2
    # Pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3): a says same/diff/diff/diff/diff/same,
    # b says diff/diff/diff/same/same/same: they agree on 3 pairs of 6.
    assert partition_agreement(a, b, 1) == pytest.approx(0.5)
    # Averaged over images: this pair (0.5) and an identical pair (1.0).
    assert partition_agreement(np.concatenate([a, a]), np.concatenate([b, a]), 1) == 0.75
    with pytest.raises(ValueError, match="shape"):
        partition_agreement(a, b[:, :1], 1)


def test_bench_structure_comparison_bounds_the_upscaling_it_skips(model):
    """The bench's SAM figures: the share of prompts whose masks ucad upscaled, and its time
    with the IoU filter off (every prompt upscaled), which the speedup target also checks."""
    from types import SimpleNamespace

    from ucad.bench_structure import structure_comparison
    from ucad.bench_targets import _structure_target

    config = Config(
        sam_points_per_side=SETTINGS.points_per_side,
        sam_pred_iou_thresh=0.69,  # on this model: about a third of the prompts pass
        sam_stability_score_thresh=SETTINGS.stability_score_thresh,
        device="cpu",
    )
    fast = BatchedSamStructure(model, "cpu", config_settings(config))
    rt = SimpleNamespace(
        structure_source=fast,
        config=config,
        backbone=SimpleNamespace(patch_size=8),
        device=torch.device("cpu"),
        precision=torch.float32,
    )
    report = structure_comparison(rt, block_images(2, 64, 64))
    assert report["precision"] == "fp32"
    assert 0.0 < report["upscaled_share"] < 1.0  # the IoU filter dropped some prompts, not all
    assert fast.generator.prompts_decoded == 2 * SETTINGS.points_per_side**2
    assert report["every_prompt_s_per_image"] > 0
    assert report["every_prompt_speedup"] == pytest.approx(
        report["reference_s_per_image"] / report["every_prompt_s_per_image"]
    )
    target = _structure_target(report)
    assert target.value == min(report["speedup"], report["every_prompt_speedup"])
    # the arithmetic at the machine's product rate: upscaling a third of the prompts costs
    # less than upscaling all of them
    assert report["product_macs_per_s"] > 0
    assert 0 < report["floor_s_per_image"] < report["every_prompt_floor_s_per_image"]
    assert fast.generator.masks_resized > 0
    assert report["floor_speedup"] == pytest.approx(
        report["reference_s_per_image"] / report["floor_s_per_image"]
    )


def test_count_products_counts_what_the_modules_compute(model):
    """The encoder's count is the module's own forward pass counted on real tensors; per prompt,
    upscaling costs exactly its transposed convolutions and hypernetworks, and per mask the
    resize its two products, counted by hand."""
    from torch.utils.flop_counter import FlopCounterMode

    image = block_images(1, 64, 96)[0]  # not square: the encoder still sees a padded square
    generator = SamMaskGenerator(model, SETTINGS, "cpu")
    counts = generator.count_products(image)
    pixels = torch.as_tensor(generator.transform.apply_image(image)).permute(2, 0, 1)[None]
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.image_encoder(model.preprocess(pixels.float()))
    assert counts["encoder_macs"] == counter.get_total_flops() / 2
    channels, cells, masks = 64, IMG_SIZE // 16, 3  # small_sam's decoder, multimask output
    up1, up2 = channels // 4, channels // 8  # channels after each transposed convolution
    low = 4 * cells  # low-res mask side
    assert counts["upscale_macs_per_prompt"] == (
        cells**2 * channels * 4 * up1  # first 2x2 transposed convolution
        + (2 * cells) ** 2 * up1 * 4 * up2  # second
        + masks * up2 * low**2  # each mask token's hypernetwork output against the pixels
        + masks * (2 * channels * channels + channels * up2)  # the hypernetwork MLPs
    )
    assert counts["resize_macs_per_mask"] == 64 * low * low + 64 * low * 96  # rows, then columns
    assert counts["masks_per_prompt"] == masks
    assert counts["prompts"] == SETTINGS.points_per_side**2
    assert counts["shared_macs"] > 0 and counts["tokens_macs_per_prompt"] > 0


def test_count_products_with_a_point_grid_of_one_chunk(model):
    one_chunk = SamSettings.of(SETTINGS, points_per_side=2)  # 4 prompts: fewer than a chunk
    counts = SamMaskGenerator(model, one_chunk, "cpu").count_products(block_images(1, 64, 64)[0])
    assert counts["prompts"] == 4 and counts["tokens_macs_per_prompt"] > 0
