"""DistillConfig: the settings of one Flash distillation run; every `None` falls back to the backbone's published
recipe (flash_core.recipes), and `recipe()` resolves the two (the training session resolves it once per run).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from flash_core.lora_formats.metadata import GUIDANCE_MODES
from flash_core.losses import DISTILL_LOSSES, LPIPS_REMOVED
from flash_core.recipes import Recipe, get_recipe, lora_alpha_for_rank

MIXED_PRECISION = ("no", "bf16")


@dataclass
class DistillConfig:
    """Run settings; every `None` falls back to the backbone's Recipe (flash_core/recipes.py).

    total_steps: training iterations = batches (the four phases split them). By default (the reference's order)
    each iteration updates the student and then the discriminator on the same batch, so total_steps = student
    updates (the paper's 10k; its "20k steps" count both optimisers); alternate_updates=True updates them on
    alternate iterations (total_steps / 2 student updates). guidance_mode: one of GUIDANCE_MODES (lora_formats.metadata).
    """

    backbone: str = "sd15"
    total_steps: int = 10_000
    seed: int = 0
    batch_size: int | None = None
    lora_rank: int | None = None
    lora_alpha: int | float | None = None  # None: the recipe's, or lora_alpha_for_rank of lora_rank
    lora_targets: tuple[str, ...] | None = None
    lr: float | None = None
    guidance_range: tuple[float, float] | None = None
    teacher_grid_steps: int | None = None
    distill_weights: tuple[float, ...] | None = None
    adversarial_weights: tuple[float, ...] | None = None
    dmd_weights: tuple[float, ...] | None = None
    distill_loss: str = "l2"
    grad_checkpointing: bool = False
    mixed_precision: str = "no"
    alternate_updates: bool = False
    guidance_mode: str = "baked"  # GUIDANCE_MODES
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.distill_loss == "lpips":
            raise ValueError(LPIPS_REMOVED)
        if self.distill_loss not in DISTILL_LOSSES:
            raise ValueError(f"distill_loss must be one of {DISTILL_LOSSES}, got {self.distill_loss!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.guidance_mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance_mode must be one of {GUIDANCE_MODES}, got {self.guidance_mode!r}")
        if self.guidance_mode == "cfg" and self.alternate_updates:
            raise ValueError(
                "guidance_mode 'cfg' trains the discriminator on the teacher's guided target, which only a student "
                "iteration computes: set alternate_updates to false (the default) for guidance_mode 'cfg'")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be 0 (off) or between 0 and 1 (e.g. 0.99), got {self.ema_decay!r}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        self.recipe()  # the overrides make a valid recipe (per-phase weights, K a multiple of the 4-step grid)

    def recipe(self) -> Recipe:
        """The backbone's recipe with this config's overrides applied (a rank without an alpha keeps the recipe's
        LoRA scale: recipes.lora_alpha_for_rank)."""
        base = get_recipe(self.backbone)
        alpha = self.lora_alpha
        if alpha is None and self.lora_rank is not None:
            alpha = lora_alpha_for_rank(base, self.lora_rank)
        overrides = {
            "batch_size": self.batch_size, "lora_rank": self.lora_rank, "lora_alpha": alpha,
            "lora_targets": tuple(self.lora_targets) if self.lora_targets is not None else None,
            "lr": self.lr, "teacher_grid_steps": self.teacher_grid_steps,
            "guidance_range": tuple(self.guidance_range) if self.guidance_range is not None else None,
            "distill_weights": _tuple(self.distill_weights), "adversarial_weights": _tuple(self.adversarial_weights),
            "dmd_weights": _tuple(self.dmd_weights),
        }
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _tuple(values):
    return tuple(float(v) for v in values) if values is not None else None
