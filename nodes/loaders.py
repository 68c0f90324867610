"""Loader nodes: FlashLoRALoader applies a Flash LoRA in any published format to MODEL (and CLIP).

A thin shell over flash_core.lora_formats: ComfyUI provides the model's key maps (which include the
diffusers -> LDM UNet mapping for SD1.x/SDXL) and applies the patches; flash_core reads the file, applies
the alpha rules and maps every key, or raises an error naming the keys that do not fit.
"""

from __future__ import annotations

import logging
import math

import comfy.lora
import folder_paths
from comfy_api.latest import io

from flash_core import lora_formats
from flash_core.lora_formats.metadata import sampling_settings

LOG = logging.getLogger(__name__)
MODEL_OPTIONS_KEY = "flash"  # model_options[MODEL_OPTIONS_KEY]: what FlashLoRALoader read from the file


def with_flash_sampling(model, settings: dict, lora_name: str):
    """`model` (a fresh clone) carrying the Flash LoRA's sampling settings in model_options[MODEL_OPTIONS_KEY]
    ({"lora_name", "steps", "cfg", "timesteps", "prediction_type", "trained_for", "guidance_mode", "guidance_range"});
    clones downstream keep it."""
    model.model_options[MODEL_OPTIONS_KEY] = {"lora_name": lora_name, **settings}
    return model


def flash_sampling_of(model) -> dict | None:
    """The Flash LoRA settings a MODEL carries (FlashLoRALoader / FlashDistillTrain), or None."""
    return flash_sampling_in(getattr(model, "model_options", None))


def flash_sampling_in(model_options: dict | None) -> dict | None:
    """The Flash LoRA settings in a MODEL's model_options (a sampler function reads them from its extra_args)."""
    settings = (model_options or {}).get(MODEL_OPTIONS_KEY)
    return settings if isinstance(settings, dict) else None


def _weight_shapes(module) -> dict[str, tuple[int, ...]]:
    """Model weight key -> shape (for refusing LoRA modules whose names match but shapes do not)."""
    return {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}


def _apply(patcher_owner, mapped: list[lora_formats.MappedModule], strength: float, what: str, lora_name: str):
    """A clone of a ModelPatcher-like object (MODEL or CLIP) with the mapped LoRA modules added as patches."""
    clone = patcher_owner.clone()
    if not mapped:
        return clone
    tensors, to_load = lora_formats.comfy_lora_inputs(mapped)
    patches = comfy.lora.load_lora(tensors, to_load, log_missing=False)
    applied = set(clone.add_patches(patches, strength))
    missing = [key for key in patches if key not in applied]
    if len(patches) != len(to_load) or missing:
        raise RuntimeError(
            f"Flash LoRA Loader: ComfyUI did not apply {len(missing) or len(to_load) - len(patches)} of "
            f"{len(to_load)} {what} patches of '{lora_name}' (e.g. {', '.join(map(str, missing[:3]))})."
        )
    return clone


class FlashLoRALoader(io.ComfyNode):
    """Apply a Flash LoRA (kohya, ComfyUI, diffusers or PEFT format) at its trained alpha/rank scale."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashLoRALoader",
            display_name="Flash LoRA Loader",
            category="Flash Diffusion",
            description=(
                "Loads a Flash Diffusion LoRA in any format it is published in (kohya / ComfyUI, diffusers "
                "pytorch_lora_weights, PEFT adapter_model + adapter_config.json) at its trained alpha/rank scale. "
                "Every key of the file is applied, or the node stops with an error naming the keys that do not fit. "
                "A LoRA trained by Flash Distill Train carries its sampling settings (steps, cfg, timestep grid) and the "
                "stack it was distilled for along the MODEL: Flash Sampler at steps 0 / cfg 0 uses them."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the LoRA is applied to."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The text encoder; needed only when the LoRA has text-encoder keys."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A .safetensors LoRA from the loras folder (pickle files are refused)."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="Multiplies the trained scale alpha/rank on the diffusion model."),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="Multiplies the trained scale alpha/rank on the text encoder."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the LoRA applied (a patched clone)."),
                io.Clip.Output(tooltip="The text encoder with the LoRA applied (a patched clone), or the input."),
            ],
        )

    @classmethod
    def execute(cls, model, lora_name: str, strength_model: float = 1.0, strength_clip: float = 1.0,
                clip=None) -> io.NodeOutput:
        for name, value in (("strength_model", strength_model), ("strength_clip", strength_clip)):
            if not math.isfinite(float(value)):  # /prompt's min/max checks let NaN through
                raise ValueError(f"Flash LoRA Loader: {name} is {value}; give a number (1.0 = the trained scale).")
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        lora = lora_formats.read_lora(path)
        for warning in lora.warnings:
            LOG.warning("Flash LoRA Loader: %s", warning)

        unet_keys = comfy.lora.model_lora_keys_unet(model.model, {})
        shapes = _weight_shapes(model.model)
        clip_keys = None
        if clip is not None:
            clip_keys = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
            shapes.update(_weight_shapes(clip.cond_stage_model))
        family = type(model.model.model_config).__name__
        plan = lora_formats.map_lora(lora, unet_keys, clip_keys, weight_shapes=shapes, model_family=family)

        new_model = _apply(model, plan.unet, strength_model, "model", lora_name)
        settings = sampling_settings(lora.metadata, source=f"Flash LoRA Loader: '{lora_name}'")
        if settings is not None:  # a Flash LoRA this pack wrote: FlashSampler's steps / cfg / grid default to it
            with_flash_sampling(new_model, settings.as_dict(), lora_name)
        new_clip = None
        if clip is not None:
            new_clip = _apply(clip, plan.text_encoder, strength_clip, "text-encoder", lora_name)
        LOG.info("Flash LoRA Loader: '%s' (%s) applied to %d model and %d text-encoder weights.",
                 lora_name, "+".join(lora.formats), len(plan.unet), len(plan.text_encoder))
        return io.NodeOutput(new_model, new_clip)


NODES = [FlashLoRALoader]
