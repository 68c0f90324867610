"""flash_core.schedules: the grids and schedules Flash trains and samples on, checked against diffusers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
)

from flash_core import schedules


def _diffusers_trailing(num_steps: int) -> list[int]:
    scheduler = DPMSolverMultistepScheduler(timestep_spacing="trailing")
    scheduler.set_timesteps(num_steps)
    return [int(t) for t in scheduler.timesteps]


# ---------------------------------------------------------------- trailing grid


def test_trailing_grids_of_the_released_students():
    assert schedules.trailing_timesteps(4) == [999, 749, 499, 249]
    assert schedules.trailing_timesteps(2) == [999, 499]
    assert schedules.trailing_timesteps(1) == [999]


def test_teacher_grid_k32_is_diffusers_dpm_solver_trailing():
    grid = schedules.trailing_timesteps(32)
    assert len(grid) == 32
    assert grid[:3] == [999, 968, 937]
    assert grid[-2:] == [61, 30]
    assert grid == _diffusers_trailing(32)


@pytest.mark.parametrize("num_steps", range(1, 9))
def test_trailing_grid_equals_diffusers_trailing_spacing(num_steps):
    ddim = DDIMScheduler(timestep_spacing="trailing")
    ddim.set_timesteps(num_steps)
    assert schedules.trailing_timesteps(num_steps) == _diffusers_trailing(num_steps)
    assert schedules.trailing_timesteps(num_steps) == [int(t) for t in ddim.timesteps]


def test_trailing_grid_rejects_bad_step_counts():
    with pytest.raises(ValueError):
        schedules.trailing_timesteps(0)
    with pytest.raises(ValueError):
        schedules.trailing_timesteps(1001)


def test_check_sampling_steps():
    for n in range(1, 9):
        assert schedules.check_sampling_steps(n) == n
    for bad in (0, 9, -1, 4.0, "4"):
        with pytest.raises(ValueError, match="1 to 8 steps"):
            schedules.check_sampling_steps(bad)


# ---------------------------------------------------------------- flow (SD3) sigmas


def test_flow_sigmas_four_steps():
    assert schedules.flow_sigmas(4) == pytest.approx([1.0, 0.857, 0.601, 0.003], abs=5e-4)


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
def test_flow_sigmas_equal_diffusers_flow_match_shift_3(num_steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / 1000, num_steps))
    reference = scheduler.sigmas[:-1].double()  # diffusers appends the terminal 0
    ours = torch.tensor(schedules.flow_sigmas(num_steps, shift=3.0), dtype=torch.float64)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("grid_steps", [1, 2, 4, 8, 16, 32])
def test_flow_teacher_grid_is_diffusers_flow_match_default_grid(grid_steps):
    """The reference's SD3 teacher: FlowMatchEulerDiscreteScheduler (shift 3) .set_timesteps(K)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(grid_steps)
    ours = torch.tensor(schedules.flow_teacher_sigmas(grid_steps), dtype=torch.float64)
    torch.testing.assert_close(ours, scheduler.sigmas[:-1].double(), atol=1e-6, rtol=0)  # diffusers appends 0
    torch.testing.assert_close(ours * 1000, scheduler.timesteps.double(), atol=1e-4, rtol=0)


def test_mixture_modes_on_the_teacher_grids():
    """Modes at grid indices 0/8/16/24 of K = 32: the trailing grid's 999/749/499/249 (the UNets' and PixArt's
    4-step grid) and, for SD3, sigma 1.0/0.896/0.739/0.470 of the flow grid, not its 4-step sampling sigmas."""
    assert schedules.mode_locations(32, 4) == [0, 8, 16, 24] and schedules.mode_locations(16, 4) == [0, 4, 8, 12]
    assert [schedules.trailing_timesteps(32)[i] for i in (0, 8, 16, 24)] == [999, 749, 499, 249]
    assert [schedules.trailing_timesteps(16)[i] for i in (0, 4, 8, 12)] == [999, 749, 499, 249]  # PixArt, K = 16
    flow_modes = [schedules.flow_teacher_sigmas(32)[i] for i in (0, 8, 16, 24)]
    assert flow_modes == pytest.approx([1.0, 0.896, 0.739, 0.470], abs=5e-4)
    assert schedules.flow_sigmas(4) != pytest.approx(flow_modes, abs=0.01)  # 1.0 / 0.857 / 0.601 / 0.003
    with pytest.raises(ValueError, match="grid_steps"):
        schedules.flow_teacher_sigmas(0)


def test_shift_sigma_is_the_sd3_time_shift():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    shifted = schedules.shift_sigma(s, 3.0)
    torch.testing.assert_close(shifted, 3 * s / (1 + 2 * s))
    assert float(schedules.shift_sigma(1.0, 3.0)) == 1.0
    torch.testing.assert_close(schedules.shift_sigma(s, 1.0), s)


# ---------------------------------------------------------------- LCM boundary condition


def test_lcm_boundary_scalings_match_diffusers_lcm_scheduler():
    reference = LCMScheduler()
    for t in [0, 1, 9, 30, 249, 499, 749, 999]:
        c_skip_ref, c_out_ref = reference.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        c_skip, c_out = schedules.lcm_boundary_scalings(t)
        assert c_skip == pytest.approx(float(c_skip_ref), rel=1e-6, abs=1e-12)
        assert c_out == pytest.approx(float(c_out_ref), rel=1e-6)
    # tensors in, tensors out
    c_skip, c_out = schedules.lcm_boundary_scalings(torch.tensor([0.0, 999.0]))
    assert c_skip.tolist() == pytest.approx([1.0, 0.25 / (9990.0**2 + 0.25)])
    assert c_out.tolist() == pytest.approx([0.0, 9990.0 / math.sqrt(9990.0**2 + 0.25)])


