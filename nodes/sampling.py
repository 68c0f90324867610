"""ComfyUI nodes of the Flash few-step sampler: FlashSampler, FlashSamplerSelect, FlashScheduler.

The sampler is a `comfy.samplers.KSAMPLER` over `flash_core.sampling.few_step_loop`, so ComfyUI's own
machinery does noise masks (inpainting), denoise < 1, batches, the progress bar, latent previews and
Cancel, and the model is only ever called through the wrapper ComfyUI hands to the sampler function
(CFG, ControlNet, attention patches, hooks and model_options live there). The grids come from
flash_core.schedules; nothing here computes a timestep.
"""

from __future__ import annotations

import logging
import math
import weakref

import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy.k_diffusion.sampling import default_noise_sampler
from comfy_api.latest import io
from tqdm.auto import tqdm

from flash_core import parameterization
from flash_core import sampling as flash_sampling
from flash_core.schedules import (
    MAX_SAMPLING_STEPS,
    NUM_TRAIN_TIMESTEPS,
    check_sampling_steps,
    denoise_flow_sigmas,
    denoise_grid_length,
    denoise_timesteps,
)

from .loaders import flash_sampling_in, flash_sampling_of
from .stack import stack_mismatch, warn_mismatch

CATEGORY = "Flash Diffusion"
LOG = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Model family and input checks
# --------------------------------------------------------------------------------------------------


def is_discrete_vp(model_sampling) -> bool:
    """SD1.5 / SDXL / PixArt-style discrete DDPM models (eps or v): the trailing grid + LCM boundary condition."""
    ms = comfy.model_sampling
    return (
        isinstance(model_sampling, ms.ModelSamplingDiscrete)
        and isinstance(model_sampling, ms.EPS)
        and not isinstance(model_sampling, (ms.EDM, ms.ModelSamplingDiscreteEDM, ms.StableCascadeSampling))
    )


def is_discrete_flow(model_sampling) -> bool:
    """SD3-style rectified-flow models (ModelSamplingDiscreteFlow + CONST): the shifted flow grid."""
    ms = comfy.model_sampling
    return isinstance(model_sampling, ms.ModelSamplingDiscreteFlow) and isinstance(model_sampling, ms.CONST)


def check_steps_and_denoise(node: str, steps: int, denoise: float) -> None:
    """Raise a ValueError naming the node when steps is outside 1..8 or denoise outside (0, 1]."""
    try:
        check_sampling_steps(steps)
    except ValueError as err:
        raise ValueError(f"{node}: {err} Set steps between 1 and {MAX_SAMPLING_STEPS} (4 is the default).") from err
    if not 0.0 < denoise <= 1.0:
        raise ValueError(
            f"{node}: denoise must be in (0, 1], got {denoise}. Use 1.0 for text-to-image and a lower value "
            "(e.g. 0.5) for img2img / hi-res fix / inpainting."
        )
    if denoise_grid_length(steps, denoise) > NUM_TRAIN_TIMESTEPS:  # the grid would need more timesteps than exist
        smallest = steps / NUM_TRAIN_TIMESTEPS
        raise ValueError(
            f"{node}: denoise {denoise:g} is too small for {steps} steps: {steps} steps that change the image this "
            f"little would need {denoise_grid_length(steps, denoise)} timesteps, and the model has "
            f"{NUM_TRAIN_TIMESTEPS}. Use denoise {smallest:g} or more, or fewer steps (1 step: denoise "
            f"{1 / NUM_TRAIN_TIMESTEPS:g} or more)."
        )


def model_name(model_config) -> str:
    return type(model_config).__name__


def check_latent_channels(node: str, latent_channels: int, channels: int, name: str) -> None:
    """Raise a ValueError when the latent does not have the channel count of the model's latent format."""
    if channels != latent_channels:
        raise ValueError(
            f"{node}: the latent has {channels} channels but this model ({name}) expects {latent_channels}: "
            "use the VAE / Empty Latent Image that matches the model."
        )


# --------------------------------------------------------------------------------------------------
# Dynamic VRAM: few-step sampling on resident, pre-patched weights
# --------------------------------------------------------------------------------------------------

_DELEGATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # dynamic MODEL -> its non-dynamic delegate
_PLAIN_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # dynamic BaseModel -> plain reload of it


def resident_model(model):
    """The MODEL few-step sampling runs on: under dynamic VRAM, a non-dynamic delegate of it.

    ComfyUI 0.18+ on NVIDIA gives MODELs a dynamic patcher (ModelPatcherDynamic) that re-stages the model and
    applies LoRA patches at cast time on every sampling run, a fixed cost per run that a 25-step sampler hides
    and a 4-step one does not (bench/dynamic_vram.py). `clone(disable_dynamic=True)` is ComfyUI's own
    non-dynamic twin of a dynamic MODEL (what its samplers use for hooks): the same patches on a plain reload
    of the checkpoint, loaded by the estimate-based model management (full load when it fits, partial
    --lowvram-style offload when it does not), so the patched weights stay resident between runs.
    One delegate per MODEL object (ComfyUI's node cache keeps it across runs), and one plain reload per
    checkpoint shared by the delegates of all its MODELs (other LoRAs or strengths patch it as ComfyUI patches
    clones). Plain patchers (CPU, --disable-dynamic-vram, ComfyUI < 0.18) and dynamic MODELs that cannot be
    reloaded (a loader without cached_patcher_init) are sampled as they are.
    """
    if not (hasattr(model, "is_dynamic") and model.is_dynamic()) or not hasattr(model, "get_non_dynamic_delegate"):
        return model
    delegate = _DELEGATES.get(model)
    if delegate is None:
        try:
            delegate = model.clone(disable_dynamic=True, model_override=_PLAIN_MODELS.get(model.model))
        except RuntimeError:  # "cached_patcher_init is not initialized": sample dynamically
            return model
        _PLAIN_MODELS.setdefault(model.model, delegate.get_clone_model_override())
        _DELEGATES[model] = delegate
    return delegate


# --------------------------------------------------------------------------------------------------
# SIGMAS: the Flash training grid in ComfyUI's sigma space
# --------------------------------------------------------------------------------------------------


def flash_sigmas(model, steps: int, denoise: float = 1.0, node: str = "FlashScheduler",
                 trained_timesteps: list[int] | None = None) -> torch.Tensor:
    """The few-step grid of a ComfyUI MODEL as SIGMAS (steps + 1 values, ending in 0).

    Discrete models: model_sampling.sigma of schedules.denoise_timesteps (999/749/499/249 for 4 steps), or of
    `trained_timesteps` (the grid a Flash LoRA's metadata records) when it has `steps` entries and denoise is 1.
    Flow models: flash_core's shifted flow sigmas with the model's own shift, truncated for denoise alike.
    """
    check_steps_and_denoise(node, steps, denoise)
    model_sampling = model.get_model_object("model_sampling")
    if is_discrete_vp(model_sampling):
        recorded = trained_timesteps is not None and len(trained_timesteps) == steps and denoise == 1.0
        grid = list(trained_timesteps) if recorded else denoise_timesteps(steps, denoise)
        timesteps = torch.tensor(grid, dtype=torch.float32)
        sigmas = model_sampling.sigma(timesteps).float().cpu()
    elif is_discrete_flow(model_sampling):
        grid = denoise_flow_sigmas(steps, denoise, shift=float(model_sampling.shift))
        sigmas = torch.tensor(grid, dtype=torch.float32)
    else:
        raise ValueError(
            f"{node}: Flash sampling supports discrete diffusion models (SD1.5, SDXL, PixArt) and flow-matching "
            f"models with a shift (SD3); this model ({model_name(model.model.model_config)}) uses "
            f"{'+'.join(base.__name__ for base in type(model_sampling).__bases__)}. "
            "Use a supported model or a stock sampler."
        )
    return torch.cat([sigmas, sigmas.new_zeros(1)])  # final 0: the last step returns x0


