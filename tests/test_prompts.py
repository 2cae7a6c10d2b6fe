import math

import numpy as np
import pytest
import timm
import torch

from ucad.backbone import PromptedViT
from ucad.config import load_config
from ucad.stages.prompts import scl_loss, train_prompts


def test_scl_loss_by_hand():
    features = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])  # normalised: (1,0), (0,1)
    # S = f f^T / 0.5 = [[2, 0], [0, 2]]
    same = torch.tensor([[1, 1]])  # M = all ones: mean(-S) = -(2 + 0 + 0 + 2) / 4
    assert scl_loss(features, same).item() == pytest.approx(-1.0)
    different = torch.tensor([[1, 2]])  # M = I: (-2 + e^0 + e^0 - 2) / 4
    assert scl_loss(features, different).item() == pytest.approx(-0.5)
    # lambda weights scale the two parts: (-2*2 + 3*(1 + 1) - 2*2) / 4
    weighted = scl_loss(features, different, lambda_pos=2.0, lambda_neg=3.0)
    assert weighted.item() == pytest.approx(-0.5)
    # temperature 1: S = I; M = I -> (-1 + 1 + 1 - 1) / 4 = 0
    assert scl_loss(features, different, temperature=1.0).item() == pytest.approx(0.0)
    assert math.isfinite(scl_loss(torch.randn(2, 5, 4), torch.randint(0, 3, (2, 5))).item())


def tiny_backbone():
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2
    )
    return PromptedViT(vit, feature_layer=1)


def test_training_lowers_the_loss_and_is_reproducible():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = np.tile(np.repeat([1, 2], 8), (6, 1))  # top half one region, bottom half another
    config = load_config("smoke", overrides={"epochs": 6, "batch_size": 3, "lr": 0.05})
    losses = []
    prompts = train_prompts(
        tiny_backbone(), images, labels, config, lambda e, loss: losses.append(loss)
    )
    assert len(losses) == 6
    assert losses[-1] < losses[0]
    assert prompts.shape == (2, 2, 1, 16) and not prompts.requires_grad
    again = train_prompts(tiny_backbone(), images, labels, config)
    torch.testing.assert_close(prompts, again)


def seeded_uniform(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """uniform(-1, 1) drawn from a generator seeded with `seed`, as METHOD.md initialises."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("seed", [0, 7])
def test_zero_epochs_keeps_the_seeded_initialisation(seed):
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    config = load_config("smoke", overrides={"epochs": 0, "seed": seed})
    prompts = train_prompts(tiny_backbone(), images, np.zeros((2, 16), dtype=int), config)
    assert prompts.min() >= -1 and prompts.max() <= 1
    # exactly the config seed's draw: the seed reaches the initialisation, nothing else does
    torch.testing.assert_close(prompts, seeded_uniform((2, 2, 1, 16), seed), rtol=0, atol=0)
    assert not torch.equal(prompts, seeded_uniform((2, 2, 1, 16), seed + 1))


def test_additive_prompts_start_from_the_same_seeded_draw():
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2
    )
    backbone = PromptedViT(vit, feature_layer=1, prompt_mode="additive")
    config = load_config("smoke", overrides={"epochs": 0, "seed": 3})
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    prompts = train_prompts(backbone, images, np.zeros((2, 16), dtype=int), config)
    torch.testing.assert_close(prompts, seeded_uniform((2, 16), 3), rtol=0, atol=0)


def test_mismatched_structure_maps_are_an_error():
    config = load_config("smoke")
    with pytest.raises(ValueError, match="3 images but 2 structure maps"):
        train_prompts(
            tiny_backbone(), np.zeros((3, 32, 32, 3), np.uint8), np.zeros((2, 16)), config
        )
