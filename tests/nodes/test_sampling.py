"""nodes/sampling.py in-process in real ComfyUI, on a tiny SD1.5-family model built with ComfyUI's classes.

References are ComfyUI's own stock sampler ("lcm") and schedulers ("sgm_uniform", "simple") run through
comfy.sample.sample on the same model, seed and latent. Timesteps are recorded through a
"model_function_wrapper" installed on a clone of the model: that is the wrapper ComfyUI calls, so the
records also prove the Flash sampler goes through it.
"""

from __future__ import annotations

import pytest
import torch

from training.fixtures.comfy_env import import_comfy, load_pack

import_comfy()

import comfy.model_base
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.supported_models

SEED = 42
CONTEXT_DIM = 32


def _tiny_sd15_config() -> dict:
    return {
        "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1], "channel_mult": [1],
        "transformer_depth": [1], "transformer_depth_output": [1, 1], "transformer_depth_middle": 1,
        "context_dim": CONTEXT_DIM, "use_spatial_transformer": True, "legacy": False,
        "use_linear_in_transformer": False,
        "adm_in_channels": None, "use_temporal_attention": False, "image_size": 32, "num_head_channels": -1,
        "dtype": torch.float32,
    }


@pytest.fixture(scope="module")
def sampling_nodes():
    return load_pack().nodes.sampling


@pytest.fixture(scope="module")
def model():
    """SD1.5-family BaseModel (eps, scaled-linear schedule) with seeded torch-default weights."""
    torch.manual_seed(0)
    base = comfy.supported_models.SD15(_tiny_sd15_config()).get_model({})
    _torch_default_init(base)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def _torch_default_init(base) -> None:
    """ComfyUI's ops skip weight init: give every layer torch's default init (seeded by the caller)."""
    with torch.no_grad():
        for module in base.modules():
            for layer in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
                if isinstance(module, layer):
                    layer.reset_parameters(module)
                    break
    base.requires_grad_(False)


@pytest.fixture(scope="module")
def sd3_model():
    """SD3-family BaseModel (ModelSamplingDiscreteFlow + CONST, shift 3): a one-block MMDiT, 16-channel latents."""
    config = {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 1, "input_size": None, "pos_embed_max_size": 8,
        "num_patches": 64, "adm_in_channels": 16, "pos_embed_scaling_factor": None, "dtype": torch.float32,
        "context_embedder_config": {
            "target": "torch.nn.Linear", "params": {"in_features": CONTEXT_DIM, "out_features": 64},
        },
    }
    torch.manual_seed(0)
    base = comfy.supported_models.SD3(config).get_model({})
    _torch_default_init(base)
    base.diffusion_model.pos_embed.normal_(0.0, 0.02)  # a buffer ComfyUI leaves uninitialised (torch.empty)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


@pytest.fixture(scope="module")
def cond():
    generator = torch.Generator().manual_seed(1)
    return [[torch.randn(1, 5, CONTEXT_DIM, generator=generator), {}]]


def _image_latent(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(3))


