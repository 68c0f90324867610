"""FlashDistillTrain: distil a ComfyUI MODEL into a few-step Flash student (a LoRA) inside ComfyUI.

A thin shell over the one implementation of the algorithm, `flash_core.distill.FlashDistiller`, driven
through `nodes.comfy_denoiser.ComfyDenoiser` (the teacher MODEL is copied, never changed). The node adds
what only ComfyUI has: its data types (LATENT / CONDITIONING lists from VAEEncode, MakeTrainingDataset,
LoadTrainingDataset), its progress bar with previews and Cancel, its model folders.

Files (all written atomically: temporary file in the same folder, then os.replace):
  * the LoRA:        <first loras folder>/flash/<lora_name>.safetensors, kohya keys (``lora_unet_...``) with
                     alpha tensors, loaded as is by FlashLoRALoader and by the stock LoraLoader; metadata
                     records base model, rank, alpha, steps, NFE, grid, recipe and losses.
  * the checkpoint:  <first loras folder>/flash/.checkpoints/<lora_name>/state.flashckpt, everything for an
                     exact resume (LoRA, discriminator, optimisers, RNG states, loss history). Written every
                     CHECKPOINT_EVERY steps, on Cancel and when training fails; kept after success so a later
                     run with more steps continues. Its extension is not a model extension, so LoRA lists never
                     show it. Loaded with torch.load(weights_only=True) only. Delete the folder to start over
                     (or set resume off).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import comfy.lora
import comfy.model_management
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io, ui
from PIL import Image, ImageDraw, ImageFont

from flash_core import lora_formats
from flash_core.denoiser import Conditioning
from flash_core.distill import Batch, DistillConfig, FlashDistiller, teacher_target
from flash_core.files import torch_save_atomic
from flash_core.recipes import get_recipe
from flash_core.schedules import trailing_timesteps

from .comfy_denoiser import (
    ComfyDenoiser,
    backbone_of,
    conditioning_entries,
    to_conditioning,
)

LOG = logging.getLogger(__name__)

CATEGORY = "Flash Diffusion"
NODE = "Flash Distill Train"
OUTPUT_SUBFOLDER = "flash"
CHECKPOINT_SUBFOLDER = ".checkpoints"
CHECKPOINT_FILE = "state.flashckpt"
CHECKPOINT_VERSION = 1
CHECKPOINT_EVERY = 250  # optimiser steps between periodic checkpoints
PREVIEW_STEPS = (1, 2, 4)  # student rows of the preview grid
PREVIEW_COLUMNS = 4  # prompts / seeds shown side by side
MAX_NFE = 4
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9 _.+=-]{0,119}$")
BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}


class TrainingInputError(ValueError):
    """A user-fixable problem with the node's inputs or its output folder."""


# --------------------------------------------------------------------------------------------------
# Names and folders
# --------------------------------------------------------------------------------------------------


def check_lora_name(name: str) -> str:
    """The bare file name (no folder, no extension) for `lora_name`, or a TrainingInputError."""
    name = (name or "").strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name:
        raise TrainingInputError(f"{NODE}: lora_name is empty; give the LoRA a name such as 'my_flash_sd15'.")
    separators = [s for s in ("/", "\\", os.sep, os.altsep) if s]
    if any(s in name for s in separators) or ".." in name:
        raise TrainingInputError(
            f"{NODE}: lora_name '{name}' contains a path separator or '..'; use a plain file name "
            f"(the LoRA is always written to models/loras/{OUTPUT_SUBFOLDER}/)."
        )
    if not NAME_PATTERN.match(name):
        raise TrainingInputError(
            f"{NODE}: lora_name '{name}' is not a valid file name; use letters, digits, spaces and _ . + = - "
            "(at most 120 characters, not starting with '.' or '-')."
        )
    return name


def output_locations(name: str) -> tuple[str, str]:
    """(LoRA file path, checkpoint folder) for a checked name, under the first `loras` model folder."""
    root = os.path.join(folder_paths.get_folder_paths("loras")[0], OUTPUT_SUBFOLDER)
    return os.path.join(root, f"{name}.safetensors"), os.path.join(root, CHECKPOINT_SUBFOLDER, name)


