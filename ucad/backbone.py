"""A frozen timm Vision Transformer with prompts, computed only up to the feature layer.

One obvious call: `features(images, prompts=None) -> (B, N, D)` patch tokens (prefix tokens dropped)
at the output of block `feature_layer`. Blocks after it cannot change those features, so they are
removed at construction and never run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ucad.config import Config
from ucad.data.images import Geometry
from ucad.digests import file_identity

log = logging.getLogger(__name__)

PROMPT_MODES = ("prefix", "additive")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for and could not be loaded."""


class PromptedViT(nn.Module):
    """Frozen ViT blocks 0..feature_layer plus the prompt arithmetic of UCAD.

    Prompt tensors are plain tensors owned by the caller (one per task):
    - prefix:   (layers, 2, prompt_length, D): per block, extra key and value tokens concatenated
      to the attention's K and V (prefix tuning).
    - additive: (layers, D): per block, one vector added to every token of the block's input.
    """

    def __init__(
        self,
        vit: VisionTransformer,
        feature_layer: int,
        prompt_mode: str = "prefix",
        prompt_length: int = 1,
    ) -> None:
        super().__init__()
        _check_supported(vit, feature_layer)
        if prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
        self.prompt_mode = prompt_mode
        self.prompt_length = prompt_length
        self.layers = feature_layer + 1
        self.embed_dim = vit.embed_dim
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.patch_size = _pair(vit.patch_embed.patch_size)[0]
        self.grid = tuple(vit.patch_embed.grid_size)
        data_cfg = timm.data.resolve_data_config({}, model=vit)
        self.interpolation = data_cfg.get("interpolation", "bicubic")
        self.register_buffer("mean", torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(data_cfg["std"]).view(1, 3, 1, 1))
        self.vit = vit
        vit.blocks = vit.blocks[: self.layers]
        for unused in ("norm", "fc_norm", "head", "head_drop", "attn_pool"):
            if hasattr(vit, unused):
                setattr(vit, unused, nn.Identity())
        self.requires_grad_(False)
        self.eval()
        self.compute_dtype = torch.float32  # what forward passes autocast to (device.autocast)

    def train(self, mode: bool = True) -> PromptedViT:
        # The backbone is frozen: dropout and drop-path stay off even while prompts are trained.
        return super().train(False)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def prompt_shape(self) -> tuple[int, ...]:
        if self.prompt_mode == "prefix":
            return (self.layers, 2, self.prompt_length, self.embed_dim)
        return (self.layers, self.embed_dim)

    def init_prompts(self, generator: torch.Generator) -> Tensor:
        """Fresh prompts for a new task, uniform(-1, 1) as in METHOD.md."""
        return torch.rand(self.prompt_shape(), generator=generator) * 2 - 1

    def prepare(self, images: np.ndarray | Tensor, device: torch.device | None = None) -> Tensor:
        """uint8 (B, H, W, 3) images -> normalised float (B, 3, H, W) on `device`."""
        batch = torch.as_tensor(images)
        device = device or self.mean.device
        batch = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        return (batch - self.mean) / self.std

    def features(self, images: Tensor, prompts: Tensor | None = None) -> Tensor:
        """Patch tokens (B, N, D) at the output of block `feature_layer`."""
        if prompts is not None and tuple(prompts.shape) != self.prompt_shape():
            raise ValueError(
                f"prompts of shape {tuple(prompts.shape)} do not fit this backbone "
                f"(expected {self.prompt_shape()} for mode {self.prompt_mode!r})"
            )
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        for i, block in enumerate(vit.blocks):
            if prompts is None:
                x = block(x)
            elif self.prompt_mode == "additive":
                x = block(x + prompts[i].to(x.dtype))
            else:
                x = block_with_prefix(block, x, _shared_prefix(block.attn, x, prompts[i]))
        return x[:, self.num_prefix_tokens :]


def _shared_prefix(attn: nn.Module, x: Tensor, prefix: Tensor) -> Tensor:
    """One task's prefix (2, P, D) as every image's key and value tokens
    (2, B, heads, P, head_dim), in the dtype `x` computes in (autocast)."""
    heads, head_dim = attn.num_heads, attn.head_dim
    prefix = prefix.to(x.dtype).reshape(2, 1, -1, heads, head_dim).transpose(2, 3)
    return prefix.expand(-1, x.shape[0], -1, -1, -1)


