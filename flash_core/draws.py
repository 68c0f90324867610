"""The training randomness of Flash distillation, counter-based: every iteration draws from fresh generators seeded
by (seed, process_index, step, stream), so the draws of any iteration are known without replaying the earlier ones
(a resume needs only the step; flash_core.target_cache precomputes the teacher targets of any iteration). Two
streams: "target" (`target_inputs`: grid index from the phase's timestep mixture, guidance w, the z_t noise, drawn
on the CPU so every device gives the same) and "rest" (adversarial t and noise, DMD draws: FlashDistiller).

    target_inputs(config, step, process_index, latent_shape) -> TargetInputs    # any iteration's target draws
    student_updates(config) -> list[int]                                       # iterations that update the student
    student_input(denoiser, grid, latents, inputs) -> (z_t, t)                 # the student's (and teacher's) input
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flash_core.denoiser import Denoiser, add_noise
from flash_core.distill_config import DistillConfig
from flash_core.recipes import Recipe
from flash_core.schedules import phase_of_step, timestep_mixture_probs

TARGET_STREAM, REST_STREAM = "target", "rest"


def stream_seed(seed: int, process_index: int, step: int, stream: str) -> int:
    """Seed of one stream of one iteration of one process: a hash of the four (counter-based, stateless)."""
    digest = hashlib.sha256(f"flash|{seed}|{process_index}|{step}|{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def step_generator(seed: int, process_index: int, step: int, stream: str, device="cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(stream_seed(seed, process_index, step, stream))


def sample_grid_index(probs: Tensor, generator: torch.Generator) -> int:
    """One K-grid index from the timestep mixture p(grid index)."""
    return int(torch.multinomial(probs, 1, generator=generator))


def phase_mixture_probs(recipe: Recipe, phase: int) -> Tensor:
    """p(grid index) of `phase` on the recipe's K grid: modes at indices 0, K/4, K/2, 3K/4 (training_grid)."""
    return timestep_mixture_probs(recipe.phase_mode_weights[phase], recipe.teacher_grid_steps)


@dataclass(frozen=True)
class TargetInputs:
    """The draws of one iteration that define its teacher target: grid index (phase mixture), guidance w, and
    the noise eps of z_t = sqrt(abar) z0 + sqrt(1-abar) eps (CPU float32, the batch's latent shape)."""

    grid_index: int
    guidance: float
    noise: Tensor


def target_inputs(
    config: DistillConfig, step: int, process_index: int, latent_shape, grid_sampler: Callable | None = None,
    recipe: Recipe | None = None,
) -> TargetInputs:
    """The target-defining draws of iteration `step` of process `process_index` (the "target" stream).

    The one home of these draws: FlashDistiller.train_step and the target cache's build call it. grid_sampler
    (phase, generator) -> int replaces the mixture sampler (FlashDistiller passes its sample_grid_index); `recipe`:
    config.recipe() already resolved (the trainer resolves it once)."""
    recipe = recipe if recipe is not None else config.recipe()
    generator = step_generator(config.seed, process_index, step, TARGET_STREAM)
    phase = phase_of_step(step, config.total_steps, recipe.num_phases)
    if grid_sampler is not None:
        grid_index = int(grid_sampler(phase, generator=generator))
    else:
        grid_index = sample_grid_index(phase_mixture_probs(recipe, phase), generator)
    low, high = recipe.guidance_range
    guidance = low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))  # w ~ U[min, max]
    noise = torch.randn(tuple(latent_shape), generator=generator, dtype=torch.float32)
    return TargetInputs(grid_index, guidance, noise)


def student_updates(config: DistillConfig) -> list[int]:
    """The iterations that update the student (and so need a teacher target): every one, or the even ones."""
    return list(range(0, config.total_steps, 2 if config.alternate_updates else 1))


def student_input(denoiser: Denoiser, grid: list[float], latents: Tensor, inputs: TargetInputs) -> tuple[Tensor, Tensor]:
    """(z_t, t) of the student and the teacher solve; grid index 0 = pure Gaussian noise."""
    size = latents.shape[0]
    t = torch.full((size,), float(grid[inputs.grid_index]), device=latents.device)
    noise = inputs.noise.to(latents.device)
    if inputs.grid_index == 0:
        return noise, t
    return add_noise(denoiser, latents, noise, t), t  # z_t = sqrt(abar) z0 + sqrt(1-abar) eps
