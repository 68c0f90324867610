"""Flash inside existing ComfyUI graphs, in-process: what inpainting, img2img / hi-res, ControlNet, IP-Adapter
and LoRA stacks rely on, checked on a tiny SD1.5-family model built with ComfyUI's own classes.

  (a) noise masks: the latent outside the mask comes back unchanged, inside it is re-generated;
  (b) denoise d: the first timestep the model sees is the stock KSampler's (scheduler "simple"), and the
      whole grid is schedules.denoise_timesteps;
  (c) ControlNet: the control model runs exactly at the Flash steps its start/end percent covers, and
      the hint reaches the output;
  (d) attention replace patches installed the way IP-Adapter installs them run at every step and reach
      the output;
  (e) LoRA stacks: Flash LoRA (Flash LoRA Loader) + a kohya style LoRA (stock LoraLoader) in either order
      patch the same weights, W + delta_flash + delta_style.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from flash_core.schedules import denoise_timesteps, trailing_timesteps
from training.fixtures import tiny_checkpoint, tiny_controlnet
from training.fixtures.comfy_env import import_comfy_nodes, load_pack

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_fixtures as F

LATENT = 8  # 8x8 latents (64x64 pixels)
STEPS = 4


# ---------------------------------------------------------------------------------------------------------
# Fixtures: ComfyUI in-process, the pack, a tiny SD1.5-family MODEL, conditioning
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comfy_nodes():
    """ComfyUI's own nodes.py (KSampler, LoraLoader, SetLatentNoiseMask, ControlNetApplyAdvanced ...).

    Loaded from its file and registered as `nodes`, as ComfyUI's main.py has it: under pytest the repository
    root is on sys.path, where a plain `import nodes` finds this pack's nodes/ package instead.
    """
    return import_comfy_nodes()


@pytest.fixture(scope="module")
def sampling():
    return load_pack().nodes.sampling


@pytest.fixture(scope="module")
def model(comfy_nodes):
    """The tiny checkpoint's UNet (TINY_UNET_CONFIG, SD1.5 detection shape) with seeded weights, as a MODEL."""
    import comfy.supported_models

    base = comfy.supported_models.SD15(dict(tiny_checkpoint.TINY_UNET_CONFIG)).get_model({}, device=torch.device("cpu"))
    tiny_checkpoint._randomise(base.diffusion_model, torch.Generator().manual_seed(0))
    return F.model_patcher(base)


def _conditioning(seed: int) -> list:
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed))
    return [[context, {}]]


@pytest.fixture(scope="module")
def positive():
    return _conditioning(1)


@pytest.fixture(scope="module")
def negative():
    return _conditioning(2)


def _latent(seed: int = 3) -> dict:
    return {"samples": torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))}


def _flash(sampling, model, positive, negative, latent, seed=0, steps=STEPS, cfg=1.0, denoise=1.0) -> torch.Tensor:
    out = sampling.FlashSampler.execute(model=model, positive=positive, negative=negative, latent_image=latent,
                                        seed=seed, steps=steps, cfg=cfg, denoise=denoise)
    return out.result[0]["samples"]