def _recording(model, seen: list, record=None):
    """A clone whose model_function_wrapper records the DDPM timesteps the UNet is called with
    (or record(sigma) of the sigmas the wrapper receives)."""
    clone = model.clone()
    model_sampling = model.get_model_object("model_sampling")
    if record is None:
        def record(sigma):
            return int(model_sampling.timestep(sigma)[0])

    def wrapper(apply_model, args):
        seen.append(record(args["timestep"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(wrapper)
    return clone


def _flash(nodes, model, cond, latent, steps=4, denoise=1.0, seed=SEED):
    return nodes.FlashSampler.execute(model, cond, cond, latent, seed, steps, 1.0, denoise).result[0]["samples"]


def _stock(model, cond, latent_samples, steps, scheduler, denoise=1.0, seed=SEED, noise_mask=None):
    noise = comfy.sample.prepare_noise(latent_samples, seed)
    return comfy.sample.sample(
        model, noise, steps, 1.0, "lcm", scheduler, cond, cond, latent_samples,
        denoise=denoise, noise_mask=noise_mask, seed=seed,
    )


# ---------------------------------------------------------------- equivalence with the stock sampler


def test_one_step_equals_stock_lcm_sgm_uniform(sampling_nodes, model, cond):
    latent = torch.zeros(2, 4, 8, 8)
    ours = _flash(sampling_nodes, model, cond, {"samples": latent}, steps=1)
    stock = _stock(model, cond, latent, 1, "sgm_uniform")
    assert ours.shape == (2, 4, 8, 8) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-4)


def test_four_steps_equal_stock_lcm_simple_and_sampler_custom(sampling_nodes, model, cond):
    """Same grid and same re-noise noise stream as stock lcm + "simple"; the SAMPLER + SIGMAS pair through
    comfy.sample.sample_custom (what SamplerCustom runs) gives exactly what the all-in-one node gives."""
    latent = torch.zeros(2, 4, 8, 8)
    ours = _flash(sampling_nodes, model, cond, {"samples": latent}, steps=4)
    stock = _stock(model, cond, latent, 4, "simple")
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(ours, _flash(sampling_nodes, model, cond, {"samples": latent}, steps=4, seed=SEED + 1))

    sampler = sampling_nodes.FlashSamplerSelect.execute().result[0]
    sigmas = sampling_nodes.FlashScheduler.execute(model, 4, 1.0).result[0]
    custom = comfy.sample.sample_custom(
        model, comfy.sample.prepare_noise(latent, SEED), 1.0, sampler, sigmas, cond, cond, latent, seed=SEED
    )
    assert torch.equal(custom, ours)


def test_lcm_boundary_condition_is_applied(sampling_nodes, model, cond):
    """At t=9 (1 step, denoise 0.01) the student output is c_skip z_t + c_out x0, with x0 what stock "lcm"
    returns on the same sigmas and z_t the VP sample (x / sqrt(1 + sigma^2))."""
    from flash_core import schedules

    latent = _image_latent(batch=1)
    seen: list[int] = []
    ours = _flash(sampling_nodes, _recording(model, seen), cond, {"samples": latent}, steps=1, denoise=0.01)
    assert seen == [9]
    sigmas = sampling_nodes.FlashScheduler.execute(model, 1, 0.01).result[0]
    noise = comfy.sample.prepare_noise(latent, SEED)
    stock_x0 = comfy.sample.sample_custom(
        model, noise, 1.0, comfy.samplers.sampler_object("lcm"), sigmas, cond, cond, latent, seed=SEED
    )
    sigma = float(sigmas[0])
    scale = model.get_model_object("latent_format").scale_factor
    z_t = (latent + sigma * noise / scale) / (1.0 + sigma**2) ** 0.5  # process_out(x_sigma) / sqrt(1 + sigma^2)
    c_skip, c_out = schedules.lcm_boundary_scalings(9)
    torch.testing.assert_close(ours, c_skip * z_t + c_out * stock_x0, rtol=1e-5, atol=1e-6)
    assert (ours - stock_x0).abs().max() > 1e-5  # the condition is visible at t=9


def test_progress_bar_and_cancel(sampling_nodes, model, cond):
    import comfy.model_management
    import comfy.utils

    updates = []
    previous_hook = comfy.utils.PROGRESS_BAR_HOOK
    try:
        def record(value, total, preview, node_id=None):
            updates.append((value, total))

        comfy.utils.set_progress_bar_global_hook(record)
        _flash(sampling_nodes, model, cond, {"samples": torch.zeros(1, 4, 8, 8)}, steps=4)
        # one update per step: the first and the last always reach the hook; ComfyUI 0.30's ProgressBar
        # throttles the ones in between (0.3.75 sends all four)
        assert updates[0] == (1, 4) and updates[-1] == (4, 4)
        assert updates == sorted(set(updates)) and set(updates) <= {(1, 4), (2, 4), (3, 4), (4, 4)}

        def cancel(value, total, preview, node_id=None):  # what ComfyUI's hook does when Cancel was pressed
            raise comfy.model_management.InterruptProcessingException()

        seen: list[int] = []
        comfy.utils.set_progress_bar_global_hook(cancel)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _flash(sampling_nodes, _recording(model, seen), cond, {"samples": torch.zeros(1, 4, 8, 8)}, steps=4)
        assert seen == [999]  # stopped after the first step
    finally:
        comfy.utils.set_progress_bar_global_hook(previous_hook)


# ---------------------------------------------------------------- the grid the model sees


@pytest.mark.parametrize("steps,expected", [(2, [999, 499]), (4, [999, 749, 499, 249]), (1, [999])])
def test_model_sees_the_training_grid(sampling_nodes, model, cond, steps, expected):
    seen: list[int] = []
    _flash(sampling_nodes, _recording(model, seen), cond, {"samples": torch.zeros(1, 4, 8, 8)}, steps=steps)
    assert seen == expected


def test_flash_scheduler_sigmas(sampling_nodes, model):
    model_sampling = model.get_model_object("model_sampling")
    sigmas = sampling_nodes.FlashScheduler.execute(model, 4, 1.0).result[0]
    assert sigmas.shape == (5,) and float(sigmas[-1]) == 0.0
    assert [int(model_sampling.timestep(s)) for s in sigmas[:-1]] == [999, 749, 499, 249]
    half = sampling_nodes.FlashScheduler.execute(model, 4, 0.5).result[0]
    assert [int(model_sampling.timestep(s)) for s in half[:-1]] == [499, 374, 249, 124]


def test_flash_scheduler_flow_model_uses_the_model_shift(sampling_nodes):
    """SD3-style models (ModelSamplingDiscreteFlow + CONST): flash_core's flow grid with the model's shift."""
    from flash_core import schedules

    config = comfy.supported_models.SD3({"in_channels": 16})
    flow_sampling = comfy.model_base.model_sampling(config, comfy.model_base.ModelType.FLOW)
    assert float(flow_sampling.shift) == 3.0

    class FlowModelStub:  # FlashScheduler only asks the MODEL for its model_sampling
        def get_model_object(self, name):
            assert name == "model_sampling"
            return flow_sampling

    sigmas = sampling_nodes.FlashScheduler.execute(FlowModelStub(), 4, 1.0).result[0]
    torch.testing.assert_close(sigmas, torch.tensor(schedules.flow_sigmas(4, 3.0) + [0.0]))
    half = sampling_nodes.FlashScheduler.execute(FlowModelStub(), 2, 0.5).result[0]
    torch.testing.assert_close(half, torch.tensor(schedules.flow_sigmas(4, 3.0)[-2:] + [0.0]))


def test_flow_model_runs_the_flow_grid_without_boundary_condition(sampling_nodes, sd3_model):
    """SD3: the model sees flash_core's shift-3 flow sigmas; the loop is x0 = x - sigma v, re-noise
    s eps + (1 - s) x0 (CONST.noise_scaling), i.e. exactly stock "lcm" on the same sigmas."""
    from flash_core import schedules

    generator = torch.Generator().manual_seed(2)
    context = torch.randn(1, 5, CONTEXT_DIM, generator=generator)
    flow_cond = [[context, {"pooled_output": torch.randn(1, 16, generator=generator)}]]
    latent = torch.zeros(1, 4, 8, 8)  # an SD1.5-sized Empty Latent: all zeros, so ComfyUI widens it to 16
    seen: list[float] = []
    recording = _recording(sd3_model, seen, record=lambda sigma: float(sigma[0]))  # flow: the model's t is sigma
    ours = _flash(sampling_nodes, recording, flow_cond, {"samples": latent}, steps=4)
    assert ours.shape == (1, 16, 8, 8) and torch.isfinite(ours).all()
    assert seen == pytest.approx(schedules.flow_sigmas(4, 3.0), rel=1e-6)

    sigmas = sampling_nodes.FlashScheduler.execute(sd3_model, 4, 1.0).result[0]
    wide = torch.zeros(1, 16, 8, 8)
    stock = comfy.sample.sample_custom(
        sd3_model, comfy.sample.prepare_noise(wide, SEED), 1.0, comfy.samplers.sampler_object("lcm"), sigmas,
        flow_cond, flow_cond, wide, seed=SEED,
    )
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match=r"FlashSampler: the latent has 4 channels but this model \(SD3\) expects 16"):
        _flash(sampling_nodes, sd3_model, flow_cond, {"samples": torch.ones(1, 4, 8, 8)})


# ---------------------------------------------------------------- inpainting and img2img


@pytest.mark.parametrize("steps,denoise", [(4, 1.0), (4, 0.5), (1, 0.01)])
def test_noise_mask_keeps_the_latent_outside_the_mask(sampling_nodes, model, cond, steps, denoise):
    # (1, 0.01) runs at t=9, where the LCM boundary condition is large enough to break exactness if it
    # were applied outside the mask.
    latent = _image_latent(batch=2)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :4] = 1.0  # repaint the left half only
    out = _flash(sampling_nodes, model, cond, {"samples": latent, "noise_mask": mask}, steps=steps, denoise=denoise)

    latent_format = model.get_model_object("latent_format")
    roundtrip = latent_format.process_out(latent_format.process_in(latent))  # ComfyUI's in/out scaling
    outside, inside = (mask == 0).expand_as(latent), (mask == 1).expand_as(latent)
    assert torch.equal(out[outside], roundtrip[outside])
    assert (out[inside] - latent[inside]).abs().mean() > 1e-2
    torch.testing.assert_close(roundtrip, latent)  # the roundtrip itself is the identity up to rounding


