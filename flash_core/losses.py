"""Flash Diffusion losses: distillation, latent adversarial (discriminator head, LSGAN) and DMD.

Every function here is pure tensor math on what the trainer (`flash_core.distill`) hands it; the models
are called by the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DISTILL_LOSSES = ("l2", "l1", "huber")
HUBER_C = 0.001  # pseudo-Huber constant (latent space)
# Why the paper's LPIPS distillation loss is not offered (DistillConfig rejects "lpips" with this text).
LPIPS_REMOVED = (
    "distill_loss 'lpips' is not supported: the paper's LPIPS compares VAE-decoded 64x64-latent centre crops "
    "with ImageNet VGG features, which needs the VAE decoder in the training step and VGG weights that this "
    "pack does not ship (and cannot download offline). Use distill_loss 'l2' (the default), 'l1' or 'huber', "
    "which compare latents."
)


# ---- distillation -------------------------------------------------------------------------------
def distillation_loss(student_x0: Tensor, teacher_x0: Tensor, kind: str = "l2") -> Tensor:
    """Student x0 vs teacher multi-step x0, in latent space."""
    if kind == "l2":
        return F.mse_loss(student_x0.float(), teacher_x0.float())  # ||x - x0_teacher||^2
    if kind == "l1":
        return F.l1_loss(student_x0.float(), teacher_x0.float())  # |x - x0_teacher|
    if kind == "huber":
        diff2 = (student_x0.float() - teacher_x0.float()) ** 2
        return (torch.sqrt(diff2 + HUBER_C**2) - HUBER_C).mean()  # pseudo-Huber sqrt(d^2 + c^2) - c
    if kind == "lpips":
        raise ValueError(LPIPS_REMOVED)
    raise ValueError(f"unknown distill_loss {kind!r}; choose one of {DISTILL_LOSSES}")


# ---- adversarial --------------------------------------------------------------------------------
HEAD_PATTERNS = ("sd15", "deep")
GROUP_NORM_GROUPS = 4  # GroupNorm groups of every reference head


@dataclass(frozen=True)
class DiscriminatorHeadSpec:
    """One backbone's discriminator head, as the reference builds it (built by DiscriminatorHead).

    pattern "sd15": conv3x3 stride 1 (in -> feature_dim, with bias) -> SiLU, then `num_blocks` x
      [conv4x4 stride 2 -> SiLU -> GroupNorm]; "deep": conv4x4 stride 2 (in -> feature_dim) -> SiLU, then
      `num_blocks` x [conv4x4 stride 2 -> GroupNorm -> SiLU]. Each block doubles the width; both end in a
      valid conv4x4 (-> 1 logit per position) and Flatten. Convolutions other than SD1.5's first have no bias.
    drop_learned_sigma: the head reads the first half of the feature channels (PixArt's final output is
      [eps, learned sigma]; the reference head sees the 4 eps channels of its 8).
    """

    pattern: str
    feature_dim: int  # width of the first convolution
    num_blocks: int  # stride-2 blocks after the first convolution
    drop_learned_sigma: bool = False

    def __post_init__(self) -> None:
        if self.pattern not in HEAD_PATTERNS:
            raise ValueError(f"discriminator head pattern must be one of {HEAD_PATTERNS}, got {self.pattern!r}")
        if self.feature_dim < GROUP_NORM_GROUPS or self.feature_dim % GROUP_NORM_GROUPS or self.num_blocks < 0:
            raise ValueError(
                f"discriminator head: feature_dim must be a positive multiple of {GROUP_NORM_GROUPS} (GroupNorm "
                f"groups) and num_blocks >= 0, got {self.feature_dim} and {self.num_blocks}"
            )

    def input_channels(self, feature_channels: int) -> int:
        """Channels the head reads of a `feature_channels`-channel feature map."""
        return feature_channels // 2 if self.drop_learned_sigma else feature_channels

    @property
    def min_size(self) -> int:
        """Smallest map side that leaves a logit: each stride-2 conv halves it, the last conv needs 4."""
        num_halvings = self.num_blocks + (self.pattern == "deep")
        return 4 * 2**num_halvings

    def layers(self, in_channels: int) -> list[nn.Module]:
        """The head's layers in order (the reference's list)."""
        width = self.feature_dim
        if self.pattern == "sd15":
            layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=True), nn.SiLU()]
        else:
            layers = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1, bias=False), nn.SiLU()]
        for _ in range(self.num_blocks):
            conv = nn.Conv2d(width, 2 * width, 4, stride=2, padding=1, bias=False)
            norm = nn.GroupNorm(GROUP_NORM_GROUPS, 2 * width)
            layers += [conv, nn.SiLU(), norm] if self.pattern == "sd15" else [conv, norm, nn.SiLU()]
            width *= 2
        return layers + [nn.Conv2d(width, 1, 4, stride=1, padding=0, bias=False), nn.Flatten()]


# The reference heads (Recipe.discriminator_head; parameter counts on the full-size teachers' features):
SD15_HEAD = DiscriminatorHeadSpec("sd15", feature_dim=64, num_blocks=1)  # 1280-ch mid block: 870,720
SDXL_HEAD = DiscriminatorHeadSpec("deep", feature_dim=256, num_blocks=2)  # 1280-ch mid block: 15,748,096
SD3_HEAD = DiscriminatorHeadSpec("deep", feature_dim=64, num_blocks=3)  # 16-ch final output: 2,778,880
# PixArt: 4 of its 8 output channels: 11,165,440
PIXART_HEAD = DiscriminatorHeadSpec("deep", feature_dim=64, num_blocks=4, drop_learned_sigma=True)


class DiscriminatorHead(nn.Module):
    """Trainable head on frozen-teacher features (the paper's latent discriminator): logits, flattened.

    `spec` (Recipe.discriminator_head) gives the layers; `feature_channels` is what the denoiser's
    encoder_features return (Denoiser.encoder_feature_channels). On the full-size maps the head gives one logit
    (SD1.5's 8x8 and SDXL's 32x32 mid block, PixArt's 128x128 output) or a few (SD3 at 1024 px: 5x5); the LSGAN
    losses average them. Maps smaller than spec.min_size (tiny test models) are upsampled (nearest) to it first.
    SD1.5's parameter names (layers.0 / .2 / .4 / .5) are those of the head before the per-backbone specs.
    """

    def __init__(self, spec: DiscriminatorHeadSpec, feature_channels: int):
        super().__init__()
        self.spec = spec
        self.in_channels = spec.input_channels(feature_channels)
        self.layers = nn.Sequential(*spec.layers(self.in_channels))

    def forward(self, features: Tensor) -> Tensor:
        features = features[:, : self.in_channels].float()  # PixArt: eps channels, learned sigma dropped
        h, w = features.shape[-2:]
        size = self.spec.min_size
        if min(h, w) < size:
            features = F.interpolate(features, size=(max(h, size), max(w, size)), mode="nearest")
        return self.layers(features)


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """LSGAN discriminator loss on sigmoid outputs, as the reference: 0.5 [(D(real) - 1)^2 + D(fake)^2]."""
    real = torch.sigmoid(real_logits)
    fake = torch.sigmoid(fake_logits)
    return 0.5 * (((real - 1.0) ** 2).mean() + (fake**2).mean())  # LSGAN, real -> 1, fake -> 0


def generator_adversarial_loss(fake_logits: Tensor) -> Tensor:
    """LSGAN generator loss: (D(fake) - 1)^2, no 0.5 factor (the reference's) — the student tries to look real."""
    return ((torch.sigmoid(fake_logits) - 1.0) ** 2).mean()


# ---- distribution matching (DMD) ----------------------------------------------------------------
def dmd_gradient(
    x: Tensor, x0_real: Tensor, eps_real: Tensor, eps_fake: Tensor, alpha: Tensor, sigma: Tensor
) -> Tensor:
    """DMD gradient on the student sample x.

    grad = (eps_real - eps_fake) * sigma_t / alpha_t   (= x0_fake - x0_real, the score difference in x0 space)
    normalised per sample by 1 / mean|x - x0_real|.
    """
    grad = (eps_real.float() - eps_fake.float()) * (sigma / alpha)  # (eps_real - eps_fake) sqrt(1-abar)/sqrt(abar)
    dims = tuple(range(1, x.ndim))
    norm = (x.float() - x0_real.float()).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)  # mean|x - x0_real|
    return grad / norm


def dmd_loss(x: Tensor, grad: Tensor) -> Tensor:
    """loss = MSE(x, stopgrad(x - grad)); its gradient w.r.t. x is 2 grad / numel."""
    target = (x.float() - grad).detach()  # stop-gradient target
    return F.mse_loss(x.float(), target)
