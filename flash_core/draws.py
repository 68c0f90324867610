"""The training randomness of Flash distillation, counter-based: every iteration draws from fresh generators seeded
by (seed, process_index, step, stream), so the draws of any iteration are known without replaying the earlier ones
(a resume needs only the step; flash_core.target_cache precomputes the teacher targets of any iteration). Two
streams: "target" (`target_inputs`: grid index from the phase's timestep mixture, guidance w, the z_t noise, drawn
on the CPU so every device gives the same) and "rest" (adversarial t and noise, DMD draws: FlashDistiller).

    target_inputs(config, step, process_index, latent_shape) -> TargetInputs    # any iteration's target draws
    student_updates(config) -> list[int]                                       # iterations that update the student
    student_input(denoiser, grid, latents, inputs) -> (z_t, t)                 # the student's (and teacher's) input
    guidance_pair(inputs, cond, uncond) -> (positive, negative)                # the CFG pair of each sample
    sample_guidance(inputs, size) -> Tensor                                    # each sample's w (float64, CPU)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flash_core.denoiser import Conditioning, Denoiser, add_noise
from flash_core.distill_config import DistillConfig
from flash_core.recipes import Recipe
from flash_core.schedules import phase_of_step, timestep_mixture_probs

TARGET_STREAM, REST_STREAM = "target", "rest"
# guidance_mode "cfg": the prompts the student's CFG is trained on, drawn per sample (so any negative works at
# sampling, and an empty positive: unconditional generation pushed away from the negative)
# positive = the empty prompt, else the sample's own: 0.3, not CFG training's usual 0.1, as the unconditional branch
# is what a negative prompt under an empty positive samples (digits bench: a 4-step student's unconditional share of
# zeros 11.5 % at 0.1, 14.2 % at 0.3, the teacher's 14.5 %)
EMPTY_POSITIVE_SHARE = 0.3
PROMPT_NEGATIVE_SHARE = 0.5  # negative = the prompt of a random sample of the batch, else the empty prompt


def prompt_pair_record(guidance_mode: str) -> dict[str, list[float]]:
    """What the run settings and a target cache's manifest record of the prompt-pair draws: their shares in guidance
    mode "cfg" (a checkpoint or cache drawn with others is then a difference), nothing in mode "baked"."""
    return {"prompt_pair_shares": [EMPTY_POSITIVE_SHARE, PROMPT_NEGATIVE_SHARE]} if guidance_mode == "cfg" else {}


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
    the noise eps of z_t = sqrt(abar) z0 + sqrt(1-abar) eps (CPU float32, the batch's latent shape); with guidance
    mode "cfg" also each sample's positive and negative prompt as rows of [batch prompts; empty prompts]
    (guidance_pair) and its own w (sample_guidance), None in mode "baked" (positive = the sample's prompt, negative =
    the empty prompt, w = `guidance` for the whole batch)."""

    grid_index: int
    guidance: float
    noise: Tensor
    positive_rows: tuple[int, ...] | None = None
    negative_rows: tuple[int, ...] | None = None
    sample_guidances: tuple[float, ...] | None = None


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
    if config.guidance_mode != "cfg":
        return TargetInputs(grid_index, guidance, noise)
    size = int(latent_shape[0])  # drawn after the noise: the draws above are the same in both modes
    own, empty = torch.arange(size), torch.arange(size) + size  # rows of [batch prompts; empty prompts]
    empty_positive = torch.rand(size, generator=generator) < EMPTY_POSITIVE_SHARE
    prompt_negative = torch.rand(size, generator=generator) < PROMPT_NEGATIVE_SHARE
    other = torch.randint(size, (size,), generator=generator)
    positive = torch.where(empty_positive, empty, own)
    negative = torch.where(prompt_negative, other, empty)
    # one w per sample (a dial is learnt over the range in every batch), w ~ U[min, max]
    per_sample = low + (high - low) * torch.rand(size, generator=generator, dtype=torch.float64)
    return TargetInputs(grid_index, guidance, noise, tuple(positive.tolist()), tuple(negative.tolist()),
                        tuple(per_sample.tolist()))


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


def guidance_pair(inputs: TargetInputs, cond: Conditioning, uncond: Conditioning) -> tuple[Conditioning, Conditioning]:
    """(positive, negative) of each sample for the teacher's CFG (and, in guidance mode "cfg", the student's):
    the batch's prompts and the empty prompt, or the rows target_inputs drew."""
    size = cond.batch_size
    uncond = uncond.expand_to(size)
    if inputs.positive_rows is None:
        return cond, uncond
    table = Conditioning.cat([cond, uncond])
    positive = table[torch.tensor(inputs.positive_rows, device=cond.encoder_hidden_states.device)]
    negative = table[torch.tensor(inputs.negative_rows, device=cond.encoder_hidden_states.device)]
    return positive, negative


def sample_guidance(inputs: TargetInputs, size: int) -> Tensor:
    """Each sample's teacher (and, in guidance mode "cfg", student) CFG scale w: float64 [size] on the CPU."""
    if inputs.sample_guidances is None:
        return torch.full((size,), inputs.guidance, dtype=torch.float64)
    return torch.tensor(inputs.sample_guidances, dtype=torch.float64)