@pytest.mark.parametrize("steps,denoise", [(4, 0.5), (4, 0.75), (2, 0.6), (8, 0.3), (1, 0.5)])
def test_denoise_starts_where_stock_simple_starts(sampling_nodes, model, cond, steps, denoise):
    latent = _image_latent(batch=1)
    flash_seen: list[int] = []
    stock_seen: list[int] = []
    _flash(sampling_nodes, _recording(model, flash_seen), cond, {"samples": latent}, steps=steps, denoise=denoise)
    _stock(_recording(model, stock_seen), cond, latent, steps, "simple", denoise=denoise)
    assert len(flash_seen) == steps
    assert flash_seen[0] == stock_seen[0]
    assert flash_seen[0] < 999


def test_denoise_first_timestep_within_one_of_stock_when_rounding_differs(sampling_nodes, model, cond):
    # 4 steps at 0.55 -> 7-step grid: trailing rounds 1000 - 3*1000/7 = 571.4 to 570, "simple" floors to 571.
    flash_seen: list[int] = []
    stock_seen: list[int] = []
    latent = _image_latent(batch=1)
    _flash(sampling_nodes, _recording(model, flash_seen), cond, {"samples": latent}, steps=4, denoise=0.55)
    _stock(_recording(model, stock_seen), cond, latent, 4, "simple", denoise=0.55)
    assert abs(flash_seen[0] - stock_seen[0]) <= 1


