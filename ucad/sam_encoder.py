"""SAM's image encoder, run block by block with the attention's relative positions added in place.

segment-anything's `Attention` adds its decomposed relative positions to the attention logits as
`attn.view(...) + rel_h[..., None] + rel_w[..., None, :]`: two broadcast sums, each allocating and
writing a new (heads, N, N) tensor. In a global-attention block of ViT-B at 1024 px that is
12 x 4096 x 4096 values, twice: the largest single cost of the encoder on a CPU (bf16, 2-vCPU
AMD EPYC: such a block took 1.1 s, 0.7 s with the sums in place; the encoder 7.4-8.6 s, 5.7-6.8
s).

`encode(encoder, images)` runs the encoder's own modules and weights through the same operations
in the same order as `ImageEncoderViT.forward`; the only change is that both sums are made in
place on the logits the product has just made. Each sum rounds as the out-of-place one does, so
the embedding is the module's own, bit for bit (`tests/test_sam_encoder.py`, float32 and bf16
autocast).
"""

from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import (
    Attention,
    Block,
    ImageEncoderViT,
    get_rel_pos,
    window_partition,
    window_unpartition,
)
from torch import Tensor


def encode(encoder: ImageEncoderViT, images: Tensor) -> Tensor:
    """`encoder(images)`: preprocessed images (B, 3, S, S) -> embeddings (B, C, S/16, S/16)."""
    x = encoder.patch_embed(images)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for block in encoder.blocks:
        x = _block(block, x)
    return encoder.neck(x.permute(0, 3, 1, 2))


def _block(block: Block, x: Tensor) -> Tensor:
    """`Block.forward`, its attention run by `_attention`."""
    shortcut = x
    x = block.norm1(x)
    if block.window_size > 0:
        height, width = x.shape[1], x.shape[2]
        x, padded = window_partition(x, block.window_size)
    x = _attention(block.attn, x)
    if block.window_size > 0:
        x = window_unpartition(x, block.window_size, padded, (height, width))
    x = shortcut + x
    return x + block.mlp(block.norm2(x))


def _attention(attn: Attention, x: Tensor) -> Tensor:
    """`Attention.forward` on (B, H, W, C), the relative positions added to the logits in place."""
    batch, height, width, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(batch, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, batch * heads, height * width, -1).unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if attn.use_rel_pos:
        # add_decomposed_rel_pos's einsums, then its two sums, each rounded as there
        rows = get_rel_pos(height, height, attn.rel_pos_h)
        cols = get_rel_pos(width, width, attn.rel_pos_w)
        grid_q = q.reshape(batch * heads, height, width, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, rows)
        rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, cols)
        grid = logits.view(batch * heads, height, width, height, width)
        grid.add_(rel_h[:, :, :, :, None]).add_(rel_w[:, :, :, None, :])
    weights = logits.softmax(dim=-1)
    out = (weights @ v).view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4)
    return attn.proj(out.reshape(batch, height, width, -1))
