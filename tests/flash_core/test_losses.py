"""Losses: distillation variants, the discriminator head and LSGAN, and the DMD gradient."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from flash_core.losses import (
    DiscriminatorHead,
    discriminator_loss,
    distillation_loss,
    dmd_gradient,
    dmd_loss,
    generator_adversarial_loss,
    make_lpips_loss,
)


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


def test_lpips_missing_is_a_clear_error():
    if importlib.util.find_spec("lpips") is not None:
        pytest.fail("lpips is installed here: this test expects the offline environment without it")
    with pytest.raises(RuntimeError, match="'l2', 'l1' or 'huber'"):
        make_lpips_loss()
    with pytest.raises(ValueError, match="LPIPS"):
        distillation_loss(torch.zeros(1), torch.zeros(1), "lpips")


def test_discriminator_head_size_and_shapes():
    head = DiscriminatorHead(1280)
    assert sum(p.numel() for p in head.parameters()) == 870_720
    assert head(torch.randn(2, 1280, 8, 8)).shape == (2, 1, 2, 2)  # SD1.5 512px: 8x8 mid block
    assert head(torch.randn(1, 1280, 2, 2)).shape == (1, 1, 1, 1)  # small maps are upsampled to 4x4
    small = DiscriminatorHead(16, (8, 12))
    assert small(torch.randn(3, 16, 16, 16)).shape == (3, 1, 4, 4)


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
