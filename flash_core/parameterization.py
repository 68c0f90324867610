"""The parameterisation algebra, in one place: eps / v / flow velocity / x0, and VE <-> VP.

Every converter of the pack (the sampler in sampling.py, the Denoiser helpers in denoiser.py, the ComfyUI adapter
in nodes/comfy_denoiser.py) uses these lines. Conventions:

  * VP (discrete DDPM, diffusers): z_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(abar_t), sigma_t =
    sqrt(1 - abar_t); the model predicts eps, v = alpha_t eps - sigma_t x0, or x0 ("sample").
  * Flow matching (SD3): x_s = s eps + (1 - s) x0, alpha = 1 - s, sigma = s; the model predicts the velocity
    v = eps - x0; the model timestep is s * 1000.
  * VE (ComfyUI's k-diffusion space for discrete models): x = x0 + sigma_ve eps, with sigma_ve = sqrt((1 - abar) /
    abar), so x = z_t / sqrt(abar) and abar = 1 / (1 + sigma_ve^2).

Never imports ComfyUI.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from flash_core.schedules import NUM_TRAIN_TIMESTEPS

PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")  # what a discrete VP model predicts
DENOISER_PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "flow")  # a flash_core Denoiser's outputs

# --------------------------------------------------------------------------------------------------
# VP (discrete) models
# --------------------------------------------------------------------------------------------------


def predicted_x0(
    model_output: Tensor,
    sample: Tensor,
    alpha_bar: float | Tensor,
    prediction_type: PredictionType = "epsilon",
) -> Tensor:
    """x0 from a discrete VP model's output at noise level abar_t (sample is z_t)."""
    if prediction_type == "epsilon":
        # x0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        return (sample - (1.0 - alpha_bar) ** 0.5 * model_output) / alpha_bar**0.5
    if prediction_type == "v_prediction":
        # x0 = sqrt(abar_t) z_t - sqrt(1 - abar_t) v
        return alpha_bar**0.5 * sample - (1.0 - alpha_bar) ** 0.5 * model_output
    if prediction_type == "sample":
        return model_output  # the model predicts x0 directly
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def discrete_renoise(x0: Tensor, noise: Tensor, alpha_bar_next: float | Tensor) -> Tensor:
    """VP forward process to the next timestep: z = sqrt(abar_next) x0 + sqrt(1 - abar_next) eps."""
    return alpha_bar_next**0.5 * x0 + (1.0 - alpha_bar_next) ** 0.5 * noise


# --------------------------------------------------------------------------------------------------
# Flow matching
# --------------------------------------------------------------------------------------------------


def flow_x0(velocity: Tensor, sample: Tensor, sigma) -> Tensor:
    """Flow matching (SD3): x0 = x_sigma - sigma * v."""
    return sample - sigma * velocity  # x_sigma = sigma*eps + (1-sigma)*x0, v = eps - x0


def flow_renoise(x0: Tensor, noise: Tensor, sigma_next) -> Tensor:
    """Flow forward process to the next sigma: x = s_next eps + (1 - s_next) x0."""
    return sigma_next * noise + (1.0 - sigma_next) * x0


# --------------------------------------------------------------------------------------------------
# Both, through (alpha_t, sigma_t) of a model timestep t on the 0..1000 scale
# --------------------------------------------------------------------------------------------------


def noise_coefficients(t: Tensor, flow: bool, alphas_cumprod: Tensor | None = None,
                       ndim: int = 4) -> tuple[Tensor, Tensor]:
    """(alpha_t, sigma_t) with x_t = alpha_t x0 + sigma_t eps, broadcastable to an ndim tensor (float32).

    Discrete (flow False): t is the DDPM timestep, alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t).
    Flow: sigma = t/1000, alpha = 1 - sigma.
    """
    t = torch.as_tensor(t).float().reshape(-1)
    if flow:
        sigma = (t / NUM_TRAIN_TIMESTEPS).double()  # flow sigma in [0, 1]
        alpha = 1.0 - sigma  # x_t = sigma eps + (1 - sigma) x0
    else:
        abar = alphas_cumprod.to(device=t.device, dtype=torch.float64)[t.round().long()]
        alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()  # DDPM: sqrt(abar), sqrt(1 - abar)
    shape = (-1,) + (1,) * (ndim - 1)
    return alpha.float().reshape(shape), sigma.float().reshape(shape)


