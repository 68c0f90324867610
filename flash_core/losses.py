"""Flash Diffusion losses: distillation, latent adversarial (discriminator head, LSGAN) and DMD.

Every function here is pure tensor math on what the trainer (`flash_core.distill`) hands it; the models
are called by the trainer.
"""

from __future__ import annotations

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
class DiscriminatorHead(nn.Module):
    """Trainable head on frozen-teacher features (the paper's latent discriminator): a map of logits.

    conv3x3 (in -> hidden, bias) -> SiLU -> conv4x4 stride 2 (hidden -> width, no bias) -> SiLU ->
    GroupNorm(4 groups, width) -> conv4x4 valid (width -> 1, no bias).
    The SD1.5 reference head, (64, 128) on the 1280-channel mid block:
      1280*64*9 + 64 + 64*128*16 + 2*128 + 128*16 = 737,344 + 131,072 + 256 + 2,048 = 870,720 parameters.
    Widths per backbone: Recipe.discriminator_channels (flash_core/recipes.py).
    On an 8x8 map (SD1.5 at 512 px) it gives one logit; larger maps give a map of logits (averaged by the
    LSGAN losses). Maps smaller than 8x8 (tiny test models: 2x2 or 4x4 mid blocks) are upsampled (nearest)
    to 8x8 first, the smallest size on which the stride-2 and the valid 4x4 convolution leave a logit.
    """

    MIN_SIZE = 8
    GROUPS = 4

    def __init__(self, in_channels: int, channels: tuple[int, int] = (64, 128)):
        super().__init__()
        hidden, width = channels
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1, bias=True),
            nn.SiLU(),
            nn.Conv2d(hidden, width, kernel_size=4, stride=2, padding=1, bias=False),
            nn.SiLU(),
            nn.GroupNorm(self.GROUPS, width),
            nn.Conv2d(width, 1, kernel_size=4, bias=False),
        )

    def forward(self, features: Tensor) -> Tensor:
        h, w = features.shape[-2:]
        if min(h, w) < self.MIN_SIZE:
            features = F.interpolate(features.float(), size=(max(h, self.MIN_SIZE), max(w, self.MIN_SIZE)), mode="nearest")
        return self.layers(features.float())


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """LSGAN discriminator loss on sigmoid outputs: (D(real) - 1)^2 + D(fake)^2."""
    real = torch.sigmoid(real_logits)
    fake = torch.sigmoid(fake_logits)
    return ((real - 1.0) ** 2).mean() + (fake**2).mean()  # LSGAN, real -> 1, fake -> 0


def generator_adversarial_loss(fake_logits: Tensor) -> Tensor:
    """LSGAN generator loss: (D(fake) - 1)^2 — the student tries to look real."""
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
