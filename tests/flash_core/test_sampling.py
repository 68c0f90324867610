"""flash_core.sampling: the few-step Flash sampler, checked against diffusers' own schedulers.

References are diffusers' code paths, not ours: LCMScheduler.step (x0 prediction, LCM boundary condition,
re-noise with noise drawn inside step() from the generator it is given) for discrete models, and
FlowMatchEulerDiscreteScheduler(stochastic_sampling=True).step (x0 = x - sigma v, re-noise
x = s_next eps + (1 - s_next) x0 with noise from the global RNG) for flow models. Both sides run the same
tiny seeded model on the same starting latents and consume the same noise stream (same seed).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)

from flash_core import sampling, schedules
from flash_core.lora_formats.metadata import GUIDANCE_MODES

NOISE_SEED = 1234
BATCH = 2


@pytest.fixture(scope="module")
def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    return unet.eval()


@pytest.fixture(scope="module")
def tiny_sd3() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=8,
    )
    return model.eval()


def _lcm_scheduler(prediction_type: str) -> LCMScheduler:
    return LCMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )


def _diffusers_lcm_reference(unet, cond, latents, timesteps, prediction_type):
    """diffusers' LCM pipeline loop: scheduler.step draws the re-noise noise from `generator`."""
    scheduler = _lcm_scheduler(prediction_type)
    scheduler.set_timesteps(timesteps=list(timesteps))
    assert [int(t) for t in scheduler.timesteps] == list(timesteps)
    generator = torch.Generator().manual_seed(NOISE_SEED)
    sample = latents.clone()
    denoised = None
    for t in scheduler.timesteps:
        model_output = unet(sample, t, encoder_hidden_states=cond).sample
        sample, denoised = scheduler.step(model_output, t, sample, generator=generator, return_dict=False)
    torch.testing.assert_close(sample, denoised)  # the last step returns the denoised sample
    return sample


CASES = {
    "4 steps": [999, 749, 499, 249],
    "2 steps": [999, 499],
    "1 step": [999],
    # img2img at strength 0.01 ([9, 7, 4, 1]): low timesteps, where the LCM boundary condition matters
    "4 steps denoise 0.01": schedules.denoise_timesteps(4, 0.01),
}


DISCRETE_RUNS = [
    pytest.param(case, prediction, dtype, id=f"{case}-{prediction}-{'fp32' if dtype == torch.float32 else 'fp64'}")
    for case in CASES
    for prediction in ("epsilon", "v_prediction")
    for dtype in ((torch.float32, torch.float64) if case.startswith("4 steps") else (torch.float32,))
]


@pytest.mark.parametrize("case,prediction_type,dtype", DISCRETE_RUNS)
def test_discrete_sampler_equals_diffusers_lcm_scheduler(tiny_unet, case, prediction_type, dtype):
    timesteps = CASES[case]
    unet = tiny_unet.to(dtype)
    gen = torch.Generator().manual_seed(7)
    cond = torch.randn(BATCH, 5, 32, generator=gen).to(dtype)
    latents = torch.randn(BATCH, 4, 8, 8, generator=gen).to(dtype)
    if timesteps[0] != 999:  # img2img: start from a noised "image" latent
        image = torch.randn(BATCH, 4, 8, 8, generator=gen).to(dtype)
        latents = _lcm_scheduler(prediction_type).add_noise(image, latents, torch.tensor([timesteps[0]]))

    with torch.no_grad():
        reference = _diffusers_lcm_reference(unet, cond, latents, timesteps, prediction_type)
        ours = sampling.sample_discrete(
            lambda z, t: unet(z, t, encoder_hidden_states=cond).sample,
            latents,
            timesteps,
            schedules.scaled_linear_alphas_cumprod(),
            prediction_type=prediction_type,
            generator=torch.Generator().manual_seed(NOISE_SEED),
        )
    assert ours.dtype == dtype and ours.shape == latents.shape
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_discrete_sampler_uses_its_noise_and_boundary_condition(tiny_unet):
    """Guards against a vacuous equivalence: the seed and the boundary condition both change the result."""
    unet = tiny_unet.to(torch.float32)
    gen = torch.Generator().manual_seed(7)
    cond = torch.randn(1, 5, 32, generator=gen)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    abar = schedules.scaled_linear_alphas_cumprod()

    def run(seed, timesteps):
        with torch.no_grad():
            return sampling.sample_discrete(
                lambda z, t: unet(z, t, encoder_hidden_states=cond).sample,
                latents, timesteps, abar, generator=torch.Generator().manual_seed(seed),
            )

    four = run(NOISE_SEED, [999, 749, 499, 249])
    assert not torch.allclose(four, run(NOISE_SEED + 1, [999, 749, 499, 249]), atol=1e-3)
    assert not torch.allclose(four, run(NOISE_SEED, [999]), atol=1e-3)
    # without the boundary condition, the low-timestep grid gives a different answer than diffusers' LCM
    low = schedules.denoise_timesteps(4, 0.01)
    with torch.no_grad():
        reference = _diffusers_lcm_reference(unet, cond, latents, low, "epsilon")
        eps = unet(latents, low[-1], encoder_hidden_states=cond).sample
    no_boundary_x0 = sampling.predicted_x0(eps, latents, float(abar[low[-1]]))
    with_boundary_x0 = sampling.lcm_boundary_x0(no_boundary_x0, latents, low[-1])
    assert (with_boundary_x0 - no_boundary_x0).abs().max() > 1e-3
    torch.testing.assert_close(run(NOISE_SEED, low), reference, atol=1e-5, rtol=1e-5)