# ---------------------------------------------------------------- clear errors


@pytest.mark.parametrize("steps", [-1, 0, 9])
def test_bad_steps_raise(sampling_nodes, model, cond, steps):
    if steps != 0:  # FlashSampler: 0 = the Flash LoRA's recommended steps (tests/nodes/test_stack_sampling.py)
        with pytest.raises(ValueError, match=r"FlashSampler: .*1 to 8 steps"):
            _flash(sampling_nodes, model, cond, {"samples": torch.zeros(1, 4, 8, 8)}, steps=steps)
    with pytest.raises(ValueError, match=r"FlashScheduler: .*1 to 8 steps"):
        sampling_nodes.FlashScheduler.execute(model, steps, 1.0)


@pytest.mark.parametrize("denoise", [0.0, -0.5, 1.5])
def test_bad_denoise_raises(sampling_nodes, model, cond, denoise):
    with pytest.raises(ValueError, match=r"FlashSampler: denoise must be in \(0, 1\]"):
        _flash(sampling_nodes, model, cond, {"samples": torch.zeros(1, 4, 8, 8)}, denoise=denoise)
    with pytest.raises(ValueError, match=r"FlashScheduler: denoise must be in \(0, 1\]"):
        sampling_nodes.FlashScheduler.execute(model, 4, denoise)


