"""Timestep grids and noise schedules exactly as Flash Diffusion trains them.

This module is the single home of:
  * the trailing timestep grid (sampling *and* training use it),
  * the flow-matching sigma grids (SD3: sampling, and the teacher's K grid),
  * the LCM boundary-condition scalings of the student's output,
  * the discrete DDPM noise schedule (alphas_cumprod) used by SD1.5 / SDXL / PixArt,
  * the training-time timestep mixture over the K-step grid, per phase.

Everything here is plain torch / math; no model and no ComfyUI.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000
MAX_SAMPLING_STEPS = 8

# LCM boundary condition constants used by Flash (sigma_data 0.5, timestep scaling 10).
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0

# SD3 flow-matching shift.
SD3_FLOW_SHIFT = 3.0

# Training-time timestep mixture (paper Sec. 3.2): Gaussian modes at grid indices 0, K/4, K/2, 3K/4 of the K grid,
# with mode weights per training phase (warm-up first, then shifting mass towards pure noise).
PHASE_MODE_WEIGHTS: tuple[tuple[float, ...], ...] = (
    (0.0, 0.0, 0.5, 0.5),
    (0.1, 0.3, 0.3, 0.3),
    (0.25, 0.25, 0.25, 0.25),
    (0.4, 0.2, 0.2, 0.2),
)
MIXTURE_WIDTH = 0.5  # p(i) ∝ Σ_j m_j exp(-(i - loc_j)^2 / MIXTURE_WIDTH)


def trailing_timesteps(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The "trailing" grid: round(arange(T, 0, -T/n)) - 1.

    4 steps -> [999, 749, 499, 249], 2 -> [999, 499], 1 -> [999]; K=32 -> [999, 968, ..., 30].
    """
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    step = num_train_timesteps / num_steps
    # Python's round() is round-half-to-even like numpy.round, which diffusers uses.
    return [int(round(num_train_timesteps - i * step)) - 1 for i in range(num_steps)]


def check_sampling_steps(num_steps: int) -> int:
    """Validate the number of few-step sampling steps (1..8)."""
    if not isinstance(num_steps, int) or not 1 <= num_steps <= MAX_SAMPLING_STEPS:
        raise ValueError(
            f"Flash samples with 1 to {MAX_SAMPLING_STEPS} steps (it was trained on 4), got {num_steps!r}."
        )
    return num_steps


def shift_sigma(sigma: torch.Tensor | float, shift: float = SD3_FLOW_SHIFT):
    """Flow-matching time shift: sigma' = shift*s / (1 + (shift-1)*s)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_sigmas(num_steps: int, shift: float = SD3_FLOW_SHIFT, sigma_min: float = 1.0 / NUM_TRAIN_TIMESTEPS) -> list[float]:
    """SD3 few-step grid: linspace(1, 1/T, n), shifted. 4 steps ≈ [1.0, 0.857, 0.601, 0.003]."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    base = torch.linspace(1.0, sigma_min, num_steps, dtype=torch.float64)
    return [float(s) for s in shift_sigma(base, shift)]


def flow_teacher_sigmas(grid_steps: int, shift: float = SD3_FLOW_SHIFT) -> list[float]:
    """The flow models' K-step teacher grid: diffusers' FlowMatchEulerDiscreteScheduler(shift).set_timesteps(K),
    as the reference's SD3 teacher solves (terminal 0 not included).

    diffusers spaces t linearly from its largest training sigma (1.0) to its smallest, shift(1/T), then shifts:
    sigma_k = shift(1 - k/(K-1) (1 - shift(1/T))). The timestep mixture's modes sit at grid indices 0, 8, 16, 24 of
    K = 32: sigma ≈ 1.0 / 0.896 / 0.739 / 0.470 (not the student's 4-step sampling grid 1.0 / 0.857 / 0.601 / 0.003).
    """
    if grid_steps < 1:
        raise ValueError(f"grid_steps must be >= 1, got {grid_steps}")
    smallest = float(shift_sigma(1.0 / NUM_TRAIN_TIMESTEPS, shift))  # diffusers' sigma_min: the last training sigma
    base = torch.linspace(1.0, smallest, grid_steps, dtype=torch.float64)  # timesteps / T before the shift
    return [float(s) for s in shift_sigma(base, shift)]  # sigma' = shift s / (1 + (shift - 1) s)