def _recording(model):
    """A clone whose model calls are recorded: the DDPM timestep of every call, through model_function_wrapper."""
    clone = model.clone()
    seen: list[float] = []
    model_sampling = clone.get_model_object("model_sampling")

    def wrapper(apply_model, args):
        seen.append(float(model_sampling.timestep(args["timestep"])[0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(wrapper)
    return clone, seen


# ---------------------------------------------------------------------------------------------------------
# (a) noise masks
# ---------------------------------------------------------------------------------------------------------


def _pixel_mask() -> torch.Tensor:
    """A MASK (1, 64, 64): 1 = repaint. The square covers latent cells 2..5 in both directions."""
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    return mask


def _latent_mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask the sampler applies at latent resolution (ComfyUI's comfy.utils.reshape_mask)."""
    import comfy.utils

    return comfy.utils.reshape_mask(mask.reshape(-1, 1, 64, 64), (1, 4, LATENT, LATENT))


@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_noise_mask_keeps_the_latent_outside_and_repaints_inside(sampling, comfy_nodes, model, positive, negative,
                                                                  denoise):
    source = _latent()
    (masked,) = comfy_nodes.SetLatentNoiseMask().set_mask(source, _pixel_mask())
    result = _flash(sampling, model, positive, negative, masked, denoise=denoise)

    latent_mask = _latent_mask(_pixel_mask())
    outside, inside = latent_mask == 0, latent_mask == 1
    assert outside.sum() > 0 and inside.sum() > 0
    # Unchanged up to the float32 round trip of ComfyUI's latent scaling (x * 0.18215 / 0.18215).
    torch.testing.assert_close(result[outside], source["samples"][outside], rtol=1e-6, atol=1e-6)
    assert (result[inside] - source["samples"][inside]).abs().mean() > 0.1


def test_noise_mask_matches_stock_ksampler_outside(comfy_nodes, sampling, model, positive, negative):
    """Stock KSampler and Flash Sampler leave exactly the same latent outside the mask (the source)."""
    (masked,) = comfy_nodes.SetLatentNoiseMask().set_mask(_latent(), _pixel_mask())
    flash = _flash(sampling, model, positive, negative, masked)
    (stock,) = comfy_nodes.KSampler().sample(model, 0, STEPS, 1.0, "lcm", "simple", positive, negative, masked)
    outside = _latent_mask(_pixel_mask()) == 0
    assert torch.equal(flash[outside], stock["samples"][outside])


# ---------------------------------------------------------------------------------------------------------
# (b) denoise < 1: where sampling starts
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps,denoise", [(4, 1.0), (4, 0.5), (2, 0.5), (4, 0.6), (2, 0.3), (1, 0.5)])
def test_denoise_starts_where_stock_ksampler_starts(comfy_nodes, sampling, model, positive, negative, steps, denoise):
    flash_model, flash_seen = _recording(model)
    _flash(sampling, flash_model, positive, negative, _latent(), steps=steps, denoise=denoise)
    stock_model, stock_seen = _recording(model)
    comfy_nodes.KSampler().sample(stock_model, 0, steps, 1.0, "euler", "simple", positive, negative, _latent(),
                                  denoise=denoise)

    assert abs(flash_seen[0] - stock_seen[0]) <= 1  # trailing grid rounds, "simple" truncates
    assert flash_seen == [float(t) for t in denoise_timesteps(steps, denoise)]
    if denoise == 1.0:
        assert flash_seen == [float(t) for t in trailing_timesteps(steps)]


@pytest.mark.parametrize("steps,denoise", [(1, 0.25), (2, 0.5), (3, 0.75)])
def test_steps_four_times_denoise_stay_on_the_training_grid(sampling, model, positive, negative, steps, denoise):
    """The img2img / hi-res recipe of the README: steps = 4 x denoise samples only trained timesteps."""
    recorded, seen = _recording(model)
    _flash(sampling, recorded, positive, negative, _latent(), steps=steps, denoise=denoise)
    assert seen == [float(t) for t in trailing_timesteps(4)[-steps:]]


def test_img2img_output_stays_closer_to_the_input_at_low_denoise(sampling, model, positive, negative):
    source = _latent()
    distance = {d: (_flash(sampling, model, positive, negative, source, denoise=d) - source["samples"]).abs().mean()
                for d in (0.3, 1.0)}
    assert distance[0.3] < 0.5 * distance[1.0]


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_cfg_one_skips_the_negative_prompt_and_above_one_adds_its_pass(sampling, model, positive, negative, cfg):
    """What the README says about cfg: at 1.0 one conditional model call per step, the negative prompt
    unused; above 1.0 every step also evaluates the negative (unconditional) prompt."""
    recorded = model.clone()
    passes: list[int] = []

    def wrapper(apply_model, args):
        passes.extend(args["cond_or_uncond"])  # 0 = positive, 1 = negative (batched or in separate calls)
        return apply_model(args["input"], args["timestep"], **args["c"])

    recorded.set_model_unet_function_wrapper(wrapper)
    _flash(sampling, recorded, positive, negative, _latent(), cfg=cfg)
    assert passes.count(0) == STEPS
    assert passes.count(1) == (0 if cfg == 1.0 else STEPS)


# ---------------------------------------------------------------------------------------------------------
# (c) ControlNet
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def control_net(comfy_nodes, tmp_path_factory):
    """The tiny ControlNet fixture through the stock loader's code path (comfy.controlnet.load_controlnet)."""
    import comfy.controlnet

    loaded = comfy.controlnet.load_controlnet(str(tiny_controlnet.build()))
    assert isinstance(loaded, comfy.controlnet.ControlNet)
    return loaded


def _hint(seed: int) -> torch.Tensor:
    return torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(seed))  # an IMAGE (B, H, W, C)


def _run_with_control(comfy_nodes, sampling, model, positive, negative, control_net, hint, start, end):
    """Flash Sampler after stock ControlNetApplyAdvanced; returns (latent, DDPM timesteps the control model saw)."""
    seen: list[int] = []

    def record(module, args, kwargs):
        seen.append(round(float(kwargs["timesteps"][0])))  # get_control passes model_sampling.timestep(sigma)

    handle = control_net.control_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pos, neg = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, negative, control_net, hint, 1.0, start, end)
        result = _flash(sampling, model, pos, neg, _latent())
    finally:
        handle.remove()
    return result, seen


@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.0, 0.6), (0.2, 0.6), (0.6, 1.0)])
def test_controlnet_runs_exactly_at_the_steps_its_percent_range_covers(comfy_nodes, sampling, model, positive,
                                                                        negative, control_net, start, end):
    _, seen = _run_with_control(comfy_nodes, sampling, model, positive, negative, control_net, _hint(0), start, end)
    # ComfyUI maps percent p to timestep (1 - p) * 999; a step at timestep t is at percent 1 - t / 999.
    expected = [t for t in trailing_timesteps(STEPS) if start <= 1 - t / 999 <= end]
    assert seen == expected
    # (0.0, 0.6) is workflows/flash_controlnet.json: the first three of four steps.
    assert {(0.0, 1.0): 4, (0.0, 0.6): 3, (0.2, 0.6): 2, (0.6, 1.0): 1}[(start, end)] == len(expected)