# ---------------------------------------------------------------- DDPM schedule


def test_scaled_linear_alphas_cumprod_match_diffusers():
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    ours = schedules.scaled_linear_alphas_cumprod()
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    torch.testing.assert_close(ours.float(), reference, rtol=1e-5, atol=1e-7)


def test_sigma_from_alphas_cumprod_is_ve_sigma():
    abar = schedules.scaled_linear_alphas_cumprod()
    for t in (0, 249, 999):
        sigma = schedules.sigma_from_alphas_cumprod(abar, t)
        # abar = 1 / (1 + sigma^2) is ComfyUI's VE <-> VP relation
        assert 1.0 / (1.0 + sigma**2) == pytest.approx(float(abar[t]), rel=1e-12)
    assert schedules.sigma_from_alphas_cumprod(abar, 999) == pytest.approx(14.6146, abs=1e-3)


# ---------------------------------------------------------------- training-time timestep mixture


def test_mixture_modes_sit_on_the_four_step_grid():
    locs = schedules.mode_locations(32, 4)
    assert locs == [0, 8, 16, 24]
    grid = schedules.trailing_timesteps(32)
    assert [grid[i] for i in locs] == schedules.trailing_timesteps(4)
    with pytest.raises(ValueError):
        schedules.mode_locations(30, 4)


def test_mixture_mass_on_pure_noise_per_phase():
    masses = [round(float(schedules.timestep_mixture_probs(w)[0]), 3) for w in schedules.PHASE_MODE_WEIGHTS]
    assert masses == [0.0, 0.080, 0.202, 0.329]


def test_mixture_is_a_distribution_peaked_on_the_modes():
    for weights in schedules.PHASE_MODE_WEIGHTS:
        probs = schedules.timestep_mixture_probs(weights)
        assert probs.shape == (32,)
        assert float(probs.sum()) == pytest.approx(1.0, abs=1e-12)
        assert bool((probs >= 0).all())
        for weight, loc in zip(weights, schedules.mode_locations(32, 4)):
            if weight > 0:
                assert probs[loc] > probs[loc + 1] and probs[loc] > probs[loc - 1]
    with pytest.raises(ValueError):
        schedules.timestep_mixture_probs([0.0, 0.0, 0.0, 0.0])


def test_phase_of_step_four_equal_phases():
    assert [schedules.phase_of_step(s, 100) for s in (0, 24, 25, 49, 50, 74, 75, 99)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert schedules.phase_of_step(10_000, 100) == 3  # past the end: stays in the last phase
    phases = [schedules.phase_of_step(s, 10) for s in range(10)]
    assert phases == sorted(phases) and set(phases) == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        schedules.phase_of_step(0, 0)


# ---------------------------------------------------------------- denoise (img2img) grids


@pytest.mark.parametrize("num_steps", range(1, 9))
def test_denoise_one_is_the_training_grid(num_steps):
    assert schedules.denoise_timesteps(num_steps, 1.0) == schedules.trailing_timesteps(num_steps)


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
@pytest.mark.parametrize("denoise", [0.9, 0.75, 0.5, 0.3, 0.1])
def test_denoise_keeps_the_tail_of_the_longer_grid(num_steps, denoise):
    # ComfyUI KSampler rule (comfy/samplers.py KSampler.set_steps): int(steps / denoise) steps, keep the last `steps`.
    total = int(num_steps / denoise)
    got = schedules.denoise_timesteps(num_steps, denoise)
    assert got == schedules.trailing_timesteps(total)[-num_steps:]
    assert len(got) == num_steps
    assert got == sorted(got, reverse=True) and len(set(got)) == num_steps


def test_denoise_half_four_steps():
    assert schedules.denoise_timesteps(4, 0.5) == [499, 374, 249, 124]


def test_denoise_grid_length_is_comfyui_rule():
    assert [schedules.denoise_grid_length(4, d) for d in (1.0, 0.8, 0.5, 0.3, 0.1)] == [4, 5, 8, 13, 40]
    assert schedules.denoise_grid_length(3, 0.99) == 3  # never shorter than the steps themselves


def test_denoise_flow_sigmas_keep_the_tail_of_the_longer_flow_grid():
    for n in range(1, 9):
        assert schedules.denoise_flow_sigmas(n, 1.0) == schedules.flow_sigmas(n)
    assert schedules.denoise_flow_sigmas(4, 0.5) == schedules.flow_sigmas(8)[-4:]
    assert schedules.denoise_flow_sigmas(2, 0.3, shift=1.0) == schedules.flow_sigmas(6, 1.0)[-2:]
    with pytest.raises(ValueError, match="denoise"):
        schedules.denoise_flow_sigmas(4, 0.0)
    with pytest.raises(ValueError, match="1 to 8 steps"):
        schedules.denoise_flow_sigmas(0, 1.0)


def test_denoise_rejects_bad_inputs():
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="denoise"):
            schedules.denoise_timesteps(4, bad)
    with pytest.raises(ValueError, match="1 to 8 steps"):
        schedules.denoise_timesteps(9, 1.0)
