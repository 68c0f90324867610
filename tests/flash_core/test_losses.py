"""Losses: distillation variants, the discriminator head and LSGAN, and the DMD gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flash_core.losses import (
    DiscriminatorHead,
    DiscriminatorHeadSpec,
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


# The reference's heads layer by layer (gojasper/flash-diffusion's training scripts), written out here, not built
# by the code under test: ("conv", in, out, kernel, stride, padding, bias), ("gn", groups, channels), ("silu",),
# ("flatten",). The counts below are the published ones, checked against the sum of these layers' formulas.
SILU, FLATTEN = ("silu",), ("flatten",)


def _conv(c_in, c_out, kernel, stride, padding, bias=False):
    return ("conv", c_in, c_out, kernel, stride, padding, bias)


def _gn(channels):
    return ("gn", 4, channels)


REFERENCE_HEADS = {  # backbone: (feature channels of the full-size teacher, layers, published parameter count)
    "sd15": (1280, [_conv(1280, 64, 3, 1, 1, bias=True), SILU, _conv(64, 128, 4, 2, 1), SILU, _gn(128),
                    _conv(128, 1, 4, 1, 0), FLATTEN], 870_720),
    "sdxl": (1280, [_conv(1280, 256, 4, 2, 1), SILU,
                    _conv(256, 512, 4, 2, 1), _gn(512), SILU,
                    _conv(512, 1024, 4, 2, 1), _gn(1024), SILU,
                    _conv(1024, 1, 4, 1, 0), FLATTEN], 15_748_096),
    "sd3": (16, [_conv(16, 64, 4, 2, 1), SILU,
                 _conv(64, 128, 4, 2, 1), _gn(128), SILU,
                 _conv(128, 256, 4, 2, 1), _gn(256), SILU,
                 _conv(256, 512, 4, 2, 1), _gn(512), SILU,
                 _conv(512, 1, 4, 1, 0), FLATTEN], 2_778_880),
    "pixart": (8, [_conv(4, 64, 4, 2, 1), SILU,  # 4 of the 8 output channels: learned sigma dropped
                   _conv(64, 128, 4, 2, 1), _gn(128), SILU,
                   _conv(128, 256, 4, 2, 1), _gn(256), SILU,
                   _conv(256, 512, 4, 2, 1), _gn(512), SILU,
                   _conv(512, 1024, 4, 2, 1), _gn(1024), SILU,
                   _conv(1024, 1, 4, 1, 0), FLATTEN], 11_165_440),
}


def _reference_parameters(layer) -> int:
    """Parameters of one reference layer: conv in*out*k^2 (+ out bias), GroupNorm 2*channels (weight, bias)."""
    if layer[0] == "conv":
        _, c_in, c_out, kernel, _, _, bias = layer
        return c_in * c_out * kernel * kernel + (c_out if bias else 0)
    if layer[0] == "gn":
        return 2 * layer[2]
    return 0


def _describe(module: nn.Module) -> tuple:
    """One of our layers in the reference list's terms."""
    if isinstance(module, nn.Conv2d):
        assert module.kernel_size[0] == module.kernel_size[1] and module.stride[0] == module.stride[1]
        assert module.padding[0] == module.padding[1] and module.dilation == (1, 1) and module.groups == 1
        return _conv(module.in_channels, module.out_channels, module.kernel_size[0], module.stride[0],
                     module.padding[0], module.bias is not None)
    if isinstance(module, nn.GroupNorm):
        assert module.affine and module.eps == 1e-5
        return ("gn", module.num_groups, module.num_channels)
    if isinstance(module, nn.SiLU):
        return SILU
    if isinstance(module, nn.Flatten):
        return FLATTEN
    raise AssertionError(f"unexpected layer {module!r}")


@pytest.mark.parametrize("backbone", list(REFERENCE_HEADS))
def test_discriminator_head_is_the_reference_layer_list(backbone):
    """Layer by layer (type, channels, kernel, stride, padding, bias, GroupNorm groups, order) on the full-size
    teacher's features, built on the meta device; the parameter count is the sum over the reference's layers."""
    feature_channels, reference, published = REFERENCE_HEADS[backbone]
    with torch.device("meta"):
        head = DiscriminatorHead(RECIPES[backbone].discriminator_head, feature_channels)
    assert [_describe(m) for m in head.layers] == reference
    assert sum(_reference_parameters(layer) for layer in reference) == published
    assert _head_params(head) == published
    if published > 1e6:
        assert round(published / 1e5) == {"sdxl": 157, "sd3": 28, "pixart": 112}[backbone]  # the paper's 15.7M, 2.8M


