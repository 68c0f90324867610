"""Per-backbone Flash Diffusion recipes: the ONE home of rank, alpha, targets, LoRA init, guidance ranges, K,
per-phase loss weights and the discriminator head (numbers from the paper's published configs, see shared notes).

Grids and the timestep mixture itself live in `flash_core.schedules`; a recipe only names its inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from flash_core.denoiser import LORA_INITS
from flash_core.losses import PIXART_HEAD, SD3_HEAD, SD15_HEAD, SDXL_HEAD, DiscriminatorHeadSpec
from flash_core.schedules import PHASE_MODE_WEIGHTS

UNCOND_MODES = ("empty_prompt", "zeros", "negative_prompt")

# LoRA targets: attention projections of the UNets (self and cross attention).
UNET_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
# LoRA targets of the DiTs: attention q/k/v/out plus projections, feed-forward and adaLN linears.
DIT_LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
    "ff.net.0.proj", "ff.net.2", "proj", "linear", "linear_1", "linear_2",
)


@dataclass(frozen=True)
class Recipe:
    """Everything that differs between backbones when distilling with Flash Diffusion."""

    backbone: str
    lora_rank: int
    lora_alpha: int | float  # the LoRA scale is lora_alpha / lora_rank
    lora_targets: tuple[str, ...]
    guidance_range: tuple[float, float]  # teacher CFG scale w ~ U[min, max], once per batch (DMD: a fresh one)
    teacher_grid_steps: int  # K: the teacher's grid, DPM-Solver++ trailing (SD3: flow Euler): 32, PixArt 16
    batch_size: int  # per GPU
    uncond: str  # "empty_prompt" | "zeros" | "negative_prompt"
    adversarial_weights: tuple[float, ...]  # per phase
    dmd_weights: tuple[float, ...]  # per phase
    distill_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)  # per phase
    phase_mode_weights: tuple[tuple[float, ...], ...] = PHASE_MODE_WEIGHTS  # mixture mode weights per phase
    student_steps: int = 4  # n: the mixture's modes sit at teacher-grid indices j*K/n (j < n)
    adversarial_timesteps: tuple[int, ...] = (10, 250, 500, 750)  # re-noising levels of the discriminator
    lr: float = 1e-5  # AdamW, student and discriminator, constant
    # The reference's discriminator head of this backbone (flash_core.losses.DiscriminatorHeadSpec; table below).
    discriminator_head: DiscriminatorHeadSpec = SD15_HEAD
    # The LoRA's start (Denoiser.add_lora): "gaussian" lora_A ~ N(0, 1/r^2) (the reference's UNets) or
    # "kaiming_uniform" lora_A ~ U(+-1/sqrt(fan_in)) (peft's default, which the reference's DiTs keep); lora_B = 0.
    lora_init: str = "gaussian"

    def __post_init__(self) -> None:
        if self.uncond not in UNCOND_MODES:
            raise ValueError(f"recipe {self.backbone!r}: uncond must be one of {UNCOND_MODES}, got {self.uncond!r}")
        num_phases = len(self.phase_mode_weights)
        for name in ("distill_weights", "adversarial_weights", "dmd_weights"):
            if len(getattr(self, name)) != num_phases or any(not 0 <= w < math.inf for w in getattr(self, name)):
                raise ValueError(
                    f"recipe {self.backbone!r}: {name} needs one weight per phase ({num_phases}), each >= 0 and "
                    f"finite, got {getattr(self, name)!r}"
                )
        if self.teacher_grid_steps < 1 or self.teacher_grid_steps % self.student_steps:
            raise ValueError(
                f"recipe {self.backbone!r}: teacher_grid_steps (K = {self.teacher_grid_steps}) must be a multiple of "
                f"the {self.student_steps}-step student grid: the timestep mixture's modes sit at grid indices "
                f"0, K/{self.student_steps}, 2K/{self.student_steps}, ... (the recipe: 32, PixArt 16)"
            )
        if self.lora_init not in LORA_INITS:
            raise ValueError(f"recipe {self.backbone!r}: lora_init must be one of {LORA_INITS}, got {self.lora_init!r}")
        low, high = self.guidance_range
        if not 0 <= low <= high < math.inf:
            raise ValueError(f"recipe {self.backbone!r}: guidance_range must be (min, max) with 0 <= min <= max, both "
                             f"finite, got {self.guidance_range!r}")
        if not 0 < self.lr < math.inf:  # NaN fails too: a NaN learning rate turns the LoRA into NaN at the first step
            raise ValueError(f"recipe {self.backbone!r}: lr (the learning rate) must be a finite number > 0, got {self.lr!r}")

    @property
    def num_phases(self) -> int:
        return len(self.phase_mode_weights)


# Discriminator heads (Recipe.discriminator_head, flash_core.losses; conv4x4/2 = 4x4 conv, stride 2, padding 1;
# GN = GroupNorm(4); every conv but SD1.5's first without bias; each ends in a valid conv4x4 -> 1 and Flatten):
#   sd15   on the 1280-ch UNet mid block: conv3x3 -> 64 (bias), SiLU, conv4x4/2 -> 128, SiLU, GN   870,720
#   sdxl   on the 1280-ch UNet mid block: conv4x4/2 -> 256, SiLU, 2 x [conv4x4/2 (x2), GN, SiLU]   15,748,096
#   sd3    on SD3's 16-ch final output:   conv4x4/2 -> 64, SiLU, 3 x [conv4x4/2 (x2), GN, SiLU]      2,778,880
#   pixart on 4 of PixArt's 8 output ch (learned sigma dropped): as sd3 with 4 blocks              11,165,440
# DiTs have no encoder / decoder split, so their head reads the teacher's final output map (paper).
# LoRA init (Recipe.lora_init): the UNets "gaussian", the DiTs "kaiming_uniform" (peft's default, the reference's).
# Timestep mixture: modes at grid indices 0, K/4, K/2, 3K/4 of the teacher's K grid (flash_core.schedules):
#   sd15 / sdxl t = 999 / 749 / 499 / 249 (trailing K = 32), pixart the same t (K = 16),
#   sd3 sigma = 1.0 / 0.896 / 0.739 / 0.470 (diffusers' shift-3 flow grid, K = 32).

_SD15 = Recipe(
    backbone="sd15", lora_rank=128, lora_alpha=128, lora_targets=UNET_LORA_TARGETS,
    guidance_range=(3.0, 13.0), teacher_grid_steps=32, batch_size=4, uncond="empty_prompt",
    adversarial_weights=(0.0, 0.1, 0.2, 0.3), dmd_weights=(0.0, 0.3, 0.5, 0.7),
)

RECIPES: dict[str, Recipe] = {
    "sd15": _SD15,
    # SDXL: SD1.5's recipe with half the rank and batch, and zeroed embeddings as the unconditional input
    "sdxl": replace(_SD15, backbone="sdxl", lora_rank=64, lora_alpha=64, batch_size=2, uncond="zeros",
                    discriminator_head=SDXL_HEAD),
    "pixart": Recipe(
        backbone="pixart", lora_rank=64, lora_alpha=8, lora_targets=DIT_LORA_TARGETS,
        guidance_range=(2.0, 9.0), teacher_grid_steps=16, batch_size=2, uncond="empty_prompt",
        adversarial_weights=(0.0, 0.05, 0.1, 0.2), dmd_weights=(0.0, 0.3, 0.5, 0.7),
        discriminator_head=PIXART_HEAD, lora_init="kaiming_uniform",
    ),
    "sd3": Recipe(
        backbone="sd3", lora_rank=64, lora_alpha=8, lora_targets=DIT_LORA_TARGETS,
        guidance_range=(7.0, 13.0), teacher_grid_steps=32, batch_size=2, uncond="negative_prompt",
        adversarial_weights=(0.0, 0.1, 0.3, 0.5), dmd_weights=(0.0, 0.3, 0.5, 0.7),
        discriminator_head=SD3_HEAD, lora_init="kaiming_uniform",
    ),
}


def lora_alpha_for_rank(recipe: Recipe, rank: int) -> int | float:
    """The one rule for a LoRA rank other than the recipe's: alpha = rank * recipe alpha / recipe rank, so the LoRA
    keeps the recipe's scale alpha / rank (SD1.5 and SDXL 1.0, PixArt and SD3 0.125) whatever its rank. The node's
    rank input and flash-distill's `rank:` both go through it (an explicit `alpha:` in a CLI config still wins)."""
    alpha = rank * recipe.lora_alpha / recipe.lora_rank  # scale alpha / rank kept
    return int(alpha) if float(alpha).is_integer() else alpha


def get_recipe(backbone: str) -> Recipe:
    """The published recipe of `backbone` ("sd15", "sdxl", "pixart", "sd3")."""
    try:
        return RECIPES[backbone]
    except KeyError:
        raise KeyError(
            f"unknown backbone {backbone!r}: known backbones are {', '.join(sorted(RECIPES))} "
            "(add a Recipe to flash_core/recipes.py for a new model family)"
        ) from None
