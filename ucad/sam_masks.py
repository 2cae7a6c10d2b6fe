"""Segment Anything's automatic masks, batched and computed at the label map's own resolution.

`SamMaskGenerator` gives, for each image, the boolean masks that segment-anything's
`SamAutomaticMaskGenerator.generate` returns for it (one crop layer, `min_mask_region_area=0`,
`multimask_output=True`), in the same order; its parameters are one `SamSettings`, which the SAM
structure sources (`ucad.sam_structure`) take too. It runs on SAM's own modules
(`ResizeLongestSide`, `Sam.preprocess`, `image_encoder`, `prompt_encoder`, `mask_decoder`, `amg`
helpers) but:

- images go through the image encoder in batches, not one by one (on a GPU; on a CPU one at a
  time is faster, see `CPU_IMAGES_PER_PASS`), run by `ucad.sam_encoder.encode`: the encoder's
  own function bit for bit, its attention's relative positions added in place;
- the decoder runs as `ucad.sam_decoder.ImageDecoder`: the same modules and weights with the
  sums regrouped, so that what all prompts on an image share is computed once and no
  (pixels x channels) projection is formed per prompt (about 1.3 GMAC per prompt less); the
  point grid goes through it in chunks of `points_per_batch`, like the reference, or
  `CPU_PROMPTS_PER_PASS` on a CPU, where `CPU_DECODE_THREADS` chunks are decoded at once;
- a prompt's masks are upscaled only when one of them passes the IoU filter (the reference
  upscales all of them first; the filter does not depend on the masks);
- the reference upsamples each 256x256 logit map to 1024x1024, crops the padding and resizes it to
  the image's size. Both resizes are bilinear, hence linear and separable: here they are folded
  into one (H, 256) and one (W, 256) matrix per axis, applied as two matmuls straight to the
  image's size. Same arithmetic up to float rounding (about 1e-6 on a logit), without the 1024x1024
  intermediate;
- IoU filtering happens before the resize, so only surviving logits are resized;
- filtering, stability scores, boxes and NMS stay tensors on the device; no RLE round trip
  (the reference's RLE encode/decode is lossless, so it changes nothing);
- the reference also drops boxes near a crop edge that is not an image edge; with one crop layer
  the crop is the whole image, so that filter never removes anything and is left out.

Under `autocast_dtype` (e.g. bfloat16) the encoder and decoder run in torch.autocast; their outputs
are cast to float32 before any threshold, stability score, resize or NMS. Low-precision IoU
predictions and logits can flip masks that sit right at a threshold, so maps then differ slightly
from float32 maps.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.amg import (
    batched_mask_to_box,
    build_point_grid,
    calculate_stability_score,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops import batched_nms

from ucad.sam_decoder import ImageDecoder
from ucad.sam_encoder import encode

# Enters the digests of SAM structure maps (`ucad.pipeline.structure_identity`): bump it when
# a change to the arithmetic can move a mask's edge, so stores do not mix maps of two versions.
# 2: the regrouped decoder of `ucad.sam_decoder`. 3: one image per encoder pass on a CPU (was
# four; products may round differently for another batch). 4: the decoder's final attention for
# the tokens read only, its shared products per head (rounding may differ). 5: upscaling one
# output row offset at a time (float32 products may round differently).
SAM_GENERATOR_VERSION = "5"

# Prompts decoded together on a CPU: each carries its own copy of the image side (2 MB in bf16 at
# SAM's 64x64x256), and a few copies stay in cache. 4 per pass decoded 1.6x faster per prompt than
# 64 (ViT-B decoder, one thread, 2-vCPU AMD EPYC); 8 a whole image's 1,024 prompts about 7% faster
# than 4, in two threads as below (bf16, paired runs: no prompt upscaled 6.4-7.5 s against 6.6-8.4
# s, every prompt upscaled 10.8-13.9 s against 11.6-14.4 s; 16 no better). The masks do not depend
# on it: 4, 8 and 64 per pass gave the same logits bit for bit, in float32 and bf16. On a GPU,
# `points_per_batch` as in the reference.
CPU_PROMPTS_PER_PASS = 8
# Chunks of prompts decoded at once on a CPU, each in its own thread (with torch's own threads
# inside each). Most of a chunk's operations are too small for torch to spread over the cores, so
# two chunks at a time keep both busy: tokens and upscaling of 256 prompts took 3.6-3.7 s against
# 4.9-5.3 s one chunk at a time, and a whole image's masks 13.0-13.1 s against 14.7-16.5 s
# (ViT-B, bf16, 2-vCPU AMD EPYC; with every prompt upscaled the gain was within the noise).
CPU_DECODE_THREADS = 2
# Images through the image encoder at once on a CPU. Its global-attention blocks form a
# 4096 x 4096 matrix per head and image: a batch only adds memory traffic on a CPU (ViT-B, 2-vCPU
# AMD EPYC, s per image at batch 1/2/4: bf16 7.5/9.9/13.0, float32 16.2/21.1/27.0). On a GPU,
# the caller's batch size.
CPU_IMAGES_PER_PASS = 1


@dataclass(frozen=True)
class SamSettings:
    """How SAM's automatic masks are found, for both SAM structure sources (`ucad.sam_structure`):
    segment-anything's `SamAutomaticMaskGenerator` parameters that ucad sets, named and defaulted
    as there (`SamStructure` passes them on by name), and the precision the networks run at."""

    points_per_side: int = 32
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    box_nms_thresh: float = 0.7
    points_per_batch: int = 64
    stability_score_offset: float = 1.0
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16; None: float32

    @classmethod
    def of(cls, settings: SamSettings | None = None, **fields: Any) -> SamSettings:
        """`settings` (default: the defaults) with the named `fields` replaced; an unknown
        field is a TypeError. Lets callers still pass the settings as keyword arguments."""
        return replace(settings or cls(), **fields)


class SamMaskGenerator:
    """Automatic SAM masks for batches of same-sized uint8 RGB images (see the module docstring)."""

    def __init__(
        self, model: Sam, settings: SamSettings, device: torch.device | str | None = None
    ) -> None:
        if settings.points_per_side < 1 or settings.points_per_batch < 1:
            raise ValueError("points_per_side and points_per_batch must be >= 1")
        self.device = sam_device(device)
        self.model = model.to(self.device).eval()
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self.settings = settings
        # Prompts decoded, those whose masks were upscaled (one passed the IoU filter), and the
        # masks resized (those that passed): what the decoder's cost depends on (`ucad bench`).
        self.prompts_decoded = 0
        self.prompts_upscaled = 0
        self.masks_resized = 0

    @torch.inference_mode()
    def generate(self, images: np.ndarray, batch_size: int = 4) -> list[torch.Tensor]:
        """(N, H, W, 3) uint8 RGB -> per image a (K, H, W) bool tensor on the device.

        Masks come in the reference generator's order: after box NMS, highest predicted IoU first.
        """
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.device.type == "cpu":
            batch_size = min(batch_size, CPU_IMAGES_PER_PASS)
        masks: list[torch.Tensor] = []
        for start in range(0, len(images), batch_size):
            embeddings = self._embed(images[start : start + batch_size])
            masks.extend(
                self._image_masks(embedding[None], images.shape[1:3]) for embedding in embeddings
            )
        return masks

    @torch.inference_mode()
    def count_products(self, image: np.ndarray) -> dict[str, float]:
        """Multiply-accumulates of the matrix products and convolutions that make one image's
        masks, counted by torch's FLOP counter: the image encoder's, those of the transformer
        shared by all prompts, and per prompt those of the transformer and of upscaling its
        masks, per mask those of its resize. `ucad bench` sets them against the machine's
        product rate. The counts depend on shapes only: the encoder is counted on a shape-only
        ("meta") copy, one chunk of prompts in float32 on a random embedding."""
        from torch.utils.flop_counter import FlopCounterMode

        def counted(run: Any) -> float:
            with FlopCounterMode(display=False) as counter:
                run()
            return counter.get_total_flops() / 2  # two FLOPs per multiply-accumulate

        size = image.shape[:2]
        encoder = self.model.image_encoder
        # Its weights replaced by empty meta tensors in the copy: nothing is copied or computed.
        memo: dict[int, Any] = {
            id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for p in encoder.parameters()
        }
        memo.update({id(b): torch.empty_like(b, device="meta") for b in encoder.buffers()})
        shapes = copy.deepcopy(encoder, memo)
        # `Sam.preprocess` pads every image to the encoder's square input
        pixels = torch.empty(1, 3, encoder.img_size, encoder.img_size, device="meta")
        encoder_macs = counted(lambda: encode(shapes, pixels))
        # float32: the counter cannot follow autocast through the decomposed operations
        channels = self.model.prompt_encoder.embed_dim
        cells = self.model.prompt_encoder.image_embedding_size
        embedding = torch.randn(1, channels, *cells, device=self.device)
        decoder = ImageDecoder(self.model.mask_decoder, self.model.prompt_encoder, embedding)
        points = next(self._point_chunks(size))
        labels = torch.ones(points.shape[:2], dtype=torch.int, device=self.device)
        outputs: list[Any] = []
        # the first pass also computes what all prompts share (kept by the decoder after it)
        first = counted(lambda: decoder.tokens(points, labels, multimask_output=True))
        tokens = counted(lambda: outputs.append(decoder.tokens(points, labels, True)))
        everyone = torch.arange(len(points), device=self.device)
        upscale = counted(lambda: outputs.append(decoder.mask_logits(outputs[0], everyone)))
        masks = outputs[1].flatten(0, 1).float()
        resize = counted(lambda: self._resize(masks, size))
        return {
            "encoder_macs": encoder_macs,
            "shared_macs": first - tokens,
            "tokens_macs_per_prompt": tokens / len(points),
            "upscale_macs_per_prompt": upscale / len(points),
            "resize_macs_per_mask": resize / len(masks),
            "masks_per_prompt": float(outputs[1].shape[1]),
            "prompts": float(len(build_point_grid(self.settings.points_per_side))),
        }

    def _embed(self, images: np.ndarray) -> torch.Tensor:
        """Image embeddings (B, C, h, w), the same input pipeline as `SamPredictor.set_image`."""
        if self.model.image_format == "BGR":
            images = images[..., ::-1]
        resized = np.stack([self.transform.apply_image(image) for image in images])
        batch = torch.as_tensor(resized, device=self.device).permute(0, 3, 1, 2).contiguous()
        with autocast_to(self.device, self.settings.autocast_dtype):
            return encode(self.model.image_encoder, self.model.preprocess(batch))

    def _image_masks(self, embedding: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """All surviving masks of one image, after box NMS, in NMS order."""
        decoder = ImageDecoder(self.model.mask_decoder, self.model.prompt_encoder, embedding)
        chunks = self._point_chunks(size)
        if self.device.type == "cpu":
            # Chunks are independent and come back in order: the same masks as one at a time.
            pool = ThreadPoolExecutor(CPU_DECODE_THREADS, thread_name_prefix="sam-decode")
            try:
                results = list(
                    pool.map(lambda points: self._candidates(decoder, points, size), chunks)
                )
            finally:  # an error or an interrupt does not wait for the chunks not yet started
                pool.shutdown(cancel_futures=True)
        else:
            results = [self._candidates(decoder, points, size) for points in chunks]
        masks = torch.cat([result[0] for result in results])
        iou_preds = torch.cat([result[1] for result in results])
        self.prompts_decoded += sum(result[2] for result in results)
        self.prompts_upscaled += sum(result[3] for result in results)
        self.masks_resized += sum(result[4] for result in results)
        boxes = batched_mask_to_box(masks)
        keep = batched_nms(
            boxes.float(),
            iou_preds,
            torch.zeros_like(boxes[:, 0]),  # one category, as in the reference
            iou_threshold=self.settings.box_nms_thresh,
        )
        return masks[keep]

    def _point_chunks(self, size: tuple[int, int]) -> Iterator[torch.Tensor]:
        """The point grid in model input coordinates, (P, 1, 2) float64 per chunk."""
        height, width = size
        points = build_point_grid(self.settings.points_per_side) * np.array([[width, height]])
        # float64 like the reference: the prompt encoder normalises before casting to float32.
        coords = torch.as_tensor(self.transform.apply_coords(points, size), device=self.device)
        # The masks do not depend on the chunking; only speed does (see CPU_PROMPTS_PER_PASS).
        per_pass = self.settings.points_per_batch
        if self.device.type == "cpu":
            per_pass = min(per_pass, CPU_PROMPTS_PER_PASS)
        for start in range(0, len(coords), per_pass):
            yield coords[start : start + per_pass, None, :]

    @torch.inference_mode()
    def _candidates(
        self, decoder: ImageDecoder, points: torch.Tensor, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
        """Masks (M, H, W) bool and their predicted IoU (M,) that pass both thresholds, in the
        reference's point-major order; and the numbers of prompts decoded and upscaled, and of
        masks resized.

        Runs in a worker thread on a CPU: inference mode and autocast are per thread, so both
        are entered here."""
        labels = torch.ones(points.shape[:2], dtype=torch.int, device=self.device)
        with autocast_to(self.device, self.settings.autocast_dtype):
            decoded = decoder.tokens(points, labels, multimask_output=True)
        iou_preds = decoded.iou_pred.float()  # (P, 3)
        keep = torch.ones_like(iou_preds, dtype=torch.bool)
        if self.settings.pred_iou_thresh > 0.0:
            keep = iou_preds > self.settings.pred_iou_thresh
        # Only prompts with a mask past the IoU filter are upscaled: the filter does not depend
        # on the masks, and upscaling is half of the decoder's work.
        prompts = keep.any(dim=1).nonzero()[:, 0]
        with autocast_to(self.device, self.settings.autocast_dtype):
            logits = decoder.mask_logits(decoded, prompts)
        passed = keep[prompts]  # (p, 3): which of the upscaled prompts' masks passed
        logits, iou_preds = logits[passed].float(), iou_preds[prompts][passed]
        resized = len(logits)
        logits = self._resize(logits, size)
        threshold = self.model.mask_threshold
        if self.settings.stability_score_thresh > 0.0:
            stability = calculate_stability_score(
                logits, threshold, self.settings.stability_score_offset
            )
            keep = stability >= self.settings.stability_score_thresh
            logits, iou_preds = logits[keep], iou_preds[keep]
        return logits > threshold, iou_preds, len(points), len(prompts), resized

    def _resize(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(M, h, w) low-res logits -> (M, H, W): the reference's upscale, crop and resize."""
        input_size = self.transform.get_preprocess_shape(*size, self.transform.target_length)
        img_size = self.model.image_encoder.img_size
        rows = resize_matrix(logits.shape[1], img_size, input_size[0], size[0]).to(logits.device)
        cols = resize_matrix(logits.shape[2], img_size, input_size[1], size[1]).to(logits.device)
        return rows @ logits @ cols.T


def sam_device(device: torch.device | str | None) -> torch.device:
    """`device`, else the GPU when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def autocast_to(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    """torch.autocast to `dtype` on `device`'s type; None: no autocast (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@lru_cache(maxsize=16)
def resize_matrix(low: int, padded: int, kept: int, out: int) -> torch.Tensor:
    """(out, low) float32: bilinear `low` -> `padded`, keep the first `kept`, bilinear -> `out`.

    `Sam.postprocess_masks` along one axis, as a matrix. Bilinear resizing (align_corners=False)
    is separable, so the 2-D operation is `rows @ logits @ cols.T`.
    """
    basis = torch.eye(low, dtype=torch.float64)[:, None, :]  # each row is one input sample
    upscaled = F.interpolate(basis, size=padded, mode="linear", align_corners=False)
    resized = F.interpolate(upscaled[..., :kept], size=out, mode="linear", align_corners=False)
    return resized[:, 0, :].T.float().contiguous()