def ensure_writable(folder: str) -> None:
    """Create `folder` and prove a file can be written there (works for root too), or raise clearly."""
    try:
        os.makedirs(folder, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".tmp-probe-")
        try:
            os.write(handle, b"flash")
        finally:
            os.close(handle)
            os.remove(probe)
    except OSError as err:
        raise TrainingInputError(
            f"{NODE}: cannot write to '{folder}' ({err.strerror or err}). Check that the folder is writable "
            "and the disk has free space, then queue again."
        ) from err


def save_checkpoint(folder: str, state: dict) -> str:
    path = os.path.join(folder, CHECKPOINT_FILE)
    torch_save_atomic(state, path)
    return path


def load_checkpoint(folder: str) -> dict | None:
    """The resume state in `folder`, or None. weights_only: never unpickles arbitrary objects."""
    path = os.path.join(folder, CHECKPOINT_FILE)
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TrainingInputError(
            f"{NODE}: the resume checkpoint '{path}' cannot be read ({err}). Delete it or set resume off."
        ) from err
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise TrainingInputError(f"{NODE}: '{path}' is not a checkpoint of this node version; delete it or set resume off.")
    return state


# --------------------------------------------------------------------------------------------------
# Inputs: latents, conditioning, weights
# --------------------------------------------------------------------------------------------------


def gather_latents(latents: Sequence[Any]) -> torch.Tensor:
    """All training latents as one [N, C, h, w] tensor (VAE space) from LATENT values (batches or lists)."""
    samples = []
    for value in latents or []:
        tensor = value.get("samples") if isinstance(value, dict) else None
        if tensor is None:
            raise TrainingInputError(f"{NODE}: 'latents' must be LATENT values (from VAE Encode, Make Training Dataset ...).")
        if getattr(tensor, "is_nested", False):
            raise TrainingInputError(f"{NODE}: nested (multi-resolution) latents are not supported; resize the images to one size.")
        samples.extend(tensor[i : i + 1] for i in range(tensor.shape[0]))
    if not samples:
        raise TrainingInputError(f"{NODE}: no training latents: connect at least one image encoded with VAE Encode.")
    shapes = sorted({tuple(s.shape[1:]) for s in samples})
    if len(shapes) > 1:
        raise TrainingInputError(
            f"{NODE}: the training latents have different sizes {shapes}; resize or crop the images to one size "
            "(e.g. with ResizeImagesByShorterEdge + CenterCropImages) before encoding."
        )
    if len(shapes[0]) != 3:
        raise TrainingInputError(f"{NODE}: expected image latents [batch, channels, height, width], got {shapes[0]}.")
    return torch.cat([s.float() for s in samples])


def gather_conditioning(conditionings: Sequence[Any], count: int, what: str) -> list[tuple[torch.Tensor, dict]]:
    """One conditioning entry per training latent: N entries, or one repeated for every latent."""
    entries = conditioning_entries(conditionings or [])
    if not entries:
        raise TrainingInputError(f"{NODE}: '{what}' has no conditioning; connect a CLIP Text Encode.")
    if len(entries) == 1:
        return entries * count
    if len(entries) != count:
        raise TrainingInputError(
            f"{NODE}: {len(entries)} {what} conditionings for {count} latents; give one per latent or a single "
            "one for all."
        )
    return entries


def parse_phase_weights(text: str, name: str, num_phases: int) -> tuple[float, ...] | None:
    """'' -> None (the recipe); 'w' -> w for every phase; 'w1, w2, w3, w4' -> one per phase."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        values = [float(v) for v in re.split(r"[,\s;]+", text) if v]
    except ValueError:
        raise TrainingInputError(f"{NODE}: {name} '{text}' is not a list of numbers (e.g. '0, 0.1, 0.2, 0.3').") from None
    if len(values) == 1:
        values = values * num_phases
    if len(values) != num_phases or any(v < 0 for v in values):
        raise TrainingInputError(
            f"{NODE}: {name} needs one non-negative weight or {num_phases} (one per training phase), got '{text}'."
        )
    return tuple(values)


def batch_indices(seed: int, step: int, dataset_size: int, batch_size: int) -> torch.Tensor:
    """Dataset indices of optimiser step `step`: a function of (seed, step) only, so resume is exact."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    perms = [torch.randperm(dataset_size, generator=generator) for _ in range(-(-batch_size // dataset_size))]
    return torch.cat(perms)[:batch_size]


