"""The teacher's side of Flash distillation: its K-step grid, classifier-free guidance and the multi-step solve
from a grid index to a fully denoised x0 (DPM-Solver++ 2M on the trailing grid, or flow Euler for SD3), through
diffusers' schedulers. Used by the trainer (flash_core.distill), the target cache and the preview.

    training_grid(denoiser, grid_steps, student_steps=None) -> list[float]     # K-step grid in model timesteps
    guided_output(denoiser, x_t, t, cond, uncond, guidance) -> raw             # CFG: w*out_c + (1-w)*out_u
    teacher_target(denoiser, z_t, grid_index, cond, uncond, guidance, grid_steps, student_steps=None) -> x0
"""

from __future__ import annotations

import torch
from torch import Tensor

from flash_core.denoiser import Conditioning, Denoiser
from flash_core.dependencies import require
from flash_core.schedules import (
    NUM_TRAIN_TIMESTEPS,
    flow_teacher_sigmas,
    trailing_timesteps,
)


def _flow_grid(grid_steps: int, student_steps: int | None) -> list[float]:
    """Flow sigmas of the teacher's K-step solve (schedules.flow_teacher_sigmas: diffusers' shift-3 grid), the
    same in training and previews; student_steps n only has to divide K (the mixture's modes at j*K/n)."""
    if student_steps is not None and (student_steps < 1 or grid_steps % student_steps):
        raise ValueError(f"the K={grid_steps} teacher grid must be a multiple of the {student_steps}-step student grid")
    return flow_teacher_sigmas(grid_steps)


def training_grid(denoiser: Denoiser, grid_steps: int, student_steps: int | None = None) -> list[float]:
    """The K-step teacher grid in model timesteps: trailing DDPM timesteps, or flow sigmas * 1000.

    The timestep mixture's modes sit at indices 0, K/4, K/2, 3K/4 (phase_mixture_probs), as in the reference: on
    the trailing grid t = 999 / 749 / 499 / 249 (the student's 4-step grid too), on SD3's flow grid
    sigma = 1.0 / 0.896 / 0.739 / 0.470 (not its 4-step sampling sigmas 1.0 / 0.857 / 0.601 / 0.003).
    """
    if denoiser.is_flow:  # SD3: shifted sigmas, t = sigma*T
        return [s * NUM_TRAIN_TIMESTEPS for s in _flow_grid(grid_steps, student_steps)]
    return [float(t) for t in trailing_timesteps(grid_steps)]  # K=32: 999, 968, ..., 30


def guided_output(
    denoiser: Denoiser, x_t: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning, guidance: float | Tensor
) -> Tensor:
    """Classifier-free guidance in one batched forward: w*out_cond + (1-w)*out_uncond.

    guidance: one float, or a tensor with one w per sample (then combined in float32)."""
    batch = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device).float().reshape(-1).expand(batch)
    both = Conditioning.cat([uncond.expand_to(batch), cond])
    raw = denoiser.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
    raw_uncond, raw_cond = raw.chunk(2)
    if isinstance(guidance, Tensor):  # per-sample w, broadcast over the sample's dimensions
        w = guidance.to(raw.device, torch.float32).reshape(-1, *([1] * (raw.ndim - 1)))
        return w * raw_cond.float() + (1.0 - w) * raw_uncond.float()  # eps = w eps_c + (1-w) eps_u
    return guidance * raw_cond + (1.0 - guidance) * raw_uncond  # eps = w eps_c + (1-w) eps_u


def _teacher_scheduler(denoiser: Denoiser, grid_steps: int, student_steps: int | None = None):
    """diffusers solver of the teacher on the K grid: DPM-Solver++(2M) trailing, or flow Euler (SD3)."""
    require("diffusers", "The teacher's solver of Flash distillation")
    if denoiser.is_flow:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)
        scheduler.set_timesteps(sigmas=_flow_grid(grid_steps, student_steps))  # already shifted
        return scheduler
    from diffusers import DPMSolverMultistepScheduler

    abar = denoiser.alphas_cumprod.double().cpu()
    betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])  # beta_t = 1 - abar_t / abar_{t-1}
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=len(abar), trained_betas=betas.numpy(), algorithm_type="dpmsolver++",
        solver_order=2, timestep_spacing="trailing", prediction_type=denoiser.prediction_type,
    )
    scheduler.set_timesteps(grid_steps)
    if [int(t) for t in scheduler.timesteps] != trailing_timesteps(grid_steps, len(abar)):
        raise RuntimeError("diffusers' trailing DPM-Solver++ grid differs from schedules.trailing_timesteps")
    return scheduler


@torch.no_grad()
def teacher_target(
    denoiser: Denoiser, z_t: Tensor, grid_index: int, cond: Conditioning, uncond: Conditioning,
    guidance: float | Tensor, grid_steps: int, student_steps: int | None = None,
) -> Tensor:
    """Teacher's fully denoised x0: multi-step solve with CFG from grid index `grid_index` to the end.

    Run under the caller's teacher context (LoRA disabled); no gradient. student_steps: see training_grid.
    guidance: one w, or one per sample (a tensor [B]; training and the target cache pass that).
    """
    scheduler = _teacher_scheduler(denoiser, grid_steps, student_steps)
    sample = z_t.float()
    for t in scheduler.timesteps[grid_index:]:
        raw = guided_output(denoiser, sample, t.to(sample.device), cond, uncond, guidance)
        sample = scheduler.step(raw, t, sample, return_dict=False)[0]  # DPM-Solver++ 2M (flow: Euler) step
    return sample
