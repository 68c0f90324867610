"""The Flash few-step sampler: "predict x0, re-noise to the next level", LCM-style with fresh noise (the published
Flash sampler) or deterministically with the noise the step's input implies (DDIM eta 0; students of guidance mode
"cfg", RENOISE_OF_GUIDANCE_MODE below).

One loop (`few_step_loop`) serves every path. It only knows these callables:

  * ``denoise_fn(x, level) -> x0``: the student's (boundary-conditioned) clean prediction at `level`,
  * ``noise_fn(level, next_level) -> eps``: fresh standard Gaussian noise for the re-noise step,
  * ``implied_noise_fn(x, x0, level) -> eps`` (deterministic re-noise only): the noise x implies given x0,
  * ``renoise_fn(x0, eps, next_level) -> x``: put x0 back at the noise level `next_level`,
  * ``callback(i, x, x0)``: optional progress / preview hook.

A "level" is whatever the caller's model is indexed by: an integer DDPM timestep for diffusers UNets,
a flow sigma for SD3, a ComfyUI sigma for the ComfyUI KSAMPLER shell (nodes/sampling.py), where the
model wrapper already returns x0 and `model_sampling.noise_scaling` re-noises.

The step maths are small functions so that every shell uses the same lines: the LCM boundary condition here,
x0 from eps / v / flow velocity and the VP / flow re-noise in parameterization.py (the one home of that algebra,
re-exported here). Grids come from schedules.py.
Never imports ComfyUI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

# The sampler's step maths, re-exported from their one home so `sampling.predicted_x0` & co. keep working.
from flash_core.parameterization import (
    PREDICTION_TYPES,
    PredictionType,
    discrete_renoise,
    flow_renoise,
    flow_x0,
    implied_noise,
    predicted_x0,
    vp_sample_from_ve,  # noqa: F401
)
from flash_core.schedules import NUM_TRAIN_TIMESTEPS, lcm_boundary_scalings

DenoiseFn = Callable[[torch.Tensor, Any], torch.Tensor]
NoiseFn = Callable[[Any, Any], torch.Tensor]
RenoiseFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
ImpliedNoiseFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]

# How the sampler re-noises x0 between steps, by the student's guidance mode (docs/architecture.md, "Guidance modes"):
#   "fresh":         fresh Gaussian noise, LCM-style: the published Flash sampler, for students with guidance baked in;
#   "deterministic": the noise the step's input implies given its x0 (DDIM eta 0, Euler in ComfyUI's sigma space):
#                    the CFG student's. Fresh noise puts a guided x0 back off the guided trajectory, and the next
#                    step's CFG guides it again: guidance compounds (make bench-guidance, "renoise_ablation").
RENOISE_RULES = ("fresh", "deterministic")
RENOISE_OF_GUIDANCE_MODE = {"baked": "fresh", "cfg": "deterministic"}


def renoise_rule(guidance_mode: str | None) -> str:
    """The re-noise rule of a student of `guidance_mode` (None or unknown: "baked", the published sampler's)."""
    return RENOISE_OF_GUIDANCE_MODE.get(guidance_mode or "baked", "fresh")


def _check_renoise(renoise: str) -> None:
    if renoise not in RENOISE_RULES:
        raise ValueError(f"renoise must be one of {RENOISE_RULES}, got {renoise!r}")


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def few_step_loop(
    x: torch.Tensor,
    levels: Sequence[Any],
    denoise_fn: DenoiseFn,
    renoise_fn: RenoiseFn,
    noise_fn: NoiseFn,
    callback: StepCallback | None = None,
    end_level: Any = None,
    implied_noise_fn: ImpliedNoiseFn | None = None,
) -> torch.Tensor:
    """Run the few-step chain and return the final sample.

    `x` is the sample at ``levels[0]`` (pure noise for text-to-image). For each level: x0 = denoise(x, level);
    then, unless this was the last level, x = renoise(x0, eps, next level) with fresh noise eps = noise_fn(...),
    or, given `implied_noise_fn`, the noise x implies (deterministic: noise_fn is never called). After the last
    level the result is x0 itself, or x0 re-noised to `end_level` when one is given (a partial ComfyUI schedule
    whose last sigma is not 0).
    """
    if len(levels) == 0:
        return x
    for i, level in enumerate(levels):
        x0 = denoise_fn(x, level)  # the student's jump to the clean sample (paper: one NFE per step)
        if callback is not None:
            callback(i, x, x0)
        next_level = levels[i + 1] if i + 1 < len(levels) else end_level
        if next_level is None:
            x = x0  # last step: return the clean prediction
        else:
            if implied_noise_fn is None:
                eps = noise_fn(level, next_level)  # fresh noise (LCM)
            else:
                eps = implied_noise_fn(x, x0, level)  # the noise x carries (DDIM eta 0)
            x = renoise_fn(x0, eps, next_level)
    return x


# --------------------------------------------------------------------------------------------------
# The LCM boundary condition (the rest of the step maths: flash_core.parameterization)
# --------------------------------------------------------------------------------------------------


def lcm_boundary_x0(x0_pred: torch.Tensor, z_t: torch.Tensor, timestep) -> torch.Tensor:
    """LCM boundary condition on the student's output: x0' = c_skip(t) z_t + c_out(t) x0_pred.

    `timestep` is the DDPM timestep (0..999); a float, a 0-dim tensor, or one per batch element.
    """
    if isinstance(timestep, torch.Tensor):
        timestep = timestep.to(torch.float64 if x0_pred.dtype == torch.float64 else torch.float32)
        if timestep.ndim == 1:
            timestep = timestep.view(-1, *([1] * (x0_pred.ndim - 1)))  # one timestep per batch element
        timestep = timestep.to(x0_pred.device)
    c_skip, c_out = lcm_boundary_scalings(timestep)  # c_skip = sd^2/((10t)^2+sd^2), c_out = 10t/sqrt(...)
    return c_skip * z_t + c_out * x0_pred  # x0' = c_skip z_t + c_out x0_pred


# --------------------------------------------------------------------------------------------------
# Convenience shells for diffusers-style models
# --------------------------------------------------------------------------------------------------


def _gaussian_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like `like`, drawn on the generator's device (as diffusers' randn_tensor)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def sample_discrete(
    model_fn: Callable[[torch.Tensor, int], torch.Tensor],
    latents: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    prediction_type: PredictionType = "epsilon",
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    renoise: str = "fresh",
) -> torch.Tensor:
    """Few-step sampling of a discrete VP model (SD1.5 / SDXL / PixArt students).

    model_fn(z_t, t) returns the model's raw output (eps or v) for integer timestep t; `latents` is z at
    ``timesteps[0]`` (pure Gaussian noise at t=999); `timesteps` e.g. schedules.trailing_timesteps(4).
    renoise "fresh": re-noise noise is drawn from `generator` once per intermediate step, in order (diffusers'
    LCMScheduler); "deterministic": the noise z_t implies (diffusers' DDIMScheduler, eta 0).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    _check_renoise(renoise)
    timesteps = [int(t) for t in timesteps]

    def alpha_bar(t: int) -> float:
        return float(alphas_cumprod[t])  # abar_t of the training noise schedule

    def denoise_fn(z_t: torch.Tensor, t: int) -> torch.Tensor:
        x0 = predicted_x0(model_fn(z_t, t), z_t, alpha_bar(t), prediction_type)
        return lcm_boundary_x0(x0, z_t, float(t))

    def renoise_fn(x0: torch.Tensor, noise: torch.Tensor, t_next: int) -> torch.Tensor:
        return discrete_renoise(x0, noise, alpha_bar(t_next))

    def noise_fn(t: int, t_next: int) -> torch.Tensor:
        return _gaussian_noise(latents, generator)

    def implied_noise_fn(z_t: torch.Tensor, x0: torch.Tensor, t: int) -> torch.Tensor:
        return implied_noise(z_t, x0, alpha_bar(t) ** 0.5, (1.0 - alpha_bar(t)) ** 0.5)

    return few_step_loop(latents, timesteps, denoise_fn, renoise_fn, noise_fn, callback,
                         implied_noise_fn=implied_noise_fn if renoise == "deterministic" else None)


def sample_flow(
    model_fn: Callable[[torch.Tensor, float], torch.Tensor],
    latents: torch.Tensor,
    sigmas: Sequence[float],
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    renoise: str = "fresh",
) -> torch.Tensor:
    """Few-step sampling of a flow-matching model (SD3 students).

    model_fn(x, timestep) returns the velocity v for diffusers' timestep convention timestep = sigma * T;
    `latents` is x at ``sigmas[0]`` (pure noise at sigma 1); `sigmas` e.g. schedules.flow_sigmas(4).
    renoise "fresh": diffusers' stochastic flow step; "deterministic": its Euler step.
    """
    _check_renoise(renoise)
    sigmas = [float(s) for s in sigmas]

    def denoise_fn(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return flow_x0(model_fn(x, sigma * num_train_timesteps), x, sigma)

    def noise_fn(sigma: float, sigma_next: float) -> torch.Tensor:
        return _gaussian_noise(latents, generator)

    def implied_noise_fn(x: torch.Tensor, x0: torch.Tensor, sigma: float) -> torch.Tensor:
        return implied_noise(x, x0, 1.0 - sigma, sigma)  # x = sigma eps + (1 - sigma) x0

    return few_step_loop(latents, sigmas, denoise_fn, flow_renoise, noise_fn, callback,
                         implied_noise_fn=implied_noise_fn if renoise == "deterministic" else None)