def model_fingerprint(model) -> str:
    """A cheap identity of the teacher weights (class + shapes + a slice of a few tensors)."""
    digest = hashlib.sha256(type(model.model.model_config).__name__.encode())
    state = model.model.diffusion_model.state_dict()
    keys = sorted(state)
    for key in keys:
        digest.update(f"{key}{tuple(state[key].shape)}".encode())
    for key in keys[:3] + keys[-3:]:
        digest.update(state[key].detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Preview grid
# --------------------------------------------------------------------------------------------------


def latent_rgb(latent_format, latents: torch.Tensor, upscale: int = 8) -> torch.Tensor:
    """ComfyUI's latent2rgb preview (latent_format.latent_rgb_factors) of model-space latents -> [N, H, W, 3].
    Latent formats without factors (custom VAEs) show their first three channels (or the first, in grey)."""
    if latent_format.latent_rgb_factors is not None:
        factors = torch.tensor(latent_format.latent_rgb_factors, dtype=torch.float32)  # [C, 3]
    else:
        channels = latents.shape[1]
        factors = torch.zeros(channels, 3)
        for rgb_channel in range(3):
            factors[rgb_channel if channels >= 3 else 0, rgb_channel] = 1.0
    bias = latent_format.latent_rgb_factors_bias
    rgb = torch.einsum("nchw,cr->nhwr", latents.float().cpu(), factors)
    if bias is not None:
        rgb = rgb + torch.tensor(bias, dtype=torch.float32)
    rgb = ((rgb + 1.0) / 2.0).clamp(0, 1)  # -1..1 -> 0..1 as latent_preview.preview_to_image
    return rgb.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)


def to_images(latents: torch.Tensor, latent_format, vae=None) -> torch.Tensor:
    """Model-space latents -> IMAGE [N, H, W, 3] (VAE decode when a VAE is given, else latent2rgb)."""
    if vae is None:
        return latent_rgb(latent_format, latents)
    with torch.inference_mode():  # ComfyUI's own mode for the VAE (its weights are inference tensors)
        decoded = vae.decode(latent_format.process_out(latents.detach().float().cpu()))
    return decoded[..., :3].float().cpu().clamp(0, 1).clone()