def add_noise(x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x_t = alpha_t x0 + sigma_t eps, in x0's dtype (DDPM forward process; flow: sigma eps + (1-sigma) x0)."""
    return alpha.to(x0.dtype) * x0 + sigma.to(x0.dtype) * noise


def implied_noise(x_t: Tensor, x0: Tensor, alpha, sigma) -> Tensor:
    """The noise a sample implies given its x0, at x_t = alpha x0 + sigma eps (VP, flow, and ComfyUI's VE with
    alpha 1): the deterministic (DDIM eta 0) re-noise of the few-step sampler reuses it."""
    return (x_t - alpha * x0) / sigma  # eps = (x_t - alpha_t x0) / sigma_t


def x0_and_eps(raw: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x0, eps) from a raw model output at x_t = alpha x0 + sigma eps; prediction_type epsilon, v_prediction
    or flow (velocity)."""
    alpha, sigma = alpha.to(x_t.dtype), sigma.to(x_t.dtype)
    if prediction_type == "epsilon":
        x0 = predicted_x0(raw, x_t, alpha**2, "epsilon")  # x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)
        eps = raw
    elif prediction_type == "v_prediction":
        x0 = predicted_x0(raw, x_t, alpha**2, "v_prediction")  # x0 = sqrt(abar) x_t - sqrt(1-abar) v
        eps = sigma * x_t + alpha * raw  # eps = sqrt(1-abar) x_t + sqrt(abar) v
    elif prediction_type == "flow":
        x0 = flow_x0(raw, x_t, sigma)  # x0 = x_t - sigma v  (v = eps - x0)
        eps = x_t + alpha * raw  # eps = x0 + v = x_t + (1 - sigma) v
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {DENOISER_PREDICTION_TYPES}")
    return x0, eps


# --------------------------------------------------------------------------------------------------
# VE (ComfyUI) <-> VP
# --------------------------------------------------------------------------------------------------


def alphas_cumprod_from_ve_sigmas(sigmas: Tensor) -> Tensor:
    """abar_t of a discrete VE sigma table (ComfyUI's model_sampling.sigmas)."""
    return 1.0 / (1.0 + sigmas**2)  # abar_t = 1 / (1 + sigma_t^2)


def vp_sample_from_ve(x: Tensor, sigma) -> Tensor:
    """z_t of a VE sample x = x0 + sigma eps (ComfyUI's space): z_t = x sqrt(abar_t), abar_t = 1/(1+sigma^2)."""
    return x / (1.0 + sigma**2) ** 0.5  # sqrt(abar) = 1/sqrt(1+sigma^2)


def ve_sample_from_vp(z_t: Tensor, sigma: Tensor) -> Tensor:
    """The VE sample of a VP one (inverse of vp_sample_from_ve); sigma is a tensor."""
    return z_t * (sigma**2 + 1.0).sqrt()  # x = x0 + sigma eps = z_t sqrt(1 + sigma^2)


def eps_from_ve_x0(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """eps of a VE sample and its x0 (the inverse of ComfyUI's EPS.calculate_denoised)."""
    return (x - x0) / sigma  # eps = (x - x0) / sigma


def v_from_ve_x0(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """v of a VE sample and its x0 (the inverse of ComfyUI's V_PREDICTION.calculate_denoised, sigma_data 1)."""
    return (x / (sigma**2 + 1.0) - x0) * (sigma**2 + 1.0).sqrt() / sigma  # v = (sqrt(abar) z_t - x0) / sqrt(1 - abar)
