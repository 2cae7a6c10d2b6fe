"""SAM's mask decoder for many point prompts on one image, with the arithmetic reordered.

segment-anything's `MaskDecoder` copies the image embedding once per prompt and runs every
projection of its two-way transformer on each copy: about 1.3 GMAC per prompt before the masks
are upscaled, 1,024 prompts per image. All of that is needed by nobody, because

- in the first block the image side is the same for every prompt (no mask input: the dense
  prompt embedding is one learned vector), so its projections are computed once;
- a token-to-image attention has a handful of queries: `q . (W_k x + b_k)` equals
  `(W_k^T q) . x + q . b_k`, and softmax rows sum to one, so `sum_n a_n (W_v x_n + b_v)` equals
  `W_v (sum_n a_n x_n) + b_v`. The image side is never projected; products with the few
  queries take its place;
- an image-to-token attention has a handful of keys and values: its queries' projection folds
  into the keys the same way, and its output projection into the values (`W_o` applied to each
  value, then mixed), so no (pixels x channels) projection is formed either;
- the final token-to-image attention runs only for the tokens read after it (the IoU token and
  the mask tokens asked for): it treats each token on its own;
- the softmax's 1 / sqrt(d) scales the few queries or keys, not the (prompts x heads x tokens x
  pixels) logits; the products with what all prompts share run per head, on projections stored
  in the layout the products read, so no per-prompt copy of them is made;
- upscaling is two 2x2 stride-2 transposed convolutions: each is a matmul per pixel, run in the
  layout the transformer leaves (pixels, channels), one output row offset at a time so that the
  masks come out in row order, and only for the prompts a caller asks for (those with a mask
  that passes the IoU filter).

The result is the decoder's own function up to float rounding (same modules, same weights,
same nonlinearities; only sums are regrouped). `ImageDecoder(decoder, prompt_encoder, embedding)`
holds what the prompts on one image share; its `tokens` runs the transformer and the IoU head,
its `mask_logits` the upscaling and hypernetworks.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock
from torch import Tensor


@dataclass
class DecodedPrompts:
    """The transformer's outputs for P prompts on one image of h x w embedding cells."""

    image: Tensor  # (P, h*w, C) the image side after the last block
    mask_tokens: Tensor  # (P, M, C) output tokens of the masks asked for
    iou_pred: Tensor  # (P, M) predicted IoU of those masks
    first_mask: int  # index of the first of those M masks among the decoder's mask tokens
    size: tuple[int, int]  # (h, w)


