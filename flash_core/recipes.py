"""Per-backbone Flash Diffusion recipes: the ONE home of rank, alpha, targets, guidance ranges, K and
per-phase loss weights (numbers from the paper's published configs, see shared notes).

Grids and the timestep mixture itself live in `flash_core.schedules`; a recipe only names its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    teacher_grid_steps: int  # K: teacher DPM-Solver++ grid (32; PixArt 16)
    batch_size: int  # per GPU
    uncond: str  # "empty_prompt" | "zeros" | "negative_prompt"
    adversarial_weights: tuple[float, ...]  # per phase
    dmd_weights: tuple[float, ...]  # per phase
    distill_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)  # per phase
    phase_mode_weights: tuple[tuple[float, ...], ...] = PHASE_MODE_WEIGHTS  # mixture mode weights per phase
    student_steps: int = 4  # the few-step grid the mixture's modes sit on
    adversarial_timesteps: tuple[int, ...] = (10, 250, 500, 750)  # re-noising levels of the discriminator
    lr: float = 1e-5  # AdamW, student and discriminator, constant
    # Discriminator head widths (hidden, width) of flash_core.losses.DiscriminatorHead: conv3x3 -> hidden,
    # conv4x4/2 -> width, GroupNorm(4), conv4x4 valid -> 1 logit. SD1.5's (64, 128) on the 1280-channel mid
    # block is the reference head, 870,720 parameters; the other backbones' widths are chosen to give the
    # published head sizes with the same layer pattern (the table above _SD15).
    discriminator_channels: tuple[int, int] = (64, 128)

    def __post_init__(self) -> None:
        if self.uncond not in UNCOND_MODES:
            raise ValueError(f"recipe {self.backbone!r}: uncond must be one of {UNCOND_MODES}, got {self.uncond!r}")
        num_phases = len(self.phase_mode_weights)
        for name in ("distill_weights", "adversarial_weights", "dmd_weights"):
            if len(getattr(self, name)) != num_phases or any(not w >= 0 for w in getattr(self, name)):
                raise ValueError(
                    f"recipe {self.backbone!r}: {name} needs one weight per phase ({num_phases}), each >= 0, "
                    f"got {getattr(self, name)!r}"
                )
        if self.teacher_grid_steps < 1 or self.teacher_grid_steps % self.student_steps:
            raise ValueError(
                f"recipe {self.backbone!r}: teacher_grid_steps (K = {self.teacher_grid_steps}) must be a multiple of "
                f"the {self.student_steps}-step sampling grid the timestep mixture sits on (the recipe: 32, PixArt 16)"
            )
        low, high = self.guidance_range
        if not 0 <= low <= high:
            raise ValueError(f"recipe {self.backbone!r}: guidance_range must be (min, max) with 0 <= min <= max")

    @property
    def num_phases(self) -> int:
        return len(self.phase_mode_weights)


# Discriminator heads (Recipe.discriminator_channels = (hidden, width)) and their size on the full-size
# teacher's features:
#   sd15   (64, 128)  on the 1280-ch UNet mid block:   870,720 (the paper's reference head)
#   sdxl   (608, 896) on the 1280-ch UNet mid block:   15,737,184 (published: 15.7M)
#   sd3    (256, 672) on SD3's 16-ch final output:      2,801,728 (published: 2.8M)
#   pixart (256, 672) on PixArt's 8-ch final output:    2,783,296 (not published: SD3's DiT head widths)
# DiTs have no encoder / decoder split, so their head reads the teacher's final output map (paper).

_SD15 = Recipe(
    backbone="sd15", lora_rank=128, lora_alpha=128, lora_targets=UNET_LORA_TARGETS,
    guidance_range=(3.0, 13.0), teacher_grid_steps=32, batch_size=4, uncond="empty_prompt",
    adversarial_weights=(0.0, 0.1, 0.2, 0.3), dmd_weights=(0.0, 0.3, 0.5, 0.7),
)

RECIPES: dict[str, Recipe] = {
    "sd15": _SD15,
    # SDXL: SD1.5's recipe with half the rank and batch, and zeroed embeddings as the unconditional input
    "sdxl": replace(_SD15, backbone="sdxl", lora_rank=64, lora_alpha=64, batch_size=2, uncond="zeros",
                    discriminator_channels=(608, 896)),
    "pixart": Recipe(
        backbone="pixart", lora_rank=64, lora_alpha=8, lora_targets=DIT_LORA_TARGETS,
        guidance_range=(2.0, 9.0), teacher_grid_steps=16, batch_size=2, uncond="empty_prompt",
        adversarial_weights=(0.0, 0.05, 0.1, 0.2), dmd_weights=(0.0, 0.3, 0.5, 0.7),
        discriminator_channels=(256, 672),
    ),
    "sd3": Recipe(
        backbone="sd3", lora_rank=64, lora_alpha=8, lora_targets=DIT_LORA_TARGETS,
        guidance_range=(7.0, 13.0), teacher_grid_steps=32, batch_size=2, uncond="negative_prompt",
        adversarial_weights=(0.0, 0.1, 0.3, 0.5), dmd_weights=(0.0, 0.3, 0.5, 0.7),
        discriminator_channels=(256, 672),
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
