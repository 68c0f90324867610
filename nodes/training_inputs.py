"""Flash Distill Train's inputs read into flash_core's terms: LATENT lists as one latent tensor, CONDITIONING as
one entry per latent, per-phase weight text, and the node's settings as a DistillConfig (0 / '' = the recipe).
Every problem a user can fix is a TrainingInputError naming the input and what to do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from flash_core.distill import DistillConfig
from flash_core.recipes import get_recipe

from .comfy_denoiser import conditioning_entries

NODE = "Flash Distill Train"


class TrainingInputError(ValueError):
    """A user-fixable problem with the node's inputs or its output folder."""


# --------------------------------------------------------------------------------------------------
# Inputs: latents, conditioning, weights
# --------------------------------------------------------------------------------------------------


def gather_latents(latents: Sequence[Any]) -> torch.Tensor:
    """All training latents as one [N, C, h, w] tensor (VAE space) from LATENT values (batches or lists)."""
    samples = []
    for value in latents or []:
        tensor = value.get("samples") if isinstance(value, dict) else None
        if tensor is None:
            raise TrainingInputError(f"{NODE}: 'latents' must be LATENT values (from VAE Encode, Make Training Dataset ...).")
        if getattr(tensor, "is_nested", False):
            raise TrainingInputError(f"{NODE}: nested (multi-resolution) latents are not supported; resize the images to one size.")
        samples.extend(tensor[i : i + 1] for i in range(tensor.shape[0]))
    if not samples:
        raise TrainingInputError(f"{NODE}: no training latents: connect at least one image encoded with VAE Encode.")
    shapes = sorted({tuple(s.shape[1:]) for s in samples})
    if len(shapes) > 1:
        raise TrainingInputError(
            f"{NODE}: the training latents have different sizes {shapes}; resize or crop the images to one size "
            "(e.g. with ResizeImagesByShorterEdge + CenterCropImages) before encoding."
        )
    if len(shapes[0]) != 3:
        raise TrainingInputError(f"{NODE}: expected image latents [batch, channels, height, width], got {shapes[0]}.")
    return torch.cat([s.float() for s in samples])


def gather_conditioning(conditionings: Sequence[Any], count: int, what: str) -> list[tuple[torch.Tensor, dict]]:
    """One conditioning entry per training latent: N entries, or one repeated for every latent."""
    entries = conditioning_entries(conditionings or [])
    if not entries:
        raise TrainingInputError(f"{NODE}: '{what}' has no conditioning; connect a CLIP Text Encode.")
    if len(entries) == 1:
        return entries * count
    if len(entries) != count:
        raise TrainingInputError(
            f"{NODE}: {len(entries)} {what} conditionings for {count} latents; give one per latent or a single "
            "one for all."
        )
    return entries


def parse_phase_weights(text: str, name: str, num_phases: int) -> tuple[float, ...] | None:
    """'' -> None (the recipe); 'w' -> w for every phase; 'w1, w2, w3, w4' -> one per phase."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        values = [float(v) for v in re.split(r"[,\s;]+", text) if v]
    except ValueError:
        raise TrainingInputError(f"{NODE}: {name} '{text}' is not a list of numbers (e.g. '0, 0.1, 0.2, 0.3').") from None
    if len(values) == 1:
        values = values * num_phases
    if len(values) != num_phases or any(v < 0 for v in values):
        raise TrainingInputError(
            f"{NODE}: {name} needs one non-negative weight or {num_phases} (one per training phase), got '{text}'."
        )
    return tuple(values)


def distill_config(backbone: str, total_steps: int, rank: int, learning_rate: float, guidance_min: float,
                   guidance_max: float, teacher_grid_steps: int, distill_weights: str, adversarial_weights: str,
                   dmd_weights: str, seed: int, batch_size: int, gradient_checkpointing: bool,
                   mixed_precision: str, device: torch.device, guidance_mode: str = "baked",
                   ema_decay: float = 0.0) -> DistillConfig:
    """The node's inputs as a flash_core DistillConfig (0 / '' = the backbone's published recipe)."""
    recipe = get_recipe(backbone)
    if guidance_max < guidance_min:
        raise TrainingInputError(f"{NODE}: guidance_max ({guidance_max}) is below guidance_min ({guidance_min}).")
    guidance = None if guidance_min == 0 and guidance_max == 0 else (guidance_min, guidance_max)
    overrides = dict(
        batch_size=batch_size or None, lora_rank=rank or None,  # alpha: recipes.lora_alpha_for_rank (the recipe's scale)
        lr=learning_rate or None, guidance_range=guidance, teacher_grid_steps=teacher_grid_steps or None,
        distill_weights=parse_phase_weights(distill_weights, "distill_weights", recipe.num_phases),
        adversarial_weights=parse_phase_weights(adversarial_weights, "adversarial_weights", recipe.num_phases),
        dmd_weights=parse_phase_weights(dmd_weights, "dmd_weights", recipe.num_phases),
    )
    try:  # flash_core checks the settings (K a multiple of the student grid, ...), as for flash-distill's config
        return DistillConfig(
            backbone=backbone, total_steps=total_steps, seed=seed, grad_checkpointing=gradient_checkpointing,
            guidance_mode=guidance_mode, ema_decay=ema_decay,
            mixed_precision="bf16" if mixed_precision == "bf16" and device.type == "cuda" else "no", **overrides,
        )
    except ValueError as err:
        raise TrainingInputError(f"{NODE}: {err}") from None
