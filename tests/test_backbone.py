import pytest
import timm
import torch

from ucad.backbone import PromptedViT, WeightsUnavailableError, create_backbone
from ucad.config import load_config


def tiny_vit(**kwargs):
    args = dict(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=2, **kwargs)
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(**args)


def test_frozen_features_match_timm_blocks_up_to_feature_layer():
    vit = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        for block in vit.blocks[:2]:
            x = block(x)
        expected = x[:, 1:]
    backbone = PromptedViT(vit, feature_layer=1)
    assert len(backbone.vit.blocks) == 2  # later blocks are dropped, never computed
    with torch.no_grad():
        features = backbone.features(images)
    assert features.shape == (2, 16, 16)
    torch.testing.assert_close(features, expected)


def test_prefix_prompts_are_extra_attention_keys_and_values():
    backbone = PromptedViT(tiny_vit(), feature_layer=0, prompt_mode="prefix", prompt_length=2)
    prompts = torch.randn(backbone.prompt_shape())
    assert prompts.shape == (1, 2, 2, 16)
    images = torch.randn(1, 3, 32, 32)
    vit = backbone.vit
    block = vit.blocks[0]
    attn = block.attn
    with torch.no_grad():
        x = vit._pos_embed(vit.patch_embed(images))
        h = block.norm1(x)
        q, k, v = attn.qkv(h).reshape(1, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
        pk = prompts[0, 0].reshape(2, 2, 8).transpose(0, 1)[None]
        pv = prompts[0, 1].reshape(2, 2, 8).transpose(0, 1)[None]
        weights = (q @ torch.cat([pk, k], 2).transpose(-1, -2) * 8**-0.5).softmax(-1)
        out = (weights @ torch.cat([pv, v], 2)).transpose(1, 2).reshape(1, -1, 16)
        x = x + attn.proj(out)
        x = x + block.mlp(block.norm2(x))
        features = backbone.features(images, prompts)
    torch.testing.assert_close(features, x[:, 1:])


def test_additive_prompts_add_to_each_block_input():
    backbone = PromptedViT(tiny_vit(), feature_layer=1, prompt_mode="additive")
    prompts = torch.randn(backbone.prompt_shape())
    images = torch.randn(2, 3, 32, 32)
    vit = backbone.vit
    with torch.no_grad():
        x = vit._pos_embed(vit.patch_embed(images))
        x = vit.blocks[1](vit.blocks[0](x + prompts[0]) + prompts[1])
        torch.testing.assert_close(backbone.features(images, prompts), x[:, 1:])
        zero = backbone.features(images, torch.zeros(backbone.prompt_shape()))
        torch.testing.assert_close(zero, backbone.features(images))


def test_gradients_reach_prompts_only():
    backbone = PromptedViT(tiny_vit(), feature_layer=1)
    prompts = torch.randn(backbone.prompt_shape(), requires_grad=True)
    backbone.train()
    assert not backbone.training  # frozen: no dropout while prompts train
    backbone.features(torch.randn(2, 3, 32, 32), prompts).square().mean().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())


def test_prepare_normalises_with_the_backbone_config():
    backbone = PromptedViT(tiny_vit(), feature_layer=0)
    images = torch.full((1, 32, 32, 3), 255, dtype=torch.uint8)
    prepared = backbone.prepare(images)
    assert prepared.shape == (1, 3, 32, 32)
    expected = (1 - backbone.mean) / backbone.std
    torch.testing.assert_close(prepared[0, :, 0, 0], expected.flatten())


def test_wrong_prompt_shape_and_bad_layer_are_clear_errors():
    backbone = PromptedViT(tiny_vit(), feature_layer=1)
    with pytest.raises(ValueError, match="do not fit"):
        backbone.features(torch.randn(1, 3, 32, 32), torch.randn(3, 16))
    with pytest.raises(ValueError, match="feature_layer 9"):
        PromptedViT(tiny_vit(), feature_layer=9)
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        PromptedViT(torch.nn.Linear(2, 2), feature_layer=0)


def test_missing_weights_file_names_the_file(tmp_path):
    config = load_config(
        "smoke", overrides={"pretrained": True, "weights_file": str(tmp_path / "w.pth")}
    )
    with pytest.raises(WeightsUnavailableError, match="w.pth"):
        create_backbone(config)


def test_local_weights_file_is_loaded(tmp_path):
    config = load_config("smoke", overrides={"backbone_args": {"depth": 2}, "feature_layer": 1})
    reference = timm.create_model(config.backbone, pretrained=False, depth=2)
    path = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), path)
    loaded = create_backbone(
        config.model_copy(update={"pretrained": True, "weights_file": str(path)})
    )
    torch.testing.assert_close(
        loaded.vit.blocks[1].attn.qkv.weight, reference.blocks[1].attn.qkv.weight
    )


def test_unreachable_hub_says_how_to_provide_weights(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    config = load_config("paper")
    with pytest.raises(WeightsUnavailableError, match="weights_file") as error:
        create_backbone(config)
    assert "HF_HUB_OFFLINE=1" in str(error.value)  # the hint for a machine without internet
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # already set: no hint to set it
    with pytest.raises(WeightsUnavailableError, match="weights_file") as error:
        create_backbone(config)
    assert "HF_HUB_OFFLINE" not in str(error.value)
