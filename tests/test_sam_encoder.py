"""`ucad.sam_encoder.encode` is SAM's `ImageEncoderViT.forward`, bit for bit."""

from functools import partial

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT

from ucad import sam_encoder
from ucad.sam_encoder import encode


def random_encoder(use_rel_pos: bool, window_size: int, seed: int = 0) -> ImageEncoderViT:
    """A small SAM image encoder (160 px, 10x10 patches) with windowed and global blocks, its
    relative positions moved off their zero initialisation so that they count."""
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(
        img_size=160,
        patch_size=16,
        embed_dim=48,
        depth=3,
        num_heads=3,
        mlp_ratio=2.0,
        out_chans=32,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=use_rel_pos,
        window_size=window_size,
        global_attn_indexes=(1,),
    ).eval()
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                parameter.normal_(0.0, 0.5)
    return encoder


@pytest.mark.parametrize(
    ("use_rel_pos", "window_size"),
    [
        (True, 4),  # windows pad the 10x10 grid to 12x12
        (True, 5),
        (False, 4),
        (True, 0),  # every block global
    ],
)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
# whole images' logits at once; 7,000 values: a global block's 10 rows of queries as 7 + 3, and a
# windowed block's (window, head) maps 27 + 27 (4 x 4 windows) or 11 + 11 + 2 (5 x 5 windows)
@pytest.mark.parametrize("chunk", [1 << 22, 7000])
def test_encode_is_the_encoders_forward_bit_for_bit(
    use_rel_pos, window_size, dtype, chunk, monkeypatch
):
    monkeypatch.setattr(sam_encoder, "LOGITS_PER_CHUNK", chunk)
    encoder = random_encoder(use_rel_pos, window_size)
    images = torch.randn(2, 3, 160, 160)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        expected = encoder(images)
        got = encode(encoder, images)
    assert got.dtype == expected.dtype
    assert got.shape == (2, 32, 10, 10)
    assert expected.abs().max() > 0.1  # not a comparison of near-zero maps
    assert torch.equal(got, expected)


def test_the_relative_positions_matter_in_this_test():
    """Guards the test above: zeroing the relative positions changes the embedding."""
    encoder = random_encoder(True, 4)
    images = torch.randn(1, 3, 160, 160)
    with torch.inference_mode():
        before = encode(encoder, images)
        for block in encoder.blocks:
            block.attn.rel_pos_h.zero_()
        after = encode(encoder, images)
    assert not torch.allclose(before, after, atol=1e-3)
