"""Losses: distillation variants, the discriminator head and LSGAN, and the DMD gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flash_core.losses import (
    DiscriminatorHead,
    discriminator_loss,
    distillation_loss,
    dmd_gradient,
    dmd_loss,
    generator_adversarial_loss,
)
from flash_core.recipes import RECIPES


def test_distillation_losses():
    torch.manual_seed(0)
    a, b = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.allclose(distillation_loss(a, b, "l2"), ((a - b) ** 2).mean())
    assert torch.allclose(distillation_loss(a, b, "l1"), (a - b).abs().mean())
    huber = distillation_loss(a, b, "huber")
    assert 0 < huber < distillation_loss(a, b, "l1")  # pseudo-Huber with tiny c ~ L1 from below
    for kind in ("l2", "l1", "huber"):
        assert distillation_loss(a, a, kind) == 0
    with pytest.raises(ValueError, match="distill_loss"):
        distillation_loss(a, b, "l3")


def test_lpips_is_refused_with_the_reason():
    from flash_core.distill import DistillConfig

    for make in (lambda: DistillConfig(distill_loss="lpips"),
                 lambda: distillation_loss(torch.zeros(1), torch.zeros(1), "lpips")):
        with pytest.raises(ValueError) as err:
            make()
        assert "VAE-decoded" in str(err.value) and "VGG" in str(err.value) and "'l2'" in str(err.value)


def _head_params(head) -> int:
    return sum(p.numel() for p in head.parameters())


def test_discriminator_head_is_the_reference_architecture():
    """SD1.5: conv3x3 1280->64 (bias), SiLU, conv4x4/2 64->128, SiLU, GroupNorm(4, 128), conv4x4 valid 128->1."""
    head = DiscriminatorHead(1280, RECIPES["sd15"].discriminator_channels)
    layers = list(head.layers)
    assert [type(m) for m in layers] == [nn.Conv2d, nn.SiLU, nn.Conv2d, nn.SiLU, nn.GroupNorm, nn.Conv2d]
    conv1, conv2, norm, conv3 = layers[0], layers[2], layers[4], layers[5]
    assert (conv1.weight.shape, conv1.bias.shape, conv1.stride, conv1.padding) == ((64, 1280, 3, 3), (64,), (1, 1), (1, 1))
    assert (conv2.weight.shape, conv2.bias, conv2.stride, conv2.padding) == ((128, 64, 4, 4), None, (2, 2), (1, 1))
    assert (norm.num_groups, norm.num_channels, norm.affine) == (4, 128, True)
    assert (conv3.weight.shape, conv3.bias, conv3.stride, conv3.padding) == ((1, 128, 4, 4), None, (1, 1), (0, 0))
    counts = [_head_params(m) for m in (conv1, conv2, norm, conv3)]
    assert counts == [737_344, 131_072, 256, 2_048] and _head_params(head) == 870_720
    assert head(torch.randn(2, 1280, 8, 8)).shape == (2, 1, 1, 1)  # SD1.5 512 px: 8x8 mid block -> one logit
    assert head(torch.randn(1, 1280, 16, 16)).shape == (1, 1, 5, 5)  # larger maps: a map of logits


@pytest.mark.parametrize("backbone, feature_channels, total, published", [
    ("sd15", 1280, 870_720, 870_720),  # UNet mid block
    ("sdxl", 1280, 15_737_184, 15.7e6),  # UNet mid block
    ("sd3", 16, 2_801_728, 2.8e6),  # DiT: the teacher's final output (SD3 medium: 16 latent channels)
    ("pixart", 8, 2_783_296, None),  # DiT final output with learned sigma; no published size: SD3's widths
])
def test_discriminator_head_sizes_per_backbone(backbone, feature_channels, total, published):
    hidden, width = RECIPES[backbone].discriminator_channels
    head = DiscriminatorHead(feature_channels, (hidden, width))
    shapes = [tuple(p.shape) for p in head.parameters()]
    assert shapes == [(hidden, feature_channels, 3, 3), (hidden,), (width, hidden, 4, 4), (width,), (width,),
                      (1, width, 4, 4)]
    assert _head_params(head) == total
    if published is not None:
        assert round(total / 1e5) == round(published / 1e5)  # the paper's sizes, to its 0.1M precision
    if backbone == "pixart":
        assert RECIPES["pixart"].discriminator_channels == RECIPES["sd3"].discriminator_channels


def test_discriminator_head_upsamples_small_feature_maps():
    head = DiscriminatorHead(16, (8, 12))
    torch.manual_seed(0)
    small = torch.randn(3, 16, 2, 2)  # tiny test models: 2x2 / 4x4 mid blocks
    assert head(small).shape == (3, 1, 1, 1)
    upsampled = F.interpolate(small, size=(8, 8), mode="nearest")
    assert torch.equal(head(small), head.layers(upsampled))  # nearest upsampling to 8x8, then the layers
    assert head(torch.randn(1, 16, 4, 12)).shape == (1, 1, 1, 3)  # each side at least 8


def test_lsgan_losses():
    big = torch.full((4, 1, 2, 2), 30.0)
    assert discriminator_loss(big, -big) < 1e-12  # perfect discriminator
    assert torch.isclose(discriminator_loss(-big, big), torch.tensor(2.0))  # worst discriminator
    assert generator_adversarial_loss(big) < 1e-12  # the fake fools D
    logits = torch.zeros(2, 1, 2, 2, requires_grad=True)
    generator_adversarial_loss(logits).backward()
    assert (logits.grad < 0).all()  # descending raises D(fake) towards "real"


def _x0_from_eps(x_t, eps, alpha, sigma):
    return (x_t - sigma * eps) / alpha


def test_dmd_gradient_zero_when_scores_agree():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    eps = torch.randn(2, 4, 8, 8)
    alpha, sigma = torch.tensor(0.6).reshape(1, 1, 1, 1), torch.tensor(0.8).reshape(1, 1, 1, 1)
    grad = dmd_gradient(x, torch.randn_like(x), eps, eps.clone(), alpha, sigma)
    assert torch.equal(grad, torch.zeros_like(grad))
    loss = dmd_loss(x, grad)
    loss.backward()
    assert loss == 0 and torch.equal(x.grad, torch.zeros_like(x))


def test_dmd_gradient_is_normalised_x0_difference():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    x_t = torch.randn(2, 4, 8, 8)
    eps_real, eps_fake = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    alpha = torch.tensor([0.9, 0.3]).reshape(2, 1, 1, 1)
    sigma = (1 - alpha**2).sqrt()
    x0_real = _x0_from_eps(x_t, eps_real, alpha, sigma)
    x0_fake = _x0_from_eps(x_t, eps_fake, alpha, sigma)
    grad = dmd_gradient(x, x0_real, eps_real, eps_fake, alpha, sigma)
    norm = (x.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(grad, (x0_fake - x0_real) / norm, atol=1e-5)  # x0_fake - x0_real, normalised
    loss = dmd_loss(x, grad)
    loss.backward()
    assert torch.allclose(x.grad, 2 * grad / x.numel(), atol=1e-7)  # MSE(x, sg(x - grad)) pushes x by grad
    # One descent step moves x towards the real-score prediction relative to the fake one.
    cosine = F.cosine_similarity(-x.grad.flatten(1), (x0_real - x0_fake).flatten(1), dim=1)  # per sample
    assert (cosine > 0.999).all()