def lcm_boundary_scalings(timestep, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING):
    """LCM boundary condition: x = c_skip(t) z_t + c_out(t) x0_pred.

    c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2), c_out = s t / sqrt((s t)^2 + sigma_data^2).
    Works on floats and tensors alike.
    """
    scaled = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    denom = (scaled**2 + sigma_data**2) ** 0.5
    c_out = scaled / denom
    return c_skip, c_out


def scaled_linear_alphas_cumprod(
    beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> torch.Tensor:
    """abar_t of the "scaled_linear" DDPM schedule of SD1.5 / SDXL (float64, length T)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def mode_locations(num_grid: int, num_modes: int) -> list[int]:
    """Grid indices of the few-step timesteps on the K grid: K=32, 4 modes -> [0, 8, 16, 24]."""
    if num_grid % num_modes:
        raise ValueError(f"the K={num_grid} grid must be a multiple of the {num_modes}-step grid")
    return [j * num_grid // num_modes for j in range(num_modes)]


def timestep_mixture_probs(
    mode_weights: Sequence[float], num_grid: int = 32, width: float = MIXTURE_WIDTH
) -> torch.Tensor:
    """p(i) ∝ Σ_j m_j exp(-(i - loc_j)^2 / width) over grid indices i = 0..K-1 (float64, sums to 1)."""
    locs = mode_locations(num_grid, len(mode_weights))
    idx = torch.arange(num_grid, dtype=torch.float64)
    density = torch.zeros(num_grid, dtype=torch.float64)
    for weight, loc in zip(mode_weights, locs):
        density += weight * torch.exp(-((idx - loc) ** 2) / width)
    total = float(density.sum())
    if total <= 0:
        raise ValueError(f"mode weights {list(mode_weights)} give an empty timestep mixture")
    return density / total


def phase_of_step(step: int, total_steps: int, num_phases: int = len(PHASE_MODE_WEIGHTS)) -> int:
    """Four phases of equal length: which phase optimiser step `step` (0-based) belongs to."""
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    return min(num_phases - 1, (step * num_phases) // total_steps)


def sigma_from_alphas_cumprod(alphas_cumprod: torch.Tensor, timestep: int) -> float:
    """VE sigma of a discrete timestep: sqrt((1 - abar_t) / abar_t) (ComfyUI's representation)."""
    abar = float(alphas_cumprod[timestep])
    return math.sqrt((1.0 - abar) / abar)


def denoise_grid_length(num_steps: int, denoise: float = 1.0) -> int:
    """How long a grid img2img / hi-res / inpainting at strength `denoise` in (0, 1] truncates.

    Same rule as ComfyUI's KSampler: build the grid for int(steps / denoise) steps and keep its last
    `steps` entries, so denoise 1.0 is exactly the training grid and denoise d starts where stock
    samplers start for the same steps and d.
    """
    check_sampling_steps(num_steps)
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    return max(num_steps, int(num_steps / denoise))


def denoise_timesteps(num_steps: int, denoise: float = 1.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The discrete few-step grid at strength `denoise` (see denoise_grid_length)."""
    return trailing_timesteps(denoise_grid_length(num_steps, denoise), num_train_timesteps)[-num_steps:]


def denoise_flow_sigmas(num_steps: int, denoise: float = 1.0, shift: float = SD3_FLOW_SHIFT) -> list[float]:
    """The flow (SD3) few-step sigmas at strength `denoise` (see denoise_grid_length)."""
    return flow_sigmas(denoise_grid_length(num_steps, denoise), shift)[-num_steps:]