# --------------------------------------------------------------------------------------------------
# SAMPLER: the KSAMPLER function, a thin shell over flash_core.sampling.few_step_loop
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_flash(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """KSAMPLER function in ComfyUI's sigma space: model(x, sigma) returns x0, noise_scaling re-noises.

    `model` is ComfyUI's wrapper (inpainting mask, CFG, ControlNet, patches); it is the only model call.
    Re-noise noise comes from ComfyUI's seeded default noise sampler, as for the stock "lcm" sampler; for a Flash
    LoRA of guidance mode "cfg" (the settings the MODEL carries, in model_options) the re-noise is deterministic
    (flash_core.sampling.renoise_rule: the noise x implies, DDIM eta 0 / the stock "euler" step).
    """
    extra_args = {} if extra_args is None else extra_args
    base_model = model.inner_model.inner_model
    model_sampling = base_model.model_sampling
    latent_format = base_model.latent_format
    boundary_condition = is_discrete_vp(model_sampling)
    if (boundary_condition or is_discrete_flow(model_sampling)) and not getattr(x, "is_nested", False):
        # the families Flash supports have one latent layout; say so before the model fails on a shape
        name = model_name(base_model.model_config)
        check_latent_channels("Flash sampler", latent_format.latent_channels, x.shape[1], name)
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed", None))
    s_in = x.new_ones([x.shape[0]])
    levels = [sigmas[i] for i in range(len(sigmas) - 1)]
    end_level = sigmas[-1] if len(sigmas) > 1 and float(sigmas[-1]) > 0 else None

    def denoise_fn(x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x0 = model(x_sigma, sigma * s_in, **extra_args)  # ComfyUI's wrapper returns the denoised x0
        if not boundary_condition:
            return x0
        z_t = parameterization.vp_sample_from_ve(x_sigma, sigma)  # the student's VP input z_t
        x0_student = flash_sampling.lcm_boundary_x0(x0, z_t, model_sampling.timestep(sigma))
        mask = extra_args.get("denoise_mask", None)
        if mask is None:
            return x0_student
        return x0_student * mask + x0 * (1.0 - mask)  # outside the mask keep the wrapper's original latent

    def renoise_fn(x0: torch.Tensor, noise: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return model_sampling.noise_scaling(sigma_next, noise, x0)  # VP: x0 + s eps; flow: s eps + (1-s) x0

    def noise_fn(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return noise_sampler(sigma, sigma_next)

    def implied_noise_fn(x_sigma: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        # x = a x0 + b eps in ComfyUI's space (VP models: a = 1, b = sigma; flow: 1 - sigma, sigma), both read off
        # noise_scaling, the model's own re-noise, so the deterministic step is exactly its inverse
        alpha_x0 = model_sampling.noise_scaling(sigma, torch.zeros_like(x0), x0)
        scale = model_sampling.noise_scaling(sigma, torch.ones_like(x0), torch.zeros_like(x0))
        return parameterization.implied_noise(x_sigma, alpha_x0, 1.0, scale)

    settings = flash_sampling_in(extra_args.get("model_options"))
    deterministic = flash_sampling.renoise_rule((settings or {}).get("guidance_mode")) == "deterministic"

    progress = tqdm(total=len(levels), disable=disable)

    def step_callback(i: int, x_i: torch.Tensor, x0: torch.Tensor) -> None:
        progress.update(1)
        if callback is not None:
            callback({"x": x_i, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": x0})

    try:
        return flash_sampling.few_step_loop(x, levels, denoise_fn, renoise_fn, noise_fn, step_callback, end_level,
                                            implied_noise_fn=implied_noise_fn if deterministic else None)
    finally:
        progress.close()


def flash_ksampler() -> comfy.samplers.KSAMPLER:
    """The SAMPLER object (for SamplerCustom / SamplerCustomAdvanced and FlashSampler)."""
    return comfy.samplers.KSAMPLER(sample_flash)


# --------------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------------


def _steps_input() -> io.Int.Input:
    return io.Int.Input(
        "steps", default=4, min=1, max=MAX_SAMPLING_STEPS,
        tooltip="Few-step sampling steps (Flash students are trained for 4; 1 and 2 also work).",
    )


def _denoise_input() -> io.Float.Input:
    return io.Float.Input(
        "denoise", default=1.0, min=0.0, max=1.0, step=0.01,
        tooltip="1.0 for text-to-image; lower for img2img / hi-res fix / inpainting (must be above 0).",
    )


AUTO = 0  # FlashSampler steps / cfg: take the value from the Flash LoRA's metadata
DEFAULT_STEPS = 4  # steps of a Flash LoRA without metadata (the official releases are distilled for 4)
DEFAULT_CFG = 1.0


def sampling_defaults(model, steps: int, cfg: float, prompt=None, node_id=None) -> tuple[int, float, list[int] | None]:
    """(steps, cfg, trained grid or None) for FlashSampler: AUTO values come from the Flash LoRA settings the
    MODEL carries (FlashLoRALoader / FlashDistillTrain put them in model_options), else DEFAULT_STEPS / 1.0.
    When the stack under the sampler is not the one the LoRA was distilled for, a warning (never an error)
    names both in the log and in the UI."""
    if not math.isfinite(float(cfg)):  # /prompt's min/max checks let NaN through
        raise ValueError(f"FlashSampler: cfg is {cfg}; give a number (0 = the Flash LoRA's, 1.0 for one model call "
                         "per step).")
    settings = flash_sampling_of(model)
    if settings is not None:
        mismatch = stack_mismatch(settings, prompt, node_id)
        if mismatch is not None:
            warn_mismatch(mismatch, node_id, "FlashSampler", LOG)
    if steps == AUTO and settings is not None and settings.get("steps") not in (None, 0):
        recommended = settings.get("steps")
        if isinstance(recommended, bool) or not isinstance(recommended, int) or not 1 <= recommended <= MAX_SAMPLING_STEPS:
            raise ValueError(
                f"FlashSampler: steps is 0 (use the Flash LoRA's), and the Flash LoRA '{settings.get('lora_name')}' "
                f"recommends {recommended!r} steps, which is not 1-{MAX_SAMPLING_STEPS}: its settings are broken. Set "
                f"steps to 1-{MAX_SAMPLING_STEPS} on FlashSampler ({DEFAULT_STEPS} is what Flash students are trained "
                "for), or re-export the LoRA."
            )
    steps = int(steps) if steps != AUTO else int((settings or {}).get("steps") or DEFAULT_STEPS)
    cfg = float(cfg) if cfg != AUTO else float((settings or {}).get("cfg") or DEFAULT_CFG)
    if settings is not None:
        LOG.info("FlashSampler: %d steps, cfg %g (Flash LoRA '%s' recommends %s steps, cfg %s).", steps, cfg,
                 settings.get("lora_name"), settings.get("steps"), settings.get("cfg"))
        guidance_note = guidance_mismatch(settings, cfg)
        if guidance_note is not None:
            LOG.warning("FlashSampler: %s", guidance_note)
    return steps, cfg, (settings or {}).get("timesteps") or None


def guidance_mismatch(settings: dict, cfg: float) -> str | None:
    """A note when cfg is not what the Flash LoRA's guidance mode was trained for (advice, never an error)."""
    name, low_high = settings.get("lora_name"), settings.get("guidance_range") or None
    if settings.get("guidance_mode") == "cfg":
        if cfg == 1.0:
            return (f"the Flash LoRA '{name}' was distilled for CFG (guidance mode 'cfg'); at cfg 1 the negative "
                    f"prompt is unused and the images are unguided. Set cfg to 0 (its recommended {settings.get('cfg')}).")
        if low_high and not low_high[0] <= cfg <= low_high[1]:
            return (f"cfg {cfg:g} is outside the range {low_high[0]:g}-{low_high[1]:g} the Flash LoRA '{name}' was "
                    "distilled over: its images may drift from the teacher's at that guidance.")
    elif cfg > 1.0:
        return (f"the Flash LoRA '{name}' has the guidance baked in (one model call per step at cfg 1); cfg {cfg:g} "
                "applies guidance twice (and the negative prompt) on top of it. Train with guidance mode 'cfg' for a "
                "student that takes the cfg dial and a negative prompt.")
    return None


class FlashSampler(io.ComfyNode):
    """All-in-one Flash sampler: like SamplerCustom with FlashSamplerSelect + FlashScheduler."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashSampler",
            display_name="Flash Sampler",
            category=CATEGORY,
            description="Few-step (1-8) sampling of a Flash Diffusion student on its training grid "
            "(999/749/499/249 for 4 steps): predict x0, re-noise, repeat. Re-noise with fresh noise (LCM-style), or "
            "for a Flash LoRA of guidance mode 'cfg' with the noise the sample carries (as stock euler).",
            inputs=[
                io.Model.Input("model", tooltip="A model with a Flash LoRA applied (Flash LoRA Loader)."),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative", tooltip="Used when cfg is not 1: a Flash LoRA distilled with "
                                      "guidance mode 'cfg' is trained for it; baked-guidance LoRAs are not."),
                io.Latent.Input("latent_image"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input(
                    "steps", default=AUTO, min=AUTO, max=MAX_SAMPLING_STEPS,
                    tooltip="Few-step sampling steps (1-8); 0 = what the Flash LoRA's metadata recommends (the "
                    f"steps its student was distilled for), {DEFAULT_STEPS} for LoRAs without it (official releases).",
                ),
                io.Float.Input(
                    "cfg", default=AUTO, min=0.0, max=100.0, step=0.1, round=0.01,
                    tooltip="0 = the Flash LoRA's recommended cfg (1.0 for guidance baked in: one model call per step; "
                    "the middle of the trained range for guidance mode 'cfg', where cfg and the negative prompt act as "
                    "on the teacher at two calls per step); any other value is used as it is.",
                ),
                _denoise_input(),
            ],
            outputs=[io.Latent.Output()],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, denoise) -> io.NodeOutput:
        hidden = getattr(cls, "hidden", None)
        steps, cfg, trained_timesteps = sampling_defaults(model, steps, cfg, getattr(hidden, "prompt", None),
                                                          getattr(hidden, "unique_id", None))
        sigmas = flash_sigmas(model, steps, denoise, node="FlashSampler", trained_timesteps=trained_timesteps)
        model = resident_model(model)  # after reading its settings (the delegate carries the same)
        latent = latent_image.copy()
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        if not samples.is_nested:
            latent_channels = model.get_model_object("latent_format").latent_channels
            name = model_name(model.model.model_config)
            check_latent_channels("FlashSampler", latent_channels, samples.shape[1], name)
        latent["samples"] = samples

        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index", None))
        noise_mask = latent.get("noise_mask", None)
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
        disable_pbar = not comfy.utils.PROGRESS_BAR_ENABLED
        out_samples = comfy.sample.sample_custom(
            model, noise, cfg, flash_ksampler(), sigmas, positive, negative, samples,
            noise_mask=noise_mask, callback=callback, disable_pbar=disable_pbar, seed=seed,
        )
        out = latent.copy()
        out["samples"] = out_samples
        return io.NodeOutput(out)


class FlashSamplerSelect(io.ComfyNode):
    """The Flash sampler as a SAMPLER for SamplerCustom / SamplerCustomAdvanced."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashSamplerSelect",
            display_name="Flash Sampler Select",
            category=CATEGORY,
            description="The Flash few-step sampler (LCM-style with the LCM boundary condition; deterministic "
            "re-noise for a Flash LoRA of guidance mode 'cfg') as a SAMPLER; pair it with Flash Scheduler.",
            inputs=[],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(flash_ksampler())


class FlashScheduler(io.ComfyNode):
    """The Flash training grid of a model as SIGMAS."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashScheduler",
            display_name="Flash Scheduler",
            category=CATEGORY,
            description="SIGMAS of the grid Flash students are trained on: trailing timesteps "
            "(999/749/499/249 for 4 steps) for SD1.5/SDXL/PixArt, shifted flow sigmas for SD3.",
            inputs=[io.Model.Input("model"), _steps_input(), _denoise_input()],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, steps, denoise) -> io.NodeOutput:
        return io.NodeOutput(flash_sigmas(model, steps, denoise, node="FlashScheduler"))


NODES = [FlashSampler, FlashSamplerSelect, FlashScheduler]
