"""Flash Diffusion losses: distillation, latent adversarial (discriminator head, LSGAN) and DMD.

Every function here is pure tensor math on what the trainer (`flash_core.distill`) hands it; the models
are called by the trainer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DISTILL_LOSSES = ("l2", "l1", "huber", "lpips")
HUBER_C = 0.001  # pseudo-Huber constant (latent space)


# ---- distillation -------------------------------------------------------------------------------
def distillation_loss(student_x0: Tensor, teacher_x0: Tensor, kind: str = "l2", lpips_fn=None) -> Tensor:
    """Student x0 vs teacher multi-step x0 (latent space; "lpips" needs `lpips_fn` on decoded images)."""
    if kind == "l2":
        return F.mse_loss(student_x0.float(), teacher_x0.float())  # ||x - x0_teacher||^2
    if kind == "l1":
        return F.l1_loss(student_x0.float(), teacher_x0.float())  # |x - x0_teacher|
    if kind == "huber":
        diff2 = (student_x0.float() - teacher_x0.float()) ** 2
        return (torch.sqrt(diff2 + HUBER_C**2) - HUBER_C).mean()  # pseudo-Huber sqrt(d^2 + c^2) - c
    if kind == "lpips":
        if lpips_fn is None:
            raise ValueError("distill_loss 'lpips' needs an LPIPS callable (see make_lpips_loss)")
        return lpips_fn(student_x0, teacher_x0).mean()
    raise ValueError(f"unknown distill_loss {kind!r}; choose one of {DISTILL_LOSSES}")


def make_lpips_loss():
    """LPIPS(VGG) if the `lpips` package and its weights are installed locally, else a clear error."""
    try:
        import lpips  # type: ignore
    except ImportError:
        raise RuntimeError(
            "distill_loss 'lpips' needs the `lpips` package and its VGG weights, which are not installed "
            "(and cannot be downloaded on offline machines). Use distill_loss 'l2', 'l1' or 'huber'."
        ) from None
    try:
        return lpips.LPIPS(net="vgg", verbose=False)
    except Exception as exc:  # weights missing / no network
        raise RuntimeError(
            f"LPIPS(VGG) could not load its weights ({exc}). Put the torchvision VGG16 weights in the torch hub "
            "cache or use distill_loss 'l2', 'l1' or 'huber'."
        ) from exc


# ---- adversarial --------------------------------------------------------------------------------
class DiscriminatorHead(nn.Module):
    """Trainable head on frozen-teacher encoder features (PatchGAN-style logits map).

    conv4x4/2 (no bias) -> GroupNorm -> SiLU -> conv4x4/2 (no bias) -> GroupNorm -> SiLU -> conv1x1 -> 1.
    On the SD1.5 mid block (1280 ch) with widths (40, 80):
      1280*40*16 + 2*40 + 40*80*16 + 2*80 + 80 = 819,280 + 51,360 + 80 = 870,720 parameters.
    Convolutions followed by GroupNorm carry no bias (the norm's shift replaces it).
    Feature maps smaller than 4x4 are upsampled (nearest) to 4x4 so the two stride-2 convs apply.
    """

    MIN_SIZE = 4

    def __init__(self, in_channels: int, channels: tuple[int, int] = (40, 80), num_groups: int = 8):
        super().__init__()
        c1, c2 = channels
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=4, stride=2, padding=1, bias=False),
            nn.GroupNorm(_groups(c1, num_groups), c1),
            nn.SiLU(),
            nn.Conv2d(c1, c2, kernel_size=4, stride=2, padding=1, bias=False),
            nn.GroupNorm(_groups(c2, num_groups), c2),
            nn.SiLU(),
            nn.Conv2d(c2, 1, kernel_size=1, bias=False),
        )

    def forward(self, features: Tensor) -> Tensor:
        h, w = features.shape[-2:]
        if min(h, w) < self.MIN_SIZE:
            features = F.interpolate(features, size=(max(h, self.MIN_SIZE), max(w, self.MIN_SIZE)), mode="nearest")
        return self.layers(features.float())


def _groups(channels: int, wanted: int) -> int:
    """Largest divisor of `channels` not above `wanted` (GroupNorm needs channels % groups == 0)."""
    for g in range(min(wanted, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


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