def test_controlnet_hint_changes_the_output(comfy_nodes, sampling, model, positive, negative, control_net):
    first, _ = _run_with_control(comfy_nodes, sampling, model, positive, negative, control_net, _hint(0), 0.0, 1.0)
    other, _ = _run_with_control(comfy_nodes, sampling, model, positive, negative, control_net, _hint(1), 0.0, 1.0)
    plain = _flash(sampling, model, positive, negative, _latent())
    assert (first - other).abs().mean() > 1e-3
    assert (first - plain).abs().mean() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# (d) attention replace patches (IP-Adapter's mechanism)
# ---------------------------------------------------------------------------------------------------------


def test_attn2_replace_patches_run_at_every_step_and_reach_the_output(sampling, model, positive, negative):
    from comfy.ldm.modules.attention import optimized_attention

    calls: dict[tuple, list[float]] = {}

    def make_patch(key):
        def patch(q, k, v, extra_options):
            calls.setdefault(key, []).append(float(extra_options["sigmas"][0]))
            # IP-Adapter adds attention over image tokens; here: attention with values scaled by 2.
            return optimized_attention(q, k, 2.0 * v, extra_options["n_heads"])
        return patch

    patched = model.clone()  # as IP-Adapter does: clone, then install replace patches per attention block
    patched.set_model_attn2_replace(make_patch("input"), "input", 1, 0)
    patched.set_model_attn2_replace(make_patch("middle"), "middle", 0, 0)
    patched.set_model_attn2_replace(make_patch("output"), "output", 1)  # IP-Adapter's SD1.5 key: ("output", id)

    result = _flash(sampling, patched, positive, negative, _latent())
    plain = _flash(sampling, model, positive, negative, _latent())

    model_sampling = model.get_model_object("model_sampling")
    step_sigmas = [float(model_sampling.sigma(torch.tensor(float(t)))) for t in trailing_timesteps(STEPS)]
    assert set(calls) == {"input", "middle", "output"}
    for key, sigmas in calls.items():
        assert sigmas == pytest.approx(step_sigmas, rel=1e-5), key
    assert (result - plain).abs().mean() > 1e-3
    assert "patches_replace" not in model.model_options["transformer_options"]  # the input MODEL is untouched