@pytest.mark.parametrize("steps,denoise", [(4, 0.003), (4, 0.0039), (8, 0.005), (1, 0.0005)])
def test_a_denoise_too_small_for_the_steps_says_what_to_do(sampling_nodes, model, cond, steps, denoise):
    """4 steps at denoise 0.003 would need a 1333-step grid of a 1000-timestep model: said in the user's terms
    (denoise, steps, the smallest denoise that works), not as "num_steps must be in 1..1000, got 1333"."""
    for call in (lambda: _flash(sampling_nodes, model, cond, {"samples": torch.zeros(1, 4, 8, 8)}, steps=steps,
                                denoise=denoise),
                 lambda: sampling_nodes.FlashScheduler.execute(model, steps, denoise)):
        with pytest.raises(ValueError) as error:
            call()
        message = str(error.value)
        assert f"denoise {denoise:g} is too small for {steps} steps" in message
        assert f"Use denoise {steps / 1000:g} or more, or fewer steps" in message and "num_steps" not in message
    sampling_nodes.FlashScheduler.execute(model, steps, steps / 1000)  # the smallest one it names works


def test_broken_recommended_steps_are_not_reported_as_the_users_steps(sampling_nodes, model, cond):
    """steps 0 = the Flash LoRA's: a MODEL whose Flash settings recommend 20 steps names the LoRA and its value."""
    broken = model.clone()
    broken.model_options["flash"] = {"lora_name": "odd.safetensors", "steps": 20, "cfg": 1.0, "timesteps": []}
    with pytest.raises(ValueError) as error:
        _flash(sampling_nodes, broken, cond, {"samples": torch.zeros(1, 4, 8, 8)}, steps=0)
    message = str(error.value)
    assert "Flash LoRA 'odd.safetensors' recommends 20 steps" in message and "Set steps to 1-8 on FlashSampler" in message
    _flash(sampling_nodes, broken, cond, {"samples": torch.zeros(1, 4, 8, 8)}, steps=2)  # the user's steps win