class ImageDecoder:
    """SAM's mask decoder bound to one image embedding (1, C, h, w): what every prompt shares
    (the image side of the first block, positional projections) is computed once, here."""

    def __init__(
        self, decoder: MaskDecoder, prompt_encoder: PromptEncoder, image_embedding: Tensor
    ) -> None:
        self.decoder, self.prompt_encoder = decoder, prompt_encoder
        self.size = (image_embedding.shape[2], image_embedding.shape[3])
        # Without a mask prompt the dense embedding is one vector for all prompts: one image side.
        self.image = image_embedding + prompt_encoder.no_mask_embed.weight[..., None, None]
        self.image = self.image.flatten(2).transpose(1, 2).contiguous()  # (1, N, C)
        self.image_pe = prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)[0]  # (N, C)
        self._shared: dict[tuple[int, str], Tensor] = {}
        self._lock = threading.Lock()

    def tokens(
        self, points: Tensor, labels: Tensor, multimask_output: bool = True
    ) -> DecodedPrompts:
        """Point prompts (P, n, 2) in input coordinates, labels (P, n): the two-way transformer
        and the IoU head, as `MaskDecoder.forward` runs them."""
        decoder = self.decoder
        sparse, _ = self.prompt_encoder(points=(points, labels), boxes=None, masks=None)
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])
        tokens = torch.cat([output_tokens.expand(len(sparse), -1, -1), sparse], dim=1)
        transformer = decoder.transformer
        queries, image = tokens, self.image
        for block in transformer.layers:
            queries, image = self._block(block, queries, image, tokens)
        masks = slice(1, decoder.num_mask_tokens) if multimask_output else slice(0, 1)
        # After the final attention only the IoU token and the mask tokens asked for are read,
        # and it treats each token on its own (queries over the image, a per-token norm): the
        # others (the prompt's tokens, the unused mask tokens) are left out of it.
        used = [0, *range(1 + masks.start, 1 + masks.stop)]
        queries, tokens = queries[:, used], tokens[:, used]
        attended = self._tokens_to_image(
            transformer.final_attn_token_to_image, queries + tokens, image
        )
        queries = transformer.norm_final_attn(queries + attended)

        iou_pred = decoder.iou_prediction_head(queries[:, 0])[:, masks]
        mask_tokens = queries[:, 1:]
        image = image.expand(len(tokens), -1, -1)
        return DecodedPrompts(image, mask_tokens, iou_pred, masks.start, self.size)

    def mask_logits(self, decoded: DecodedPrompts, prompts: Tensor) -> Tensor:
        """Low-res mask logits (len(prompts), M, 4h, 4w) of the prompts at indices `prompts`:
        `output_upscaling`, then each mask token's hypernetwork, as `predict_masks` does."""
        decoder = self.decoder
        up1, norm, act1, up2, act2 = decoder.output_upscaling
        # every prompt, in order: the image side as it is, without an indexed copy
        everyone = torch.equal(prompts.cpu(), torch.arange(len(decoded.image)))
        image = decoded.image if everyone else decoded.image[prompts]  # (p, N, C)
        first, num_masks = decoded.first_mask, decoded.mask_tokens.shape[1]
        mlps = decoder.output_hypernetworks_mlps[first : first + num_masks]
        tokens = decoded.mask_tokens[prompts]
        hyper = torch.stack([mlp(tokens[:, i]) for i, mlp in enumerate(mlps)], dim=1)  # (p, M, C2)
        # A 2x2 stride-2 transposed convolution maps each pixel to its own 2x2 block, so both are
        # per-pixel matmuls. Pixel (i, j) with sub-positions (a, b) and then (a2, b2) lands on row
        # 4i + 2a + a2, column 4j + 2b + b2. Run once per row offset (a, a2), the products come
        # out with their columns in order, (p, M, h rows, 4w columns), and are copied to every
        # fourth row of the result in long runs. Permuting 2-element runs at the end instead took
        # a third of the time: 62-76 ms against 40-45 ms per 4 prompts (ViT-B, bf16, one thread).
        p, (h, w) = len(image), decoded.size
        logits = torch.empty(p, num_masks, h, 2, 2, 4 * w, dtype=hyper.dtype, device=hyper.device)
        for a in range(2):
            x = _transposed_conv_row(image, up1, a)  # (p, N*2, C1): pixels (i, j, b)
            x = act1(F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps))
            for a2 in range(2):
                y = act2(_transposed_conv_row(x, up2, a2))  # (p, N*4, C2): pixels (i, j, b, b2)
                logits[:, :, :, a, a2] = (hyper @ y.transpose(1, 2)).view(p, num_masks, h, 4 * w)
        return logits.view(p, num_masks, 4 * h, 4 * w)

    def _block(
        self, block: TwoWayAttentionBlock, queries: Tensor, image: Tensor, query_pe: Tensor
    ) -> tuple[Tensor, Tensor]:
        """`TwoWayAttentionBlock.forward`; `image` is `self.image` (1, N, C) while all prompts
        share it, (P, N, C) after the first block."""
        if block.skip_first_layer_pe:
            queries = block.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + block.self_attn(q=q, k=q, v=queries)
        queries = block.norm1(queries)
        attended = self._tokens_to_image(block.cross_attn_token_to_image, queries + query_pe, image)
        queries = block.norm2(queries + attended)
        queries = block.norm3(queries + block.mlp(queries))
        summed = self._image_to_tokens(
            block.cross_attn_image_to_token, image, queries + query_pe, queries
        )
        return queries, block.norm4(summed)

    def _tokens_to_image(self, attn: Attention, q: Tensor, image: Tensor) -> Tensor:
        """`attn(q=q, k=image + pe, v=image)`: (P, t, C) queries over `self.image` or (P, N, C)
        pixels."""
        heads, width = attn.num_heads, attn.internal_dim // attn.num_heads
        prompts, tokens, channels = q.shape
        # The softmax's 1 / sqrt(d) scales the few queries, not the (P, h, t, N) logits.
        q = _split(attn.q_proj(q), heads) / math.sqrt(width)  # (P, h, t, d)
        by_head = q.transpose(0, 1).reshape(heads, prompts * tokens, width)
        if image is self.image:  # shared by all prompts: projected once, as the module would
            keys = self._once(attn.k_proj, "image+pe", heads, lambda: image[0] + self.image_pe)
            values = self._once(attn.v_proj, "image", heads, lambda: image[0], transposed=False)
            weights = torch.softmax(torch.bmm(by_head, keys), dim=-1)  # (h, P*t, N)
            mixed = torch.bmm(weights, values).view(heads, prompts, tokens, width)
            return attn.out_proj(mixed.permute(1, 2, 0, 3).flatten(2))
        # q . (W_k (x + pe) + b_k) = (W_k^T q) . x + q . (W_k pe + b_k)
        pe_keys = self._once(attn.k_proj, "pe", heads, lambda: self.image_pe)  # (h, d, N)
        pe_logits = torch.bmm(by_head, pe_keys).view(heads, prompts, tokens, -1)
        w_k = attn.k_proj.weight.view(heads, width, channels)
        query_dirs = torch.einsum("phtd,hdc->phtc", q, w_k).flatten(1, 2)  # (P, h*t, C)
        logits = (query_dirs @ image.transpose(1, 2)).view(prompts, heads, tokens, -1)
        weights = torch.softmax(logits + pe_logits.transpose(0, 1), dim=-1)  # (P, h, t, N)
        # sum_n a_n (W_v x_n + b_v) = W_v (sum_n a_n x_n) + b_v, since the weights sum to one
        mixed = (weights.flatten(1, 2) @ image).view(prompts, heads, tokens, channels)
        w_v = attn.v_proj.weight.view(heads, width, channels)
        values = torch.einsum("phtc,hdc->phtd", mixed, w_v) + attn.v_proj.bias.view(heads, 1, width)
        return attn.out_proj(values.transpose(1, 2).flatten(2))

    def _image_to_tokens(self, attn: Attention, image: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """`image + attn(q=image + pe, k=k, v=v)`, the block's residual sum: `self.image` or
        (P, N, C) pixels over (P, t, C) tokens; returns (P, N, C)."""
        heads, width = attn.num_heads, attn.internal_dim // attn.num_heads
        prompts, tokens, channels = k.shape
        # The softmax's 1 / sqrt(d) scales the few keys, not the (P, h, t, N) logits.
        k = attn.k_proj(k).view(prompts, tokens, heads, width) / math.sqrt(width)
        v = attn.v_proj(v).view(prompts, tokens, heads, width)
        by_head = k.permute(2, 0, 1, 3).reshape(heads, prompts * tokens, width)
        # Logits as (P, h, t, N): the softmax over the few tokens runs along rows of pixels.
        if image is self.image:  # shared by all prompts: projected once
            queries = self._once(attn.q_proj, "image+pe", heads, lambda: image[0] + self.image_pe)
            logits = torch.bmm(by_head, queries).view(heads, prompts, tokens, -1).transpose(0, 1)
        else:
            # W_q x . k = x . (W_q^T k): the keys, not the image, go through the projection
            pe_queries = self._once(attn.q_proj, "pe", heads, lambda: self.image_pe)  # (h, d, N)
            pe_logits = torch.bmm(by_head, pe_queries).view(heads, prompts, tokens, -1)
            w_q = attn.q_proj.weight.view(heads, width, channels)
            key_dirs = torch.einsum("pthd,hdc->phtc", k, w_q).flatten(1, 2)  # (P, h*t, C)
            logits = (key_dirs @ image.transpose(1, 2)).view(prompts, heads, tokens, -1)
            logits = logits + pe_logits.transpose(0, 1)
        weights = torch.softmax(logits, dim=2).flatten(1, 2)  # (P, h*t, N)
        # out_proj(concat_h a_h v_h) = sum_h a_h (W_o,h v_h) + b_o: project the few values.
        # Each head's weights sum to one, so b_o / heads added to every value adds b_o.
        w_o = attn.out_proj.weight.view(channels, heads, width)
        projected = torch.einsum("pthd,chd->phtc", v, w_o) + attn.out_proj.bias / heads
        residual = image.expand(prompts, -1, -1)
        return torch.baddbmm(residual, weights.transpose(1, 2), projected.flatten(1, 2))

    def _once(
        self,
        proj: torch.nn.Linear,
        name: str,
        heads: int,
        inputs: Callable[[], Tensor],
        transposed: bool = True,
    ) -> Tensor:
        """`proj(inputs())` (N, C) split into `heads`: (h, d, N) when `transposed` (keys and
        queries), else (h, N, d) (values); contiguous for the products that read it, and
        computed once per image."""
        key = (id(proj), name)
        with self._lock:  # chunks of prompts may be decoded in several threads
            if key not in self._shared:
                split = proj(inputs()).view(-1, heads, proj.out_features // heads)  # (N, h, d)
                layout = split.permute(1, 2, 0) if transposed else split.transpose(0, 1)
                self._shared[key] = layout.contiguous()
        return self._shared[key]


def _split(x: Tensor, heads: int) -> Tensor:
    """(B, n, h*d) -> (B, h, n, d)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _transposed_conv_row(x: Tensor, conv: torch.nn.ConvTranspose2d, a: int) -> Tensor:
    """Row `a` of a kernel-2 stride-2 `conv`'s 2x2 output blocks: (B, pixels, C_in) ->
    (B, pixels * 2, C_out), each pixel followed by its sub-position b = 0, 1 in that row."""
    c_in, c_out = conv.weight.shape[:2]
    weight = conv.weight[:, :, a].permute(0, 2, 1).reshape(c_in, 2 * c_out)  # (C_in, (b, C_out))
    return F.linear(x, weight.T, conv.bias.repeat(2)).view(x.shape[0], x.shape[1] * 2, c_out)
