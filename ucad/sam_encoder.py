"""SAM's image encoder, run block by block with the attention's relative positions added in place
and its logits formed a few million at a time.

segment-anything's `Attention` adds its decomposed relative positions to the attention logits as
`attn.view(...) + rel_h[..., None] + rel_w[..., None, :]`: two broadcast sums, each allocating and
writing a new (heads, N, N) tensor. In a global-attention block of ViT-B at 1024 px that is
12 x 4096 x 4096 values, twice: the largest single cost of the encoder on a CPU (bf16, 2-vCPU
AMD EPYC: such a block took 1.1 s, 0.7 s with the sums in place; the encoder 7.4-8.6 s, 5.7-6.8
s). Even in place, the logits are 400 MB per image and block in bf16, made and freed four times
per image: glibc hands memory that size back to the kernel when it is freed, so each block paid a
page fault per 4 kB page (about a million per image) besides the memory traffic. Formed
`LOGITS_PER_CHUNK` values at a time on a CPU (16 rows of the image's queries for one head), they
stay in cache: the encoder took 6.2-6.3 s per image, 5.2-5.6 s chunked (ViT-B, bf16, in a worker
thread as the pipeline runs it; page faults 1.1 million, 0.2 million).

`encode(encoder, images)` runs the encoder's own modules and weights through the same operations
in the same order as `ImageEncoderViT.forward`; the only changes are that both sums are made in
place on the logits the product has just made, and that the products, sums and softmax run on
chunks of whole rows of the logits. Each sum rounds as the out-of-place one does, and a chunk's
rows are the same dot products, so the embedding is the module's own, bit for bit
(`tests/test_sam_encoder.py`, float32 and bf16 autocast; also checked on SAM ViT-B at 1024 px).
The float32 matrix product picks its kernel by size, so some chunk sizes (30 queries, in a test)
round differently; at SAM's 1024 px every chunk is 1,024 queries (16 rows of 64), checked bit for
bit on ViT-B. On a GPU the logits are formed whole, as the module forms them.
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

# Attention logits formed at once, at most (whole rows of queries, at least one row): a global
# block's 12 heads x 4096 x 4096 values at once, 400 MB per image in bf16, cost more in memory
# traffic and in page faults for the fresh memory than in arithmetic. 4M values (8 MB in bf16) stay
# in cache for the sums and the softmax.
LOGITS_PER_CHUNK = 1 << 22


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
    """`Attention.forward` on (B, H, W, C): the relative positions added to the logits in place,
    and the logits formed `LOGITS_PER_CHUNK` values at a time."""
    batch, height, width, _ = x.shape
    heads, pixels = attn.num_heads, height * width
    qkv = attn.qkv(x).reshape(batch, pixels, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, batch * heads, pixels, -1).unbind(0)
    if attn.use_rel_pos:
        # add_decomposed_rel_pos's einsums, on the unscaled queries as there
        grid_q = q.reshape(batch * heads, height, width, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, get_rel_pos(height, height, attn.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, get_rel_pos(width, width, attn.rel_pos_w))
    q = q * attn.scale
    # Whole rows of the image's queries per chunk, and whole (image, head) maps once a chunk
    # holds all of a map's rows; on a CPU only (a GPU has no page faults to avoid, and would
    # launch more kernels).
    per_chunk = LOGITS_PER_CHUNK if x.device.type == "cpu" else batch * heads * pixels * pixels
    rows = max(1, min(height, per_chunk // (width * pixels)))
    maps = max(1, per_chunk // (pixels * pixels)) if rows == height else 1
    out: Tensor | None = None
    for m in range(0, batch * heads, maps):
        maps_m = slice(m, m + maps)
        for r in range(0, height, rows):
            rows_r, queries = slice(r, r + rows), slice(r * width, (r + rows) * width)
            logits = q[maps_m, queries] @ k[maps_m].transpose(-2, -1)
            if attn.use_rel_pos:
                # add_decomposed_rel_pos's two sums, each rounded as there
                grid = logits.view(logits.shape[0], -1, width, height, width)
                grid.add_(rel_h[maps_m, rows_r, :, :, None]).add_(rel_w[maps_m, rows_r, :, None, :])
            chunk = logits.softmax(dim=-1) @ v[maps_m]
            if out is None:  # the dtype the products run in (autocast's, else the input's)
                out = chunk.new_empty(batch * heads, pixels, chunk.shape[-1])
            out[maps_m, queries] = chunk
    assert out is not None
    out = out.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4)
    return attn.proj(out.reshape(batch, height, width, -1))