def test_a_cfg_mode_lora_samples_at_its_cfg_with_the_negative(sampling_nodes, model, cond, caplog):
    """Guidance mode "cfg" (issue 24): cfg 0 takes the LoRA's recommended cfg, the negative then acts; a cfg outside
    the trained range, or 1 on such a LoRA, and a cfg above 1 on a baked LoRA, each log a note (never an error)."""
    guided = model.clone()
    guided.model_options["flash"] = {"lora_name": "cfg.safetensors", "steps": 2, "cfg": 4.5, "timesteps": [],
                                     "guidance_mode": "cfg", "guidance_range": [1.0, 8.0]}
    negative = [[torch.zeros_like(cond[0][0]), {}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def sample(m, cfg, neg):
        return sampling_nodes.FlashSampler.execute(m, cond, neg, latent, SEED, 0, cfg, 1.0).result[0]["samples"]

    auto = sample(guided, 0.0, negative)
    assert torch.equal(auto, sample(guided, 4.5, negative))  # cfg 0 = the recorded 4.5
    assert not torch.equal(auto, sample(guided, 4.5, cond))  # the negative prompt acts
    assert not torch.equal(auto, sample(guided, 2.0, negative))  # the dial acts
    with caplog.at_level("WARNING"):
        sample(guided, 12.0, negative)
        sample(guided, 1.0, negative)
        baked = model.clone()
        baked.model_options["flash"] = {**guided.model_options["flash"], "guidance_mode": "baked", "cfg": 1.0}
        sample(baked, 3.0, negative)
    notes = [r.getMessage() for r in caplog.records if "FlashSampler" in r.getMessage()]
    assert any("cfg 12 is outside the range 1-8" in n for n in notes), notes
    assert any("at cfg 1 the negative prompt is unused" in n for n in notes), notes
    assert any("has the guidance baked in" in n for n in notes), notes


def test_a_cfg_mode_lora_re_noises_deterministically_as_stock_euler(sampling_nodes, model, cond):
    """Guidance mode "cfg": the re-noise reuses the noise x implies (flash_core.sampling.renoise_rule), which in
    ComfyUI's sigma space is the stock "euler" step: the same samples as euler + "simple" at the same cfg, in
    FlashSampler and in the SAMPLER SamplerCustom runs, and no re-noise draws (the seed of the noise sampler
    changes nothing). Without the mode (a baked LoRA) the seed keeps changing the re-noise."""
    guided = model.clone()
    guided.model_options["flash"] = {"lora_name": "cfg.safetensors", "steps": 4, "cfg": 4.5, "timesteps": [],
                                     "guidance_mode": "cfg", "guidance_range": [1.0, 8.0]}
    negative = [[torch.zeros_like(cond[0][0]), {}]]
    latent = torch.zeros(2, 4, 8, 8)
    ours = sampling_nodes.FlashSampler.execute(guided, cond, negative, {"samples": latent}, SEED, 4, 4.5,
                                               1.0).result[0]["samples"]
    noise = comfy.sample.prepare_noise(latent, SEED)
    euler = comfy.sample.sample(guided, noise, 4, 4.5, "euler", "simple", cond, negative, latent, seed=SEED)
    torch.testing.assert_close(ours, euler, rtol=1e-4, atol=5e-4)  # float32 at cfg 4.5: two formulas of one step
    lcm = comfy.sample.sample(guided, noise, 4, 4.5, "lcm", "simple", cond, negative, latent, seed=SEED)
    assert not torch.allclose(ours, lcm, atol=1e-2)  # the fresh-noise sampler is another one

    sampler = sampling_nodes.FlashSamplerSelect.execute().result[0]
    sigmas = sampling_nodes.FlashScheduler.execute(guided, 4, 1.0).result[0]

    def custom(m, seed):
        return comfy.sample.sample_custom(m, noise, 4.5, sampler, sigmas, cond, negative, latent, seed=seed)

    assert torch.equal(custom(guided, SEED), ours)
    assert torch.equal(custom(guided, SEED + 1), ours)  # no fresh noise drawn
    assert not torch.equal(custom(model, SEED), custom(model, SEED + 1))  # baked: fresh noise from the seed


def test_wrong_latent_channels_raise(sampling_nodes, model, cond):
    sd3_latent = {"samples": torch.ones(1, 16, 8, 8)}
    expected = "the latent has 16 channels but this model \\(SD15\\) expects 4: use the VAE / Empty Latent Image"
    with pytest.raises(ValueError, match="FlashSampler: " + expected):
        _flash(sampling_nodes, model, cond, sd3_latent)
    # the SAMPLER path (SamplerCustom) says the same
    sampler = sampling_nodes.FlashSamplerSelect.execute().result[0]
    sigmas = sampling_nodes.FlashScheduler.execute(model, 4, 1.0).result[0]
    with pytest.raises(ValueError, match=expected):
        comfy.sample.sample_custom(
            model, torch.randn(1, 16, 8, 8), 1.0, sampler, sigmas, cond, cond, sd3_latent["samples"], seed=SEED
        )


def test_node_schemas(sampling_nodes):
    assert [node.define_schema().node_id for node in sampling_nodes.NODES] == [
        "FlashSampler", "FlashSamplerSelect", "FlashScheduler",
    ]
    schema = sampling_nodes.FlashSampler.define_schema()
    schema.validate()
    assert [i.id for i in schema.inputs] == [
        "model", "positive", "negative", "latent_image", "seed", "steps", "cfg", "denoise",
    ]
    steps = next(i for i in schema.inputs if i.id == "steps")
    assert (steps.default, steps.min, steps.max) == (0, 0, 8)  # 0: the Flash LoRA's recommendation, else 4
    cfg = next(i for i in schema.inputs if i.id == "cfg")
    assert cfg.default == 0.0  # 0: the Flash LoRA's recommended cfg, else 1.0
    assert all(node.define_schema().category == "Flash Diffusion" for node in sampling_nodes.NODES)