# ---------------------------------------------------------------------------------------------------------
# (e) LoRA stacks
# ---------------------------------------------------------------------------------------------------------


def _style_lora(seed: int = 5) -> dict[str, torch.Tensor]:
    """A kohya-format style LoRA (lora_unet_<diffusers path>) for the tiny UNet: attention + feed-forward layers,
    overlapping the Flash LoRA's targets, with its own alpha."""
    import comfy.utils

    shapes = tiny_checkpoint.build_unet_shapes()
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for diffusers_key, ldm_key in sorted(comfy.utils.unet_to_diffusers(tiny_checkpoint.TINY_UNET_CONFIG).items()):
        module = diffusers_key.removesuffix(".weight")
        if not diffusers_key.endswith(".weight") or not module.endswith(("attn1.to_q", "attn2.to_v", "ff.net.2")):
            continue
        out_features, in_features = shapes[ldm_key].shape[:2]
        name = "lora_unet_" + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = torch.randn(8, in_features, generator=generator) * 0.05
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, 8, generator=generator) * 0.05
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    return tensors


@pytest.fixture(scope="module")
def loras_dir(comfy_nodes, tmp_path_factory):
    import folder_paths

    folder = tmp_path_factory.mktemp("loras")
    (folder / tiny_checkpoint.LORA_NAME).symlink_to(tiny_checkpoint.build_lora())
    F.write(folder / "style.safetensors", _style_lora())
    saved = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(folder)], set(folder_paths.supported_pt_extensions))
    yield folder
    folder_paths.folder_names_and_paths["loras"] = saved


def test_flash_and_style_lora_stack_in_either_order(comfy_nodes, sampling, model, loras_dir):
    loaders = load_pack().nodes.loaders
    clip = F.tiny_clip()

    def flash(m, c):
        out = loaders.FlashLoRALoader.execute(m, tiny_checkpoint.LORA_NAME, 1.0, 1.0, clip=c)
        return out.result[0], out.result[1]

    def style(m, c):
        return comfy_nodes.LoraLoader().load_lora(m, c, "style.safetensors", 0.8, 0.8)

    base = F.patched_state_dict(model)
    flash_only = F.patched_state_dict(flash(model, clip)[0])
    style_only = F.patched_state_dict(style(model, clip)[0])
    flash_then_style = F.patched_state_dict(style(*flash(model, clip))[0])
    style_then_flash = F.patched_state_dict(flash(*style(model, clip))[0])

    changed_by = {name: {k for k in base if not torch.equal(sd[k], base[k])}
                  for name, sd in (("flash", flash_only), ("style", style_only))}
    assert changed_by["flash"] and changed_by["style"]
    assert changed_by["flash"] & changed_by["style"]  # the stack overlaps on shared attention weights
    for key in base:
        expected = base[key] + (flash_only[key] - base[key]) + (style_only[key] - base[key])
        torch.testing.assert_close(flash_then_style[key], expected, rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(style_then_flash[key], flash_then_style[key], rtol=1e-5, atol=1e-6, msg=key)