def test_sd15_head_keeps_its_parameter_names_and_one_logit():
    """SD1.5 checkpoints written before the per-backbone heads still load: same names and shapes."""
    head = DiscriminatorHead(RECIPES["sd15"].discriminator_head, 1280)
    shapes = {name: tuple(p.shape) for name, p in head.state_dict().items()}
    assert shapes == {"layers.0.weight": (64, 1280, 3, 3), "layers.0.bias": (64,), "layers.2.weight": (128, 64, 4, 4),
                      "layers.4.weight": (128,), "layers.4.bias": (128,), "layers.5.weight": (1, 128, 4, 4)}
    assert head(torch.randn(2, 1280, 8, 8)).shape == (2, 1)  # SD1.5 512 px: 8x8 mid block -> one logit
    assert head(torch.randn(1, 1280, 16, 16)).shape == (1, 25)  # larger maps: 5x5 logits, flattened


@pytest.mark.parametrize("backbone, full_size, logits", [
    ("sd15", 8, 1), ("sdxl", 32, 1),  # UNet mid blocks: SD1.5 at 512 px, SDXL at 1024 px
    ("sd3", 128, 25), ("pixart", 128, 1),  # DiT final outputs at 1024 px (128x128 latents)
])
def test_discriminator_head_sizes_and_upsampling_of_small_maps(backbone, full_size, logits):
    spec = RECIPES[backbone].discriminator_head
    head = DiscriminatorHead(spec, 8)
    assert spec.min_size == {"sd15": 8, "sdxl": 32, "sd3": 64, "pixart": 128}[backbone]  # 4 * 2^(stride-2 convs)
    torch.manual_seed(0)
    assert head(torch.randn(1, 8, full_size, full_size)).shape == (1, logits)
    small = torch.randn(3, 8, 2, 2)  # tiny test models: 2x2 / 4x4 maps
    upsampled = F.interpolate(small[:, : head.in_channels], size=(spec.min_size,) * 2, mode="nearest")
    assert torch.equal(head(small), head.layers(upsampled))  # nearest upsampling to min_size, then the layers
    assert head(small).shape == (3, 1)  # the smallest map that leaves a logit
    wide = head(torch.randn(1, 8, 4, 3 * spec.min_size))
    assert wide.shape == (1, 9)  # 4 -> min_size, 3 min_size kept: 1 x (3 * 4 - 3) logits


def test_pixart_head_reads_the_eps_half_of_the_output():
    head = DiscriminatorHead(RECIPES["pixart"].discriminator_head, 8)
    assert head.in_channels == 4 and head.layers[0].in_channels == 4
    torch.manual_seed(0)
    features = torch.randn(2, 8, 16, 16)
    changed_sigma = torch.cat([features[:, :4], torch.randn(2, 4, 16, 16)], dim=1)
    assert torch.equal(head(features), head(changed_sigma))  # the learned-sigma channels do not reach the head
    assert DiscriminatorHead(RECIPES["sd3"].discriminator_head, 16).in_channels == 16  # SD3: all 16 channels


def test_head_spec_validation():
    with pytest.raises(ValueError, match="pattern"):
        DiscriminatorHeadSpec("patchgan", 64, 2)
    with pytest.raises(ValueError, match="multiple of 4"):
        DiscriminatorHeadSpec("deep", 6, 2)


def test_lsgan_losses():
    big = torch.full((4, 25), 30.0)
    assert discriminator_loss(big, -big) < 1e-12  # perfect discriminator
    assert torch.isclose(discriminator_loss(-big, big), torch.tensor(1.0))  # worst: 0.5 * (1 + 1)
    torch.manual_seed(0)
    real, fake = torch.randn(4, 25), torch.randn(4, 25)
    expected = 0.5 * (((torch.sigmoid(real) - 1) ** 2).mean() + (torch.sigmoid(fake) ** 2).mean())
    assert torch.allclose(discriminator_loss(real, fake), expected)  # the reference's 0.5 factor
    assert generator_adversarial_loss(big) < 1e-12  # the fake fools D
    assert torch.isclose(generator_adversarial_loss(-big), torch.tensor(1.0))  # no 0.5 factor on the generator
    logits = torch.zeros(2, 4, requires_grad=True)
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