def grid_image(rows: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """Rows of images [n, H, W, 3] with a label strip on the left -> IMAGE [1, H_total, W_total, 3]."""
    height, width = rows[0][1].shape[1:3]
    label_w = 72
    cols = max(r[1].shape[0] for r in rows)
    canvas = Image.new("RGB", (label_w + cols * width, len(rows) * height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * height + height // 2 - 6), label, fill="black", font=font)
        for c in range(images.shape[0]):
            tile = (images[c].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            canvas.paste(Image.fromarray(tile), (label_w + c * width, r * height))
    return torch.from_numpy(np.asarray(canvas).astype(np.float32) / 255.0)[None]


class PreviewSet:
    """Fixed prompts and seeds for the preview grid: teacher (multi-step CFG) vs student at 1/2/4 steps."""

    def __init__(self, denoiser: ComfyDenoiser, cond: Conditioning, uncond: Conditioning, latent_shape, seed: int,
                 guidance: float, grid_steps: int, vae=None):
        self.denoiser, self.vae = denoiser, vae
        self.cond, self.uncond = cond, uncond
        generator = torch.Generator().manual_seed(seed)
        self.noise = torch.randn((cond.batch_size, *latent_shape), generator=generator)
        self.seed, self.guidance, self.grid_steps = seed, guidance, grid_steps
        self._teacher_images: torch.Tensor | None = None

    def teacher_images(self) -> torch.Tensor:
        if self._teacher_images is None:
            den = self.denoiser
            noise = self.noise.to(den.device)
            with torch.no_grad(), den.teacher():  # the distillation target: K-step DPM-Solver++ with CFG
                x0 = teacher_target(den, noise, 0, self.cond.to(den.device), self.uncond.to(den.device),
                                    self.guidance, self.grid_steps)
            self._teacher_images = to_images(x0, den.latent_format, self.vae)
        return self._teacher_images

    def student_latents(self, distiller: FlashDistiller, steps: int) -> torch.Tensor:
        generator = torch.Generator(distiller.device).manual_seed(self.seed + steps)
        return distiller.student_sample(self.noise, self.cond, steps, generator=generator)

    def grid(self, distiller: FlashDistiller) -> torch.Tensor:
        rows = [(f"teacher\nK={self.grid_steps}\ncfg {self.guidance:g}", self.teacher_images())]
        for steps in PREVIEW_STEPS:
            latents = self.student_latents(distiller, steps)
            rows.append((f"student\n{steps} step{'s' if steps > 1 else ''}", to_images(latents, self.denoiser.latent_format, self.vae)))
        return grid_image(rows)


def progress_preview(image: torch.Tensor) -> tuple[str, Image.Image, int]:
    """The (format, PIL image, max size) tuple ComfyUI's progress hook sends to the frontend."""
    array = (image[0].numpy() * 255).round().astype(np.uint8)
    return ("JPEG", Image.fromarray(array), 1024)


# --------------------------------------------------------------------------------------------------
# Output: LoRA tensors, metadata, student MODEL
# --------------------------------------------------------------------------------------------------


def export_lora(distiller: FlashDistiller, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The student LoRA as kohya / ComfyUI-native tensors (``lora_unet_<ldm path>.lora_down/up.weight``, ``.alpha``)."""
    modules = lora_formats.modules_from_peft_state_dict(distiller.lora_state_dict(), distiller.recipe.lora_alpha)
    return lora_formats.to_kohya_state_dict(modules, dtype=dtype)


def student_model(model, lora: dict[str, torch.Tensor]):
    """Teacher clone + the LoRA as ComfyUI weight patches (what LoraLoader does); every module must apply."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
    expected = sum(1 for k in lora if k.endswith(".lora_down.weight"))
    clone = model.clone()
    applied = clone.add_patches(patches, 1.0)
    if len(patches) != expected or len(applied) != expected:
        raise RuntimeError(f"{NODE}: only {len(applied)} of {expected} trained LoRA modules map onto the model.")
    return clone


def lora_metadata(settings: dict, recipe, steps_done: int, nfe: int, losses: dict[str, list[float]]) -> dict[str, str]:
    """safetensors metadata: kohya's ss_* fields (so LoRA managers show rank/alpha/base) and Flash's own."""
    last = {k: v[-1] for k, v in losses.items() if v}
    window = {k: float(np.mean(v[-50:])) for k, v in losses.items() if v}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(recipe.lora_rank),
        "ss_network_alpha": str(recipe.lora_alpha),
        "ss_base_model_version": BASE_MODEL_VERSION.get(settings["backbone"], settings["backbone"]),
        "ss_steps": str(steps_done),
        "flash_base_model": settings["base_model"],
        "flash_base_fingerprint": settings["fingerprint"],
        "flash_backbone": settings["backbone"],
        "flash_rank": str(recipe.lora_rank),
        "flash_alpha": str(recipe.lora_alpha),
        "flash_steps": str(steps_done),
        "flash_nfe": str(nfe),
        "flash_grid": ",".join(str(t) for t in trailing_timesteps(nfe)),
        "flash_teacher_grid_steps": str(recipe.teacher_grid_steps),
        "flash_guidance_range": json.dumps(list(recipe.guidance_range)),
        "flash_loss_weights": json.dumps({"distill": recipe.distill_weights, "adversarial": recipe.adversarial_weights,
                                          "dmd": recipe.dmd_weights}),
        "flash_learning_rate": str(recipe.lr),
        "flash_batch_size": str(recipe.batch_size),
        "flash_losses_last": json.dumps(last),
        "flash_losses_mean_last_50": json.dumps(window),
        "flash_sampler": f"FlashSampler, {nfe} steps, cfg 1.0",
    }


# --------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------


class Progress:
    """ComfyUI progress bar (+ previews, + Cancel check) and the loss as the node's progress text."""

    def __init__(self, total: int, node_id: str | None):
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.node_id = node_id
        try:
            from server import PromptServer

            self.server = PromptServer.instance if node_id is not None else None
        except Exception:  # not running inside the ComfyUI server (in-process use)
            self.server = None

    def update(self, step: int, total: int, text: str, preview=None) -> None:
        if self.server is not None and hasattr(self.server, "send_progress_text"):
            self.server.send_progress_text(text, self.node_id)
        self.bar.update_absolute(step, total, preview)  # also raises InterruptProcessingException on Cancel
        comfy.model_management.throw_exception_if_processing_interrupted()


# --------------------------------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------------------------------


class FlashDistillTrain(io.ComfyNode):
    """Flash Diffusion distillation of the input MODEL into a few-step LoRA student."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashDistillTrain",
            display_name="Flash Distill Train",
            category=CATEGORY,
            description=(
                "Distils the MODEL (SD1.5 / SDXL) into a 1-4 step Flash Diffusion student: a LoRA trained with the "
                "distillation, adversarial and DMD losses of the published recipe (0 / empty = the recipe's value). "
                f"Writes models/loras/{OUTPUT_SUBFOLDER}/<lora_name>.safetensors (FlashLoRALoader and LoraLoader load it) "
                "and a resumable checkpoint; Cancel keeps the checkpoint, queue again with resume on to continue."
            ),
            is_input_list=True,  # latents / conditioning arrive as lists (Make / Load Training Dataset)
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The teacher (SD1.5 or SDXL). It is copied; the input MODEL is never changed."),
                io.Latent.Input("latents", tooltip="Training latents: VAE Encode of images, or Make / Load Training Dataset."),
                io.Conditioning.Input("positive", tooltip="One prompt per latent, or a single prompt for all."),
                io.Conditioning.Input("negative", tooltip="Unconditional prompt of the teacher's guidance (SD1.5: empty "
                                      "prompt; SDXL: ConditioningZeroOut of it)."),
                io.String.Input("lora_name", default="flash_student",
                                tooltip=f"File name under models/loras/{OUTPUT_SUBFOLDER}/ (no folders)."),
                io.Int.Input("steps", default=2000, min=1, max=1_000_000, tooltip="Optimiser steps (4 phases of equal length)."),
                io.Int.Input("nfe", default=4, min=1, max=MAX_NFE,
                             tooltip="Target sampling steps of the student (preview, metadata, recommended FlashSampler steps)."),
                io.Int.Input("rank", default=0, min=0, max=256, tooltip="LoRA rank; 0 = recipe (SD1.5 128, SDXL 64)."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=1e-6, round=1e-7,
                               tooltip="AdamW learning rate; 0 = recipe (1e-5)."),
                io.Float.Input("guidance_min", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Teacher CFG w ~ U[min, max]; 0 and 0 = recipe (3-13)."),
                io.Float.Input("guidance_max", default=0.0, min=0.0, max=30.0, step=0.1),
                io.Int.Input("teacher_steps", default=0, min=0, max=128,
                             tooltip="K, the teacher's DPM-Solver++ grid (a multiple of 4); 0 = recipe (32)."),
                io.String.Input("distill_weights", default="", tooltip="Per-phase weights 'w1, w2, w3, w4' or one value; empty = recipe."),
                io.String.Input("adversarial_weights", default="", tooltip="Per-phase adversarial weights; empty = recipe (0, .1, .2, .3)."),
                io.String.Input("dmd_weights", default="", tooltip="Per-phase DMD weights; empty = recipe (0, .3, .5, .7)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False),
                io.Int.Input("batch_size", default=0, min=0, max=256, tooltip="0 = recipe (SD1.5 4, SDXL 2)."),
                io.Boolean.Input("resume", default=True, tooltip="Continue from this lora_name's checkpoint if there is one."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing LoRA file of this name."),
                io.Int.Input("preview_every", default=100, min=0, max=100_000, tooltip="Steps between preview grids; 0 = off."),
                io.Boolean.Input("gradient_checkpointing", default=True, tooltip="Recompute UNet activations in backward (less memory)."),
                io.Combo.Input("mixed_precision", options=["bf16", "fp32"], default="bf16",
                               tooltip="bf16 autocast on GPUs; the CPU always trains in fp32."),
                io.Vae.Input("vae", optional=True, tooltip="Decodes the preview grid; without it latents are shown via latent2rgb."),
            ],
            outputs=[
                io.Model.Output(display_name="student", tooltip="Teacher + trained LoRA: sample it with Flash Sampler."),
                io.Custom("LORA_MODEL").Output(display_name="lora", tooltip="The LoRA tensors (Save LoRA Weights, Load LoRA Model)."),
                io.Custom("LOSS_MAP").Output(display_name="loss_map", tooltip="Loss per step (Plot Loss Graph)."),
                io.Image.Output(display_name="preview", tooltip="Teacher (multi-step CFG) vs student at 1 / 2 / 4 steps."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, latents, positive, negative, lora_name, steps, nfe, rank, learning_rate, guidance_min,
                guidance_max, teacher_steps, distill_weights, adversarial_weights, dmd_weights, seed, batch_size,
                resume, overwrite, preview_every, gradient_checkpointing, mixed_precision, vae=None) -> io.NodeOutput:
        one = lambda v: v[0] if isinstance(v, list) else v
        model, vae = one(model), one(vae)
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        options = dict(
            lora_name=one(lora_name), steps=int(one(steps)), nfe=int(one(nfe)), rank=int(one(rank)),
            learning_rate=float(one(learning_rate)), guidance_min=float(one(guidance_min)),
            guidance_max=float(one(guidance_max)), teacher_steps=int(one(teacher_steps)),
            distill_weights=one(distill_weights), adversarial_weights=one(adversarial_weights),
            dmd_weights=one(dmd_weights), seed=int(one(seed)), batch_size=int(one(batch_size)),
            resume=bool(one(resume)), overwrite=bool(one(overwrite)), preview_every=int(one(preview_every)),
            gradient_checkpointing=bool(one(gradient_checkpointing)), mixed_precision=one(mixed_precision),
        )
        with torch.inference_mode(False), torch.enable_grad():
            student, lora, loss_map, grid = train(model, latents, positive, negative, vae=vae, node_id=node_id, **options)
        return io.NodeOutput(student, lora, loss_map, grid, ui=ui.PreviewImage(grid, cls=cls))


def distill_config(backbone: str, steps: int, rank: int, learning_rate: float, guidance_min: float,
                   guidance_max: float, teacher_steps: int, distill_weights: str, adversarial_weights: str,
                   dmd_weights: str, seed: int, batch_size: int, gradient_checkpointing: bool,
                   mixed_precision: str, device: torch.device) -> DistillConfig:
    """The node's inputs as a flash_core DistillConfig (0 / '' = the backbone's published recipe)."""
    recipe = get_recipe(backbone)
    if guidance_max < guidance_min:
        raise TrainingInputError(f"{NODE}: guidance_max ({guidance_max}) is below guidance_min ({guidance_min}).")
    guidance = None if guidance_min == 0 and guidance_max == 0 else (guidance_min, guidance_max)
    if teacher_steps % recipe.student_steps:
        raise TrainingInputError(
            f"{NODE}: teacher_steps must be a multiple of {recipe.student_steps} (the few-step grid the timestep "
            f"mixture sits on), e.g. {recipe.teacher_grid_steps}; got {teacher_steps}."
        )
    return DistillConfig(
        backbone=backbone, total_steps=steps, seed=seed,
        batch_size=batch_size or None, lora_rank=rank or None, lora_alpha=rank or None,  # alpha = rank (recipe rule)
        lr=learning_rate or None, guidance_range=guidance, teacher_grid_steps=teacher_steps or None,
        distill_weights=parse_phase_weights(distill_weights, "distill_weights", recipe.num_phases),
        adversarial_weights=parse_phase_weights(adversarial_weights, "adversarial_weights", recipe.num_phases),
        dmd_weights=parse_phase_weights(dmd_weights, "dmd_weights", recipe.num_phases),
        grad_checkpointing=gradient_checkpointing,
        mixed_precision="bf16" if mixed_precision == "bf16" and device.type == "cuda" else "no",
    )


# Settings that must match to resume (steps may grow; preview / overwrite / nfe / precision may change).
RESUME_KEYS = ("backbone", "fingerprint", "lora_rank", "lora_alpha", "lora_targets", "lr", "guidance_range",
               "teacher_grid_steps", "distill_weights", "adversarial_weights", "dmd_weights", "batch_size", "seed")


def run_settings(model, backbone: str, config: DistillConfig) -> dict:
    recipe = config.recipe()
    return {
        "backbone": backbone, "base_model": type(model.model.model_config).__name__,
        "fingerprint": model_fingerprint(model), "lora_rank": recipe.lora_rank, "lora_alpha": recipe.lora_alpha,
        "lora_targets": list(recipe.lora_targets), "lr": recipe.lr, "guidance_range": list(recipe.guidance_range),
        "teacher_grid_steps": recipe.teacher_grid_steps, "distill_weights": list(recipe.distill_weights),
        "adversarial_weights": list(recipe.adversarial_weights), "dmd_weights": list(recipe.dmd_weights),
        "batch_size": recipe.batch_size, "seed": config.seed,
    }


def check_resumable(saved: dict, current: dict, folder: str) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in RESUME_KEYS if saved.get(k) != current.get(k)]
    if diffs:
        raise TrainingInputError(
            f"{NODE}: the checkpoint in '{folder}' was made with other settings ({'; '.join(diffs)}). "
            "Use the same settings to continue, or set resume off (or another lora_name) to start over."
        )


def train(model, latents, positive, negative, *, lora_name: str, steps: int, nfe: int, rank: int,
          learning_rate: float, guidance_min: float, guidance_max: float, teacher_steps: int, distill_weights: str,
          adversarial_weights: str, dmd_weights: str, seed: int, batch_size: int, resume: bool, overwrite: bool,
          preview_every: int, gradient_checkpointing: bool, mixed_precision: str, vae=None, node_id=None):
    """The whole node run (in ComfyUI's grad mode). Returns (student MODEL, LORA_MODEL, LOSS_MAP, IMAGE)."""
    # ---- validate everything before any work -------------------------------------------------------
    name = check_lora_name(lora_name)
    backbone = backbone_of(model)
    if not 1 <= nfe <= MAX_NFE:
        raise TrainingInputError(f"{NODE}: nfe must be 1 to {MAX_NFE}, got {nfe}.")
    data = gather_latents(latents)
    count = data.shape[0]
    latent_channels = model.model.latent_format.latent_channels
    if data.shape[1] != latent_channels:
        raise TrainingInputError(
            f"{NODE}: the latents have {data.shape[1]} channels but this model expects {latent_channels}: "
            "encode the images with this model's VAE."
        )
    cond_entries = gather_conditioning(positive, count, "positive")
    uncond_entries = gather_conditioning(negative, count, "negative")
    if len(conditioning_entries(negative)) == 1:
        uncond_entries = uncond_entries[:1]
    lora_path, checkpoint_dir = output_locations(name)
    if os.path.exists(lora_path) and not overwrite:
        raise TrainingInputError(
            f"{NODE}: '{lora_path}' already exists. Turn overwrite on to replace it, or choose another lora_name."
        )
    ensure_writable(os.path.dirname(lora_path))
    ensure_writable(checkpoint_dir)
    device = comfy.model_management.get_torch_device()
    config = distill_config(backbone, steps, rank, learning_rate, guidance_min, guidance_max, teacher_steps,
                            distill_weights, adversarial_weights, dmd_weights, seed, batch_size,
                            gradient_checkpointing, mixed_precision, device)
    settings = run_settings(model, backbone, config)
    state = load_checkpoint(checkpoint_dir) if resume else None
    if state is not None:
        check_resumable(state["settings"], settings, checkpoint_dir)

    # ---- build the student over a private copy of the teacher --------------------------------------
    hw = tuple(data.shape[-2:])
    cond_all = to_conditioning(cond_entries, hw, backbone)
    uncond_all = to_conditioning(uncond_entries, hw, backbone)
    denoiser = ComfyDenoiser(model, device=device)
    distiller = FlashDistiller(denoiser, config, device=denoiser.device)
    recipe = distiller.recipe
    losses: dict[str, list[float]] = {"loss": []}
    if state is not None:
        distiller.load_state_dict(state["distiller"])
        losses = {k: list(v) for k, v in state["losses"].items()}
        LOG.info("%s: resuming '%s' at step %d of %d.", NODE, name, distiller.step, steps)
    dataset = denoiser.process_in(data).to(denoiser.device)  # VAE latents -> model space (x 0.18215 for SD)

    columns = min(PREVIEW_COLUMNS, count)
    preview_index = torch.arange(columns)
    previews = PreviewSet(denoiser, cond_all[preview_index], uncond_all[0] if uncond_all.batch_size == 1 else uncond_all[preview_index],
                          tuple(dataset.shape[1:]), seed, sum(recipe.guidance_range) / 2, recipe.teacher_grid_steps, vae)

    def checkpoint(trainer: FlashDistiller) -> str:
        return save_checkpoint(checkpoint_dir, {"version": CHECKPOINT_VERSION, "settings": settings,
                                                "distiller": trainer.state_dict(), "losses": losses})

    progress = Progress(steps, node_id)
    start_step = distiller.step
    started = time.perf_counter()
    try:
        while distiller.step < steps:
            step = distiller.step
            index = batch_indices(seed, step, count, recipe.batch_size)
            uncond = uncond_all if uncond_all.batch_size == 1 else uncond_all[index]
            logs = distiller.train_step(Batch(dataset[index], cond_all[index], uncond))
            for key, value in logs.items():
                if key.startswith("loss"):
                    losses.setdefault(key, []).append(float(value))
            done = distiller.step
            rate = (time.perf_counter() - started) / max(1, done - start_step)
            text = (f"step {done}/{steps}  loss {logs['loss']:.4f}  distill {logs['loss_distill']:.4f}  "
                    f"phase {int(logs['phase']) + 1}/{recipe.num_phases}  {rate:.2f} s/step")
            preview = None
            if preview_every and (done % preview_every == 0 or done == steps):
                preview = progress_preview(previews.grid(distiller))
            if done % CHECKPOINT_EVERY == 0 and done < steps:
                checkpoint(distiller)
            progress.update(done, steps, text, preview)
    except comfy.model_management.InterruptProcessingException:
        path = checkpoint(distiller)  # the state after the last finished step: queue again with resume on
        LOG.info("%s: cancelled at step %d; checkpoint %s.", NODE, distiller.step, path)
        raise
    except Exception:
        if distiller.step > start_step:
            try:
                checkpoint(distiller)
            except Exception:  # keep the original error
                LOG.exception("%s: could not write the checkpoint after a failure", NODE)
        raise
    if distiller.step > start_step:
        checkpoint(distiller)
    seconds = time.perf_counter() - started
    LOG.info("%s: %d steps in %.1f s (%.3f s/step).", NODE, distiller.step - start_step, seconds,
             seconds / max(1, distiller.step - start_step))

    # ---- outputs -----------------------------------------------------------------------------------
    lora = export_lora(distiller)
    metadata = lora_metadata(settings, recipe, distiller.step, nfe, losses)
    try:
        lora_formats.save_lora(lora_path, lora, metadata)
    except OSError as err:
        raise TrainingInputError(
            f"{NODE}: could not write '{lora_path}' ({err.strerror or err}); no file was left behind. The trained "
            f"state is in '{checkpoint_dir}': free disk space / fix permissions and queue again with resume on."
        ) from err
    LOG.info("%s: wrote %s", NODE, lora_path)
    grid = previews.grid(distiller)
    loss_map = {k: list(v) for k, v in losses.items()}
    del previews, distiller, denoiser
    gc.collect()
    comfy.model_management.soft_empty_cache()
    return student_model(model, lora), lora, loss_map, grid


NODES = [FlashDistillTrain]
