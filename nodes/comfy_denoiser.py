"""A flash_core `Denoiser` over a ComfyUI MODEL (SD1.5 / SDXL UNets), and ComfyUI CONDITIONING -> Conditioning.

The trainer (flash_core.distill) talks to every model family through `flash_core.denoiser.Denoiser`; this
module is the ComfyUI adapter of that interface:

* The network is a private copy: the BaseModel is shallow-copied with its own module table and a private
  `diffusion_model` holding plain tensors with the MODEL's own patches (e.g. a style LoRA) baked in, so peft's
  adapters are injected into the copy, the teacher MODEL in the graph is never changed (its weights, its
  ModelPatcher, its patches), and the student learns on top of exactly the model the user wired in, whatever
  ComfyUI's memory mode (`plain_patched_unet`).
* `predict` calls ComfyUI's own `BaseModel.apply_model` (input scaling, dtype casts, conditioning conversion,
  APPLY_MODEL / DIFFUSION_MODEL wrappers and transformer_options of the MODEL) with the model_sampling of the
  ModelPatcher (so a ModelSamplingDiscrete patch is honoured), and converts between flash_core's VP
  convention (x_t = sqrt(abar) x0 + sqrt(1-abar) eps, integer DDPM timestep t) and ComfyUI's VE one
  (x = x0 + sigma eps, sigma = sqrt((1-abar)/abar)) with flash_core.parameterization.
* `encoder_features` runs ComfyUI's UNetModel forward up to and including the middle block (the frozen
  encoder of the latent discriminator).

Teacher = the same copy with its LoRA adapters switched off (flash_core.denoiser.Denoiser.teacher()).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from typing import Any

import comfy.model_base
import comfy.model_management
import comfy.supported_models
import comfy.utils
import torch
import torch.utils.checkpoint
from comfy.ldm.modules.diffusionmodules.openaimodel import (
    UNetModel,
    forward_timestep_embed,
    timestep_embedding,
)
from torch import Tensor, nn

from flash_core import lora_formats, parameterization
from flash_core.backbones import BACKBONES
from flash_core.denoiser import Conditioning, Denoiser

LOG = logging.getLogger(__name__)

# ComfyUI model_config classes -> flash_core recipe backbone, from the backbone registry (subclasses count too)
SUPPORTED_CONFIGS: tuple[tuple[type, str], ...] = tuple(
    (getattr(comfy.supported_models, config), backbone.name)
    for backbone in BACKBONES.values() for config in backbone.comfy_configs
)
PREDICTION_TYPES = {
    comfy.model_base.ModelType.EPS: "epsilon",
    comfy.model_base.ModelType.V_PREDICTION: "v_prediction",
}


class UnsupportedModelError(ValueError):
    """The MODEL is not a family the Flash trainer supports inside ComfyUI."""


def backbone_of(model) -> str:
    """The recipe backbone ("sd15" / "sdxl") of a ComfyUI MODEL, or a clear UnsupportedModelError."""
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    name = type(config).__name__ if config is not None else type(model).__name__
    backbone = next((b for cls, b in SUPPORTED_CONFIGS if isinstance(config, cls)), None)
    if backbone is None:
        raise UnsupportedModelError(
            f"Flash Distill Train supports SD1.5 and SDXL UNet models; this MODEL is '{name}'. "
            "Load an SD1.5 or SDXL checkpoint (other families: use the headless trainer `flash-distill`)."
        )
    if not isinstance(base.diffusion_model, UNetModel):
        raise UnsupportedModelError(f"Flash Distill Train: the '{name}' MODEL has no ComfyUI UNetModel to train.")
    if base.model_type not in PREDICTION_TYPES:
        raise UnsupportedModelError(
            f"Flash Distill Train: '{name}' uses the {base.model_type.name} parameterisation; only epsilon and "
            "v-prediction models are supported (remove ModelSampling patches such as EDM / LCM before training)."
        )
    latent_channels = base.latent_format.latent_channels
    if base.diffusion_model.in_channels != latent_channels:
        raise UnsupportedModelError(
            f"Flash Distill Train: '{name}' takes {base.diffusion_model.in_channels} input channels "
            f"(an inpainting / instruct-pix2pix model); only plain text-to-image models ({latent_channels} "
            "channels) can be distilled."
        )
    return backbone


# --------------------------------------------------------------------------------------------------
# CONDITIONING -> flash_core Conditioning
# --------------------------------------------------------------------------------------------------


def conditioning_entries(conditionings: Sequence[Any]) -> list[tuple[Tensor, dict]]:
    """Flatten ComfyUI CONDITIONING values (lists of [tensor, dict]) to one (tokens[1,T,C], dict) per sample.

    A CONDITIONING from CLIPTextEncode is one entry; MakeTrainingDataset / LoadTrainingDataset give a list
    of them. An entry whose tensor has batch b counts as b samples.
    """
    entries: list[tuple[Tensor, dict]] = []
    for conditioning in conditionings:
        if isinstance(conditioning, (list, tuple)) and len(conditioning) == 2 and torch.is_tensor(conditioning[0]):
            conditioning = [conditioning]  # a bare [tensor, dict] entry
        for entry in conditioning:
            tokens, extras = entry[0], (entry[1] if len(entry) > 1 else {})
            if not torch.is_tensor(tokens) or tokens.ndim != 3:
                raise ValueError("Flash Distill Train: a CONDITIONING entry does not hold a [batch, tokens, channels] tensor.")
            for row in range(tokens.shape[0]):
                pooled = extras.get("pooled_output")
                row_extras = dict(extras)
                if torch.is_tensor(pooled) and pooled.shape[0] == tokens.shape[0]:
                    row_extras["pooled_output"] = pooled[row : row + 1]
                entries.append((tokens[row : row + 1], row_extras))
    return entries


def _pad_tokens(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Repeat token sequences to a common length (the lcm), as ComfyUI's CONDCrossAttn.concat does."""
    length = 1
    for t in tensors:
        length = math.lcm(length, t.shape[1])
    return [t.repeat(1, length // t.shape[1], 1) if t.shape[1] < length else t for t in tensors]


def to_conditioning(entries: Sequence[tuple[Tensor, dict]], latent_hw: tuple[int, int], backbone: str,
                    downscale: int = 8) -> Conditioning:
    """Batch ComfyUI conditioning entries into a flash_core Conditioning (CPU, float32).

    SDXL: pooled = CLIP-G pooled output, time_ids = (height, width, crop_h, crop_w, target_height,
    target_width) in pixels (diffusers' order; defaults to the latent size like ComfyUI's samplers).
    """
    tokens = torch.cat(_pad_tokens([t.float().cpu() for t, _ in entries]), dim=0)
    if backbone != "sdxl":
        return Conditioning(encoder_hidden_states=tokens)
    height, width = latent_hw[0] * downscale, latent_hw[1] * downscale
    pooled, time_ids = [], []
    for index, (t, extras) in enumerate(entries):
        p = extras.get("pooled_output")
        if p is None:
            raise ValueError(
                f"Flash Distill Train: SDXL conditioning {index} has no pooled_output; encode prompts with an SDXL "
                "CLIP (CLIPTextEncode / CLIPTextEncodeSDXL) or zero them with ConditioningZeroOut."
            )
        pooled.append(p.float().cpu().reshape(1, -1))
        h, w = extras.get("height", height), extras.get("width", width)
        time_ids.append([h, w, extras.get("crop_h", 0), extras.get("crop_w", 0),
                         extras.get("target_height", h), extras.get("target_width", w)])
    return Conditioning(
        encoder_hidden_states=tokens, pooled=torch.cat(pooled), time_ids=torch.tensor(time_ids, dtype=torch.float32)
    )


# --------------------------------------------------------------------------------------------------
# The Denoiser
# --------------------------------------------------------------------------------------------------


class UnpatchableModelError(RuntimeError):
    """ComfyUI cannot give this MODEL's weights as plain, patched tensors."""


def plain_patched_unet(model, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(BaseModel, a private diffusion_model whose tensors are the MODEL's weights with its patches applied).

    ComfyUI's memory modes differ in where a MODEL's patches (LoRAs, weight patches) live:
    * plain ModelPatcher (CPU, normal/high VRAM, --lowvram): `load_models_gpu(force_full_load=True)` applies
      them in place on the shared BaseModel, whose UNet is then deep-copied (the graph's MODEL keeps working).
    * dynamic VRAM (ComfyUI 0.18+ on NVIDIA, `model.is_dynamic()`): weights are staged and the patches are
      applied only at cast time, so the module's tensors are the unpatched checkpoint's. ComfyUI's own way to
      get plain modules is `model.clone(disable_dynamic=True)`: a fresh, non-dynamic load (the loader's
      cached_patcher_init) carrying the same patches. That load is private to us, so its patched UNet is taken
      over as it is (no second copy) and the rest of it is freed on return.
    """
    if not (hasattr(model, "is_dynamic") and model.is_dynamic()):  # ComfyUI < 0.18 has no dynamic patcher
        comfy.model_management.load_models_gpu([model], force_full_load=True)  # patches applied, on device
        return model.model, copy.deepcopy(model.model.diffusion_model)
    try:
        delegate = model.clone(disable_dynamic=True)
    except RuntimeError as error:  # a loader without cached_patcher_init
        raise UnpatchableModelError(
            f"Flash Distill Train: ComfyUI runs this MODEL with dynamic VRAM and cannot load a plain copy of it "
            f"({error}). Load the model with a core loader (Load Checkpoint, Load Diffusion Model) or Flash "
            "Diffusers Pipeline Loader, or start ComfyUI with --disable-dynamic-vram."
        ) from error
    # Our own load on the training device (outside model management, which would unpatch it on unload): the
    # patches baked into the weights.
    delegate.patch_model(device_to=device, lowvram_model_memory=0, force_patch_weights=True)
    return delegate.model, delegate.model.diffusion_model


def private_base_model(base: nn.Module, model_sampling: nn.Module, diffusion_model: nn.Module) -> nn.Module:
    """A BaseModel sharing everything with `base` except its diffusion_model (a private one) and model_sampling.

    The shallow copy gets its own module table, so replacing diffusion_model (and model_sampling by the
    ModelPatcher's possibly patched one) leaves `base` untouched.
    """
    student = copy.copy(base)
    student._modules = dict(base._modules)
    student._parameters = dict(base._parameters)
    student._buffers = dict(base._buffers)
    student._modules["diffusion_model"] = diffusion_model
    student._modules["model_sampling"] = model_sampling
    return student


def _checkpointed(module: nn.Module) -> None:
    """Wrap a module's forward in torch.utils.checkpoint (activations recomputed in backward)."""
    if hasattr(module, "_flash_forward"):
        return
    forward = module.forward

    def run(args, kwargs):
        return forward(*args, **kwargs)

    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(run, args, kwargs, use_reentrant=False)

    module._flash_forward = forward
    module.forward = checkpointed


def _unchecked(module: nn.Module) -> None:
    if hasattr(module, "_flash_forward"):
        module.forward = module._flash_forward
        del module._flash_forward


# transformer_options entries ComfyUI fills per call or per run (not the teacher's identity)
VOLATILE_OPTIONS = ("sigmas", "sample_sigmas", "cond_or_uncond", "uuids", "transformer_index",
                    "block_index", "block", "original_shape", "patches_replace_cache", "activations_shape")


class ComfyDenoiser(Denoiser):
    """flash_core Denoiser over a private copy of a ComfyUI MODEL's UNet (SD1.5 / SDXL).

    model: the ComfyUI MODEL (ModelPatcher). Its patched weights are copied (plain_patched_unet); never modified.
    device: where the copy lives and runs (default: ComfyUI's torch device).
    """

    def __init__(self, model, device: torch.device | None = None):
        self.backbone = backbone_of(model)
        self.device = torch.device(device) if device is not None else comfy.model_management.get_torch_device()
        self.model_sampling = model.get_model_object("model_sampling")
        base, diffusion_model = plain_patched_unet(model, self.device)
        self.latent_format = base.latent_format
        self.base_model = private_base_model(base, self.model_sampling, diffusion_model)
        self.diffusion_model: UNetModel = self.base_model.diffusion_model.to(self.device)
        self.diffusion_model.requires_grad_(False)
        self.lora_module = self.diffusion_model
        self.prediction_type = PREDICTION_TYPES[base.model_type]
        sigmas = self.model_sampling.sigmas.detach().double().cpu()
        self.alphas_cumprod = parameterization.alphas_cumprod_from_ve_sigmas(sigmas)  # abar_t = 1 / (1 + sigma_t^2)
        unet_config = base.model_config.unet_config
        self.encoder_feature_channels = int(unet_config["model_channels"] * unet_config["channel_mult"][-1])
        self.transformer_options = copy.copy(model.model_options.get("transformer_options", {}))
        self.dtype = self.base_model.manual_cast_dtype or self.base_model.get_dtype()
        # ComfyUI (LDM) module path -> diffusers module path: the LoRA is initialised and written under diffusers'
        # names, like flash-distill's, so both front ends start from and write the same LoRA
        self._lora_paths = lora_formats.module_path_map(comfy.utils.unet_to_diffusers(unet_config), invert=True)

    def identity(self) -> dict:
        """Denoiser.identity plus what ComfyUI puts around the network: the model_sampling object (its class
        says eps / v-prediction / zero-terminal-SNR; its sigmas are the schedule) and every transformer_options
        patch the teacher runs with (FreeU's block patches, attention patches...), described by
        flash_core.fingerprints.describe, which refuses what it cannot describe."""
        sampling = self.model_sampling
        return {**super().identity(), "model_sampling": [f"{c.__module__}.{c.__qualname__}" for c in type(sampling).__mro__],
                "transformer_options": {k: v for k, v in self.transformer_options.items() if k not in VOLATILE_OPTIONS}}

    # ---- LoRA (flash_core's Denoiser.add_lora: float32 adapters on the copy) --------------------------
    def lora_path(self, module: str) -> str:
        """The diffusers path of a ComfyUI UNet module (Denoiser.lora_path)."""
        try:
            return self._lora_paths[module]
        except KeyError:
            raise ValueError(f"the ComfyUI UNet module '{module}' has no diffusers name (comfy.utils.unet_to_diffusers "
                             "of this model's config): its LoRA could not be written in the shared layout") from None

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Checkpoint every input / middle / output block of ComfyUI's UNetModel (recompute in backward)."""
        dm = self.diffusion_model
        blocks = list(dm.input_blocks) + [dm.middle_block] + list(dm.output_blocks)
        for block in blocks:
            _checkpointed(block) if enabled else _unchecked(block)

    # ---- conditioning -> ComfyUI model inputs -----------------------------------------------------
    def _model_inputs(self, cond: Conditioning, batch: int) -> dict[str, Tensor]:
        cond = cond.expand_to(batch).to(self.device)
        inputs = {"c_crossattn": cond.encoder_hidden_states}
        if self.backbone == "sdxl":
            adm = []
            for pooled, ids in zip(cond.pooled, cond.time_ids.tolist()):
                h, w, crop_h, crop_w, target_h, target_w = ids
                adm.append(self.base_model.encode_adm(  # ComfyUI's SDXL vector: pooled + size embeddings
                    pooled_output=pooled[None], height=h, width=w, crop_h=crop_h, crop_w=crop_w,
                    target_height=target_h, target_width=target_w,
                ))
            inputs["y"] = torch.cat(adm).to(self.device)
        return inputs

    def _sigmas(self, t: Tensor, batch: int) -> Tensor:
        t = torch.as_tensor(t, device=self.device).float().reshape(-1)
        t = t.expand(batch) if t.numel() == 1 else t
        return self.model_sampling.sigma(t.to(self.model_sampling.sigmas.device)).to(self.device).float()

    # ---- Denoiser ---------------------------------------------------------------------------------
    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Raw eps / v through ComfyUI's apply_model (VP x_t, DDPM timestep t)."""
        batch = x_t.shape[0]
        sigma = self._sigmas(t, batch)
        s = sigma.reshape(-1, *([1] * (x_t.ndim - 1)))
        x_ve = parameterization.ve_sample_from_vp(x_t.float(), s)  # x = x0 + sigma eps = x_t sqrt(1 + sigma^2)
        denoised = self.base_model.apply_model(
            x_ve, sigma, transformer_options=copy.copy(self.transformer_options), **self._model_inputs(cond, batch)
        )
        if self.prediction_type == "epsilon":
            return parameterization.eps_from_ve_x0(x_ve, denoised, s)  # eps = (x - x0) / sigma
        return parameterization.v_from_ve_x0(x_ve, denoised, s)  # v = (sqrt(abar) z_t - x0) / sqrt(1 - abar)

    def encoder_features(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """ComfyUI UNetModel forward (time embedding, input blocks, middle block), stopped before the decoder."""
        dm = self.diffusion_model
        batch = x_t.shape[0]
        sigma = self._sigmas(t, batch)
        inputs = self._model_inputs(cond, batch)
        h = x_t.to(self.device, self.dtype)
        timesteps = self.model_sampling.timestep(sigma).float()  # the integer timestep apply_model would use
        context = inputs["c_crossattn"].to(self.dtype)
        options = copy.copy(self.transformer_options)
        options["original_shape"] = list(h.shape)
        options["transformer_index"] = 0
        emb = dm.time_embed(timestep_embedding(timesteps, dm.model_channels, repeat_only=False).to(h.dtype))
        if dm.num_classes is not None:
            emb = emb + dm.label_emb(inputs["y"].to(self.dtype))  # SDXL: pooled text + size embedding
        for index, block in enumerate(dm.input_blocks):
            options["block"] = ("input", index)
            h = forward_timestep_embed(block, h, emb, context, options)
        options["block"] = ("middle", 0)
        h = forward_timestep_embed(dm.middle_block, h, emb, context, options)
        return h.float()

    # ---- latents ----------------------------------------------------------------------------------
    def process_in(self, latents: Tensor) -> Tensor:
        """VAE latents -> the model's latent space (SD: x 0.18215), like ComfyUI's samplers do."""
        return self.latent_format.process_in(latents)

    def process_out(self, latents: Tensor) -> Tensor:
        """Model latents -> VAE latents (inverse of process_in)."""
        return self.latent_format.process_out(latents)
