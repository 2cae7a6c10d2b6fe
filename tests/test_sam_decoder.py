"""`ImageDecoder` is SAM's `MaskDecoder` with its sums regrouped: same outputs to float rounding."""

import pytest
import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from ucad.sam_decoder import ImageDecoder


def decoder_pair(dim: int, grid: int, heads: int, depth: int, seed: int = 0):
    """A random prompt encoder and mask decoder, with biases and norms moved off their
    initial values so that every term of the regrouped arithmetic is exercised."""
    torch.manual_seed(seed)
    prompt_encoder = PromptEncoder(
        embed_dim=dim,
        image_embedding_size=(grid, grid),
        input_image_size=(16 * grid, 16 * grid),
        mask_in_chans=4,
    )
    decoder = MaskDecoder(
        transformer_dim=dim,
        transformer=TwoWayTransformer(
            depth=depth, embedding_dim=dim, mlp_dim=2 * dim, num_heads=heads
        ),
        iou_head_hidden_dim=32,
    )
    with torch.no_grad():
        for name, parameter in [*decoder.named_parameters(), *prompt_encoder.named_parameters()]:
            if name.endswith("bias") or "norm" in name or "embed" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return prompt_encoder.eval(), decoder.eval()


def reference(prompt_encoder, decoder, embedding, points, labels, multimask):
    sparse, dense = prompt_encoder(points=(points, labels), boxes=None, masks=None)
    return decoder(embedding, prompt_encoder.get_dense_pe(), sparse, dense, multimask)


@pytest.mark.parametrize(
    ("dim", "grid", "heads", "depth", "multimask"),
    [
        (64, 8, 2, 2, True),
        (64, 8, 2, 2, False),
        (32, 6, 4, 1, True),  # one block: the image side is shared up to the final attention
        (48, 5, 2, 3, True),
    ],
)
def test_image_decoder_gives_the_mask_decoders_outputs(dim, grid, heads, depth, multimask):
    prompt_encoder, decoder = decoder_pair(dim, grid, heads, depth)
    embedding = torch.randn(1, dim, grid, grid)
    points = torch.rand(7, 1, 2) * 16 * grid
    labels = torch.ones(7, 1, dtype=torch.int)
    with torch.inference_mode():
        expected_masks, expected_iou = reference(
            prompt_encoder, decoder, embedding, points, labels, multimask
        )
        image_decoder = ImageDecoder(decoder, prompt_encoder, embedding)
        decoded = image_decoder.tokens(points, labels, multimask_output=multimask)
        prompts = torch.tensor([5, 0, 3])  # a subset, out of order
        masks = image_decoder.mask_logits(decoded, prompts)
        reordered = torch.arange(7).flip(0)  # every prompt, out of order
        all_masks = image_decoder.mask_logits(decoded, reordered)
        none = image_decoder.mask_logits(decoded, torch.arange(0))  # no mask passed a filter
        again = image_decoder.tokens(points[:2], labels[:2], multimask_output=multimask)
    assert decoded.iou_pred.shape == expected_iou.shape
    torch.testing.assert_close(decoded.iou_pred, expected_iou, rtol=1e-4, atol=1e-5)
    assert masks.shape == (3, *expected_masks.shape[1:])
    scale = expected_masks.abs().max()
    assert scale > 0.1  # not a vacuous comparison of near-zero maps
    torch.testing.assert_close(masks, expected_masks[prompts], rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(all_masks, expected_masks[reordered], rtol=1e-4, atol=1e-5 * scale)
    assert none.shape == (0, *expected_masks.shape[1:])
    # shared image-side projections are cached per image; a second call reuses them
    torch.testing.assert_close(again.iou_pred, expected_iou[:2], rtol=1e-4, atol=1e-5)


def test_image_decoder_on_sams_vit_b_decoder_shape():
    """SAM's own decoder sizes (256 channels, 64 x 64 cells, 8 heads) and initialisation."""
    prompt_encoder = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(64, 64),
        input_image_size=(1024, 1024),
        mask_in_chans=16,
    ).eval()
    torch.manual_seed(3)
    decoder = MaskDecoder(
        transformer_dim=256,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
    ).eval()
    embedding = torch.randn(1, 256, 64, 64)
    points = torch.rand(3, 1, 2) * 1024
    labels = torch.ones(3, 1, dtype=torch.int)
    with torch.inference_mode():
        expected_masks, expected_iou = reference(
            prompt_encoder, decoder, embedding, points, labels, True
        )
        image_decoder = ImageDecoder(decoder, prompt_encoder, embedding)
        decoded = image_decoder.tokens(points, labels)
        masks = image_decoder.mask_logits(decoded, torch.arange(3))
    torch.testing.assert_close(decoded.iou_pred, expected_iou, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        masks, expected_masks, rtol=1e-4, atol=1e-5 * expected_masks.abs().max()
    )


def test_prompts_decoded_one_at_a_time_each_get_their_own_image_side():
    """With one prompt per call the image side after the first block is (1, N, C) too: it is
    that prompt's own, never the shared one cached for the image."""
    prompt_encoder, decoder = decoder_pair(64, 8, 2, 2)
    embedding = torch.randn(1, 64, 8, 8)
    points = torch.rand(3, 1, 2) * 128
    labels = torch.ones(3, 1, dtype=torch.int)
    with torch.inference_mode():
        expected_masks, expected_iou = reference(
            prompt_encoder, decoder, embedding, points, labels, True
        )
        image_decoder = ImageDecoder(decoder, prompt_encoder, embedding)
        for i in range(3):
            decoded = image_decoder.tokens(points[i : i + 1], labels[i : i + 1])
            masks = image_decoder.mask_logits(decoded, torch.arange(1))
            torch.testing.assert_close(
                decoded.iou_pred, expected_iou[i : i + 1], rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(
                masks, expected_masks[i : i + 1], rtol=1e-4, atol=1e-5 * expected_masks.abs().max()
            )