def _diffusers_flow_reference(model, cond, pooled, latents, num_steps):
    """diffusers' FlowMatchEulerDiscreteScheduler, stochastic (LCM-style) step, shift 3, SD3 sigmas."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / 1000, num_steps))
    sample = latents.clone()
    with torch.random.fork_rng():
        torch.manual_seed(NOISE_SEED)  # step() draws torch.randn_like from the global generator
        for t in scheduler.timesteps:
            velocity = model(
                hidden_states=sample,
                encoder_hidden_states=cond,
                pooled_projections=pooled,
                timestep=t.expand(sample.shape[0]),
            ).sample
            sample = scheduler.step(velocity, t, sample).prev_sample
    return sample


@pytest.mark.parametrize("num_steps", [4, 2, 1])
def test_flow_sampler_equals_diffusers_flow_match_stochastic_step(tiny_sd3, num_steps):
    # float32 only: FlowMatchEulerDiscreteScheduler.step upcasts to float32 and draws float32 noise.
    dtype = torch.float32
    model = tiny_sd3.to(dtype)
    gen = torch.Generator().manual_seed(11)
    cond = torch.randn(BATCH, 6, 16, generator=gen).to(dtype)
    pooled = torch.randn(BATCH, 16, generator=gen).to(dtype)
    latents = torch.randn(BATCH, 4, 8, 8, generator=gen).to(dtype)

    def velocity(x, timestep):
        t = torch.full((x.shape[0],), timestep, dtype=x.dtype)
        return model(hidden_states=x, encoder_hidden_states=cond, pooled_projections=pooled, timestep=t).sample

    with torch.no_grad():
        reference = _diffusers_flow_reference(model, cond, pooled, latents, num_steps)
        sigmas = schedules.flow_sigmas(num_steps, 3.0)
        ours = sampling.sample_flow(velocity, latents, sigmas, generator=torch.Generator().manual_seed(NOISE_SEED))
        if num_steps > 1:
            other_seed = sampling.sample_flow(velocity, latents, sigmas, generator=torch.Generator().manual_seed(0))
            assert not torch.allclose(ours, other_seed, atol=1e-3)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- deterministic re-noise (guidance mode "cfg")


DETERMINISTIC_RUNS = [pytest.param(steps, prediction, id=f"{steps} steps-{prediction}")
                      for steps in (4, 2, 1) for prediction in ("epsilon", "v_prediction")]


@pytest.mark.parametrize("num_steps,prediction_type", DETERMINISTIC_RUNS)
def test_deterministic_discrete_sampler_equals_diffusers_ddim(tiny_unet, num_steps, prediction_type):
    """renoise "deterministic" is DDIM at eta 0 on the trailing grid (the LCM boundary condition is ~1e-8 at these
    timesteps), and draws nothing from the generator."""
    unet = tiny_unet.to(torch.float32)
    gen = torch.Generator().manual_seed(7)
    cond = torch.randn(BATCH, 5, 32, generator=gen)
    latents = torch.randn(BATCH, 4, 8, 8, generator=gen)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=True, timestep_spacing="trailing", prediction_type=prediction_type)
    scheduler.set_timesteps(num_steps)
    timesteps = schedules.trailing_timesteps(num_steps)
    assert [int(t) for t in scheduler.timesteps] == timesteps

    def model_fn(z, t):
        return unet(z, t, encoder_hidden_states=cond).sample

    with torch.no_grad():
        reference = latents.clone()
        for t in scheduler.timesteps:
            reference = scheduler.step(model_fn(reference, t), t, reference, eta=0.0, return_dict=False)[0]

        def ours(seed):
            return sampling.sample_discrete(model_fn, latents, timesteps, schedules.scaled_linear_alphas_cumprod(),
                                            prediction_type, torch.Generator().manual_seed(seed), renoise="deterministic")

        deterministic = ours(NOISE_SEED)
        assert torch.equal(deterministic, ours(NOISE_SEED + 1))
        fresh = sampling.sample_discrete(model_fn, latents, timesteps, schedules.scaled_linear_alphas_cumprod(),
                                         prediction_type, torch.Generator().manual_seed(NOISE_SEED))
    torch.testing.assert_close(deterministic, reference, atol=1e-5, rtol=1e-5)
    if num_steps > 1:
        assert not torch.allclose(deterministic, fresh, atol=1e-3)


@pytest.mark.parametrize("num_steps", [4, 2])
def test_deterministic_flow_sampler_equals_diffusers_flow_match_euler(tiny_sd3, num_steps):
    model = tiny_sd3.to(torch.float32)
    gen = torch.Generator().manual_seed(11)
    cond = torch.randn(BATCH, 6, 16, generator=gen)
    pooled = torch.randn(BATCH, 16, generator=gen)
    latents = torch.randn(BATCH, 4, 8, 8, generator=gen)

    def velocity(x, timestep):
        t = torch.full((x.shape[0],), timestep, dtype=x.dtype)
        return model(hidden_states=x, encoder_hidden_states=cond, pooled_projections=pooled, timestep=t).sample

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # deterministic Euler steps
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / 1000, num_steps))
    with torch.no_grad():
        reference = latents.clone()
        for t in scheduler.timesteps:
            reference = scheduler.step(velocity(reference, float(t)), t, reference).prev_sample
        ours = sampling.sample_flow(velocity, latents, schedules.flow_sigmas(num_steps, 3.0), renoise="deterministic")
    # diffusers' last Euler step lands on sigma 0, ours returns that step's x0: the same point
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_renoise_rule_of_every_guidance_mode():
    assert set(sampling.RENOISE_OF_GUIDANCE_MODE) == set(GUIDANCE_MODES)
    assert sampling.renoise_rule("cfg") == "deterministic"
    assert sampling.renoise_rule("baked") == sampling.renoise_rule(None) == "fresh"  # files without the key
    with pytest.raises(ValueError, match="renoise must be one of"):
        sampling.sample_discrete(lambda z, t: z, torch.zeros(1, 4, 8, 8), [999], schedules.scaled_linear_alphas_cumprod(),
                                 renoise="ddim")


# ---------------------------------------------------------------- the loop itself


def test_few_step_loop_order_of_calls():
    calls = []

    def denoise_fn(x, level):
        calls.append(("denoise", level, float(x)))
        return x * 0 + level / 10  # "x0" depends on the level only

    def noise_fn(level, next_level):
        calls.append(("noise", level, next_level))
        return torch.tensor(1.0)

    def renoise_fn(x0, noise, next_level):
        calls.append(("renoise", next_level))
        return x0 + next_level * noise

    seen = []

    def callback(i, x, x0):
        seen.append((i, float(x), float(x0)))

    out = sampling.few_step_loop(torch.tensor(0.5), [30, 20, 10], denoise_fn, renoise_fn, noise_fn, callback=callback)
    assert calls == [
        ("denoise", 30, 0.5), ("noise", 30, 20), ("renoise", 20),
        ("denoise", 20, 23.0), ("noise", 20, 10), ("renoise", 10),
        ("denoise", 10, 12.0),
    ]
    assert float(out) == 1.0  # last step returns x0 itself, no noise drawn
    assert seen == [(0, 0.5, 3.0), (1, 23.0, 2.0), (2, 12.0, 1.0)]

    # a partial schedule ending above zero re-noises the last x0 to end_level
    out = sampling.few_step_loop(torch.tensor(0.5), [30], denoise_fn, renoise_fn, noise_fn, end_level=5)
    assert float(out) == 3.0 + 5.0
    # no levels: nothing to do
    assert float(sampling.few_step_loop(torch.tensor(0.5), [], denoise_fn, renoise_fn, noise_fn)) == 0.5

    # deterministic re-noise: the noise x implies given x0, and no fresh noise drawn
    calls.clear()

    def implied_noise_fn(x, x0, level):
        calls.append(("implied", level, float(x), float(x0)))
        return torch.tensor(2.0)

    out = sampling.few_step_loop(torch.tensor(0.5), [30, 20], denoise_fn, renoise_fn, noise_fn,
                                 implied_noise_fn=implied_noise_fn)
    assert calls == [("denoise", 30, 0.5), ("implied", 30, 0.5, 3.0), ("renoise", 20), ("denoise", 20, 43.0)]
    assert float(out) == 2.0


# ---------------------------------------------------------------- step maths


def test_x0_recovery_for_eps_v_and_flow():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    for abar in (0.9, 0.3, 0.0047):
        z = abar**0.5 * x0 + (1 - abar) ** 0.5 * eps  # forward VP process
        v = abar**0.5 * eps - (1 - abar) ** 0.5 * x0  # v target
        torch.testing.assert_close(sampling.predicted_x0(eps, z, abar, "epsilon"), x0)
        torch.testing.assert_close(sampling.predicted_x0(v, z, abar, "v_prediction"), x0)
        torch.testing.assert_close(sampling.predicted_x0(x0, z, abar, "sample"), x0)
        torch.testing.assert_close(sampling.discrete_renoise(x0, eps, abar), z)
    for sigma in (1.0, 0.6, 0.003):
        x = sigma * eps + (1 - sigma) * x0  # forward flow process
        torch.testing.assert_close(sampling.flow_x0(eps - x0, x, sigma), x0)
        torch.testing.assert_close(sampling.flow_renoise(x0, eps, sigma), x)
    with pytest.raises(ValueError, match="prediction_type"):
        sampling.predicted_x0(eps, x0, 0.5, "flow")


def test_vp_sample_from_ve_matches_comfyui_convention():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 3, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(1, 4, 3, 3, generator=gen, dtype=torch.float64)
    abar = schedules.scaled_linear_alphas_cumprod()
    for t in (999, 500, 10):
        sigma = schedules.sigma_from_alphas_cumprod(abar, t)
        x_ve = x0 + sigma * eps  # ComfyUI's sample at sigma
        z_t = float(abar[t]) ** 0.5 * x0 + (1 - float(abar[t])) ** 0.5 * eps
        torch.testing.assert_close(sampling.vp_sample_from_ve(x_ve, sigma), z_t)


def test_boundary_condition_per_batch_timesteps():
    x0 = torch.ones(2, 1, 2, 2)
    z = torch.full((2, 1, 2, 2), 3.0)
    out = sampling.lcm_boundary_x0(x0, z, torch.tensor([0, 999]))
    assert torch.allclose(out[0], z[0])  # t = 0: c_skip = 1, c_out = 0 (identity at the boundary)
    c_skip, c_out = schedules.lcm_boundary_scalings(999.0)
    assert torch.allclose(out[1], torch.full((1, 2, 2), 3.0 * c_skip + c_out))


def test_ve_loop_equals_vp_loop(tiny_unet):
    """The ComfyUI formulation (VE samples x = x0 + sigma eps, model fed x/sqrt(1+sigma^2), re-noise
    x0 + sigma' eps, boundary condition on the VP z_t) gives the same samples as the diffusers one."""
    unet = tiny_unet.to(torch.float64)
    gen = torch.Generator().manual_seed(3)
    cond = torch.randn(1, 5, 32, generator=gen, dtype=torch.float64)
    noise = torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64)
    abar = schedules.scaled_linear_alphas_cumprod()
    timesteps = schedules.trailing_timesteps(4)
    sigma_of = {t: schedules.sigma_from_alphas_cumprod(abar, t) for t in timesteps}

    def eps_fn(z, t):
        return unet(z, t, encoder_hidden_states=cond).sample

    with torch.no_grad():
        vp = sampling.sample_discrete(eps_fn, noise, timesteps, abar, generator=torch.Generator().manual_seed(5))

        def denoise_fn(x, t):
            z_t = sampling.vp_sample_from_ve(x, sigma_of[t])
            x0 = x - sigma_of[t] * eps_fn(z_t, t)  # ComfyUI EPS.calculate_denoised
            return sampling.lcm_boundary_x0(x0, z_t, t)

        ve_generator = torch.Generator().manual_seed(5)
        ve = sampling.few_step_loop(
            noise * (1 + sigma_of[999] ** 2) ** 0.5,  # ComfyUI's max-denoise start: VP z_T = pure noise
            timesteps,
            denoise_fn,
            lambda x0, eps, t: x0 + sigma_of[t] * eps,  # ComfyUI EPS.noise_scaling
            lambda t, t_next: torch.randn(noise.shape, generator=ve_generator, dtype=noise.dtype),
        )
    torch.testing.assert_close(ve, vp, atol=1e-9, rtol=1e-9)