def block_with_prefix(block: nn.Module, x: Tensor, prefix_kv: Tensor) -> Tensor:
    """timm's pre-norm ViT Block whose attention also attends to prefix key/value tokens.

    `prefix_kv`: (2, B, heads, P, head_dim), the keys then the values, one set per image. The
    ONNX export (`ucad.onnx_graph`) runs this same code with a different prefix per image.
    """
    attended = attention_with_prefix(block.attn, block.norm1(x), prefix_kv)
    x = x + block.drop_path1(block.ls1(attended))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def attention_with_prefix(attn: nn.Module, x: Tensor, prefix_kv: Tensor) -> Tensor:
    """timm's Attention.forward with `prefix_kv` (see `block_with_prefix`) put before its own
    keys and values."""
    batch, tokens, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    k = torch.cat([prefix_kv[0], k], dim=2)
    v = torch.cat([prefix_kv[1], v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    out = out.transpose(1, 2).reshape(batch, tokens, -1)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def _check_supported(vit: nn.Module, feature_layer: int) -> None:
    if not isinstance(vit, VisionTransformer):
        raise ValueError(
            f"backbone {type(vit).__name__} is not a timm VisionTransformer; "
            "ucad supports the timm ViT family (vit_*, deit_*, ...)"
        )
    if not 0 <= feature_layer < len(vit.blocks):
        raise ValueError(
            f"feature_layer {feature_layer} is outside the backbone's {len(vit.blocks)} blocks"
        )
    attn = vit.blocks[0].attn
    if not all(hasattr(attn, name) for name in ("qkv", "num_heads", "head_dim", "scale")):
        raise ValueError(f"backbone attention {type(attn).__name__} has no fused qkv projection")


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def create_backbone(config: Config, precision: torch.dtype = torch.float32) -> PromptedViT:
    """Build the prompted backbone the config names, with its pretrained weights.

    Random weights (`pretrained: false`) are drawn from `config.seed`, without touching the
    caller's random state. `precision` is what its forward passes autocast to.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        vit = _create_vit(config)
    backbone = PromptedViT(vit, config.feature_layer, config.prompt_mode, config.prompt_length)
    backbone.compute_dtype = precision
    return backbone


def input_geometry(config: Config, backbone: PromptedViT) -> Geometry:
    """How images become model input: the config's resize and crop, the backbone's interpolation."""
    interpolation = backbone.interpolation
    if interpolation not in ("bicubic", "bilinear"):
        interpolation = "bicubic"
    return Geometry(config.resize_to, config.image_size, interpolation)


def backbone_identity(config: Config) -> dict[str, Any]:
    """What the backbone's weights are, by content or by name: part of the digest of every
    stage that runs it. A weights file enters by its content hash, hub weights by the pretrained
    tag timm resolves the name to, random weights by their seed; the timm version always."""
    identity: dict[str, Any] = {"timm": timm.__version__}
    if not config.pretrained:
        identity["random_seed"] = config.seed
    elif config.weights_file is not None:
        path = Path(config.weights_file).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"{path}: backbone weights file not found (weights_file)")
        identity["weights_sha256"] = file_identity(path)
    else:
        cfg = timm.models.get_pretrained_cfg(config.backbone, allow_unregistered=True)
        source = {k: getattr(cfg, k, None) for k in ("hf_hub_id", "hf_hub_filename", "url")}
        identity["hub"] = {"name": config.backbone, **{k: v for k, v in source.items() if v}}
    return identity


def _create_vit(config: Config) -> VisionTransformer:
    kwargs = {"img_size": config.image_size, **config.backbone_args}
    if not config.pretrained:
        log.warning(
            "backbone %s has random weights: fine for mechanics, meaningless for accuracy",
            config.backbone,
        )
        return timm.create_model(config.backbone, pretrained=False, **kwargs)
    if config.weights_file is not None:
        path = Path(config.weights_file).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"{path}: backbone weights file not found (weights_file)")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    try:
        return timm.create_model(config.backbone, pretrained=True, **kwargs)
    except Exception as err:  # timm raises many kinds (HTTP, OS, RuntimeError for bad keys)
        source = config.weights_file or "the timm / Hugging Face hub"
        offline = ""
        if config.weights_file is None and not os.environ.get("HF_HUB_OFFLINE"):
            offline = (
                " On a machine without internet, HF_HUB_OFFLINE=1 makes this fail at once "
                "(or load weights already in the cache) instead of retrying for a minute."
            )
        raise WeightsUnavailableError(
            f"could not load pretrained weights for {config.backbone} from {source}: {err}\n"
            "Provide them in one of two ways: run once with internet access (timm caches the "
            "weights under ~/.cache/huggingface), or download the checkpoint and set "
            "`weights_file: /path/to/checkpoint` in a config file (--config). "
            "Random weights are used only by the `smoke` preset." + offline
        ) from err
