"""FlashDistillTrain: distil a ComfyUI MODEL into a few-step Flash student (a LoRA) inside ComfyUI.

A thin shell over the one training session, `flash_core.session.TrainingSession` (lock, identities, student,
target cache, resume, the loop with its checkpoints and previews, export), driven through
`nodes.comfy_denoiser.ComfyDenoiser` (the teacher MODEL is copied, never changed). The node adds what only
ComfyUI has: its data types (LATENT / CONDITIONING lists from VAEEncode, MakeTrainingDataset,
LoadTrainingDataset), its progress bar with previews and Cancel, its model folders.

Files (all written atomically, through flash_core.files):
  * the LoRA:        <first loras folder>/flash/<lora_name>.safetensors, kohya keys (``lora_unet_<diffusers
                     path>``) with alpha tensors, float32, loaded as is by FlashLoRALoader and by the stock
                     LoraLoader; metadata in the one schema (flash_core.lora_formats: ss_* + flash.*).
  * the checkpoint:  <first loras folder>/flash/.checkpoints/<lora_name>/step-<N>/ in flash_core.checkpoints' format
                     (LoRA, discriminator, optimisers, RNG states, settings, teacher and data fingerprints, step
                     log), the newest one kept. Written every CHECKPOINT_EVERY steps, on Cancel and at the end;
                     never for a step with a non-finite loss or gradient. Queue again with resume on to continue:
                     a checkpoint made with other settings, another teacher or other data is refused with the
                     list of differences. Set resume off (or another lora_name) to start over.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import tempfile
import time

import comfy.lora
import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from flash_core import dependencies, lora_formats
from flash_core.batches import TensorDataset
from flash_core.checkpoints import CheckpointError, CheckpointStore
from flash_core.lora_formats.metadata import GUIDANCE_MODES
from flash_core.run import NonFiniteError, ResumeMismatchError
from flash_core.session import PreviewSpec, TrainingSession
from flash_core.target_cache import TargetCacheError

from .comfy_denoiser import (
    ComfyDenoiser,
    backbone_of,
    conditioning_entries,
    to_conditioning,
)
from .loaders import with_flash_sampling
from .stack import describe_stack
from .training_inputs import (
    NODE,
    TrainingInputError,
    distill_config,
    gather_conditioning,
    gather_latents,
)
from .training_progress import NodeHooks, Progress, image_output, to_images

LOG = logging.getLogger(__name__)

CATEGORY = "Flash Diffusion"
OUTPUT_SUBFOLDER = "flash"
CHECKPOINT_SUBFOLDER = ".checkpoints"
TARGET_CACHE_SUBFOLDER = "flash_target_cache"  # under ComfyUI's output folder
CHECKPOINT_EVERY = 250  # optimiser steps between periodic checkpoints
PREVIEW_COLUMNS = 4  # prompts / seeds shown side by side
MAX_RECOMMENDED_STEPS = 4  # the recipe's student grid: a LoRA recommends at most the steps it was trained on
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9 _.+=-]{0,119}$")


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


def target_cache_folder(name: str) -> str | None:
    """'' = no cache; else <ComfyUI output>/flash_target_cache/<name> (a plain name: never outside that folder)."""
    name = (name or "").strip()
    if not name:
        return None
    separators = [s for s in ("/", "\\", os.sep, os.altsep) if s]
    if any(s in name for s in separators) or ".." in name or not NAME_PATTERN.match(name):
        raise TrainingInputError(
            f"{NODE}: target_cache '{name}' is not a plain folder name; use letters, digits, spaces and _ . + = - "
            f"(the cache always lives in ComfyUI's output/{TARGET_CACHE_SUBFOLDER}/)."
        )
    return os.path.join(folder_paths.get_output_directory(), TARGET_CACHE_SUBFOLDER, name)


# LoRA files this server process wrote: path -> (size, mtime_ns). ComfyUI caches a node's outputs while its
# fingerprint stays the same; FlashDistillTrain's fingerprint includes its output file, so a LoRA deleted or
# replaced after training makes the node run again instead of reporting success with no file.
_WRITTEN: dict[str, tuple[int, int]] = {}


def _file_state(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def output_fingerprint(lora_name: str) -> str:
    """'as trained' while the output file is absent before training or is what this server wrote; otherwise
    its current state (missing, or replaced), which differs and so makes ComfyUI run the node again."""
    try:
        path = output_locations(check_lora_name(lora_name))[0]
    except TrainingInputError:
        return "invalid name"  # execute reports it
    current = _file_state(path)
    written = _WRITTEN.get(path)
    if written is None and current is None or written is not None and written == current:
        return "as trained"
    return f"changed since training: {current}"


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


# --------------------------------------------------------------------------------------------------
# Output: LoRA tensors, metadata, student MODEL
# --------------------------------------------------------------------------------------------------


def stored_lora(path: str, tensors: dict[str, torch.Tensor]) -> dict[str, str] | None:
    """The metadata of the LoRA file at `path` when it holds exactly `tensors` (a finished run's own output),
    else None."""
    try:
        stored, metadata = lora_formats.load_safetensors(path)
    except (OSError, ValueError):
        return None
    same = stored.keys() == tensors.keys() and all(torch.equal(stored[k], tensors[k].cpu()) for k in tensors)
    return dict(metadata or {}) if same else None


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
                "and a resumable checkpoint; Cancel keeps the checkpoint, queue again with resume on to continue. "
                "The MODEL may carry LoRAs loaded upstream (your style stack): the student is distilled from exactly "
                "that stack and its metadata records it (base checkpoint + hash, LoRAs + strengths), with the grid, "
                "steps and cfg Flash Sampler then uses."
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
                # Input ids are frozen (saved workflows and API prompts name them); the display names are the
                # pack's words (docs/architecture.md "Words"): steps -> total_steps, nfe -> recommended_steps,
                # teacher_steps -> teacher_grid_steps.
                io.Int.Input("steps", display_name="total_steps", default=1000, min=1, max=1_000_000,
                             tooltip="Training iterations = batches, each updating the student and then the "
                             "discriminator (4 phases of equal length)."),
                io.Int.Input("nfe", display_name="recommended_steps", default=4, min=1, max=MAX_RECOMMENDED_STEPS,
                             tooltip="Sampling steps recorded in the LoRA: Flash Sampler at steps 0 uses them. The "
                             "student is trained on the recipe's 4-step grid."),
                io.Int.Input("rank", default=0, min=0, max=256,
                             tooltip="LoRA rank; 0 = recipe (SD1.5 128, SDXL 64). Alpha follows the rank so the LoRA "
                                     "keeps the recipe's scale alpha/rank (SD1.5, SDXL 1.0; PixArt, SD3 0.125)."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=1e-6, round=1e-7,
                               tooltip="AdamW learning rate; 0 = recipe (1e-5)."),
                io.Float.Input("guidance_min", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Teacher CFG w ~ U[min, max]; 0 and 0 = recipe (3-13)."),
                io.Float.Input("guidance_max", default=0.0, min=0.0, max=30.0, step=0.1),
                io.Int.Input("teacher_steps", display_name="teacher_grid_steps", default=0, min=0, max=128,
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
                io.String.Input("target_cache", default="", optional=True,
                                tooltip=f"Folder name under output/{TARGET_CACHE_SUBFOLDER}/: the teacher targets of the whole "
                                "run are solved there first in large batches (an interrupted build continues), then read "
                                "instead of solved. Students with other rank / learning rate / loss weights reuse it; "
                                "empty = solve during training."),
                io.Combo.Input("guidance_mode", options=list(GUIDANCE_MODES), default="baked", optional=True,
                               tooltip="baked: the teacher's guidance is distilled in (cfg 1, one model call per step; "
                               "the negative prompt is unused at sampling). cfg: the student keeps a cfg dial and honours "
                               "any negative prompt at sampling (its own CFG matched to the teacher's over "
                               "guidance_min-max; two model calls per step). Recorded in the LoRA; Flash Sampler "
                               "follows it."),
                io.Float.Input("ema_decay", default=0.0, min=0.0, max=0.9999, step=0.001, optional=True,
                               tooltip="0 = off. Otherwise the LoRA written (and previewed) is a moving average of the "
                               "trained one over about 1 / (1 - ema_decay) steps: 0.99 = the last ~100. Measured "
                               "with guidance_mode cfg on the digits model: a dial nearer the teacher's, but a mix of "
                               "images without a prompt farther from it (README, make bench-guidance-ema)."),
            ],
            outputs=[
                io.Model.Output(display_name="student", tooltip="Teacher + trained LoRA: sample it with Flash Sampler."),
                io.Custom("LORA_MODEL").Output(display_name="lora", tooltip="The LoRA tensors (Save LoRA Weights, Load LoRA Model)."),
                io.Custom("LOSS_MAP").Output(display_name="loss_map", tooltip="Loss per step (Plot Loss Graph)."),
                io.Image.Output(display_name="preview", tooltip="Teacher (multi-step CFG) vs student at 1 / 2 / 4 steps."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name=None, **kwargs):
        """The inputs' own values decide ComfyUI's cache, plus the state of the output LoRA file."""
        return output_fingerprint(lora_name[0] if isinstance(lora_name, list) else lora_name)

    @classmethod
    def execute(cls, model, latents, positive, negative, lora_name, steps, nfe, rank, learning_rate, guidance_min,
                guidance_max, teacher_steps, distill_weights, adversarial_weights, dmd_weights, seed, batch_size,
                resume, overwrite, preview_every, gradient_checkpointing, mixed_precision, vae=None,
                target_cache="", guidance_mode="baked", ema_decay=0.0) -> io.NodeOutput:
        one = lambda v: v[0] if isinstance(v, list) else v
        model, vae = one(model), one(vae)
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        # the stack the teacher MODEL is made of (base checkpoint, LoRAs with strengths), read from the workflow
        trained_for = describe_stack(getattr(getattr(cls, "hidden", None), "prompt", None), node_id)
        options = dict(
            lora_name=one(lora_name), total_steps=int(one(steps)), recommended_steps=int(one(nfe)), rank=int(one(rank)),
            learning_rate=float(one(learning_rate)), guidance_min=float(one(guidance_min)),
            guidance_max=float(one(guidance_max)), teacher_grid_steps=int(one(teacher_steps)),
            distill_weights=one(distill_weights), adversarial_weights=one(adversarial_weights),
            dmd_weights=one(dmd_weights), seed=int(one(seed)), batch_size=int(one(batch_size)),
            resume=bool(one(resume)), overwrite=bool(one(overwrite)), preview_every=int(one(preview_every)),
            gradient_checkpointing=bool(one(gradient_checkpointing)), mixed_precision=one(mixed_precision),
            target_cache=one(target_cache) or "", guidance_mode=one(guidance_mode) or "baked",
            ema_decay=float(one(ema_decay) or 0.0),
        )
        with torch.inference_mode(False), torch.enable_grad():
            student, lora, loss_map, grid = train(model, latents, positive, negative, vae=vae, node_id=node_id,
                                                  trained_for=trained_for, **options)
        return io.NodeOutput(student, lora, loss_map, grid, ui=ui.PreviewImage(grid, cls=cls))


def train(model, latents, positive, negative, *, lora_name: str, total_steps: int, recommended_steps: int, rank: int,
          learning_rate: float, guidance_min: float, guidance_max: float, teacher_grid_steps: int, distill_weights: str,
          adversarial_weights: str, dmd_weights: str, seed: int, batch_size: int, resume: bool, overwrite: bool,
          preview_every: int, gradient_checkpointing: bool, mixed_precision: str, vae=None, node_id=None,
          target_cache: str = "", trained_for: dict | None = None, guidance_mode: str = "baked",
          ema_decay: float = 0.0):
    """The whole node run (in ComfyUI's grad mode). Returns (student MODEL, LORA_MODEL, LOSS_MAP, IMAGE).
    `trained_for` (nodes.stack.describe_stack of the MODEL input) goes into the LoRA's metadata."""
    # ---- validate everything before any work -------------------------------------------------------
    dependencies.require_all(("peft", "diffusers"), NODE)  # requirements.txt; the pack loads without them
    name = check_lora_name(lora_name)
    backbone = backbone_of(model)
    if not 1 <= recommended_steps <= MAX_RECOMMENDED_STEPS:
        raise TrainingInputError(f"{NODE}: recommended_steps must be 1 to {MAX_RECOMMENDED_STEPS}, got {recommended_steps}.")
    device = comfy.model_management.get_torch_device()
    config = distill_config(backbone, total_steps, rank, learning_rate, guidance_min, guidance_max, teacher_grid_steps,
                            distill_weights, adversarial_weights, dmd_weights, seed, batch_size,
                            gradient_checkpointing, mixed_precision, device, guidance_mode, ema_decay)
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
    cache_folder = target_cache_folder(target_cache)
    already_exists = TrainingInputError(
        f"{NODE}: '{lora_path}' already exists. Turn overwrite on to replace it, or choose another lora_name."
    )
    resume_from = CheckpointStore(checkpoint_dir).latest() if resume else None  # read only: the session owns the run
    if os.path.exists(lora_path) and not overwrite and resume_from is None:
        raise already_exists  # before any work: no copy of the teacher is made for a refused run
    ensure_writable(os.path.dirname(lora_path))
    ensure_writable(checkpoint_dir)

    # ---- the data in model space, the preview prompts, the session ---------------------------------------
    hw = tuple(data.shape[-2:])
    cond_all = to_conditioning(cond_entries, hw, backbone)
    uncond_all = to_conditioning(uncond_entries, hw, backbone)
    denoiser = ComfyDenoiser(model, device=device)  # a private copy of the teacher: the MODEL input is never changed
    latent_format = denoiser.latent_format
    dataset = TensorDataset(denoiser.process_in(data).to(denoiser.device),  # VAE latents -> model space
                            cond_all.to(denoiser.device), uncond_all.to(denoiser.device))
    columns = torch.arange(min(PREVIEW_COLUMNS, count))
    preview = PreviewSpec(cond_all[columns], uncond_all if uncond_all.batch_size == 1 else uncond_all[columns],
                          tuple(data.shape[1:]), decode=lambda latents: to_images(latents, latent_format, vae))
    session = TrainingSession(
        denoiser, config, dataset, output=checkpoint_dir, output_label=f"{NODE} '{name}'",
        clean=[(os.path.dirname(lora_path), False, f"{name}.safetensors")],
        checkpoints=checkpoint_dir, keep_checkpoints=1, checkpoint_every=CHECKPOINT_EVERY,
        preview=preview, preview_every=preview_every,
        hooks=NodeHooks(Progress(total_steps, node_id)),
        settings={"base_model": type(model.model.model_config).__name__},
        fresh_hint=f"Set resume off (or use another lora_name) to start over; '{checkpoint_dir}' holds the old run.",
        rollback_on=(comfy.model_management.InterruptProcessingException,),  # Cancel fires inside ComfyUI's ops
        device=denoiser.device,
    )
    # One run per output (another ComfyUI sharing these folders refuses, naming the holder); holding the lock, the
    # session removes what a killed run left half-written.
    with session:
        if cache_folder is not None:
            LOG.info("%s: solving the teacher targets into %s (finished shards are kept).", NODE, cache_folder)
            try:
                session.targets(cache_folder, build=True,
                                progress=lambda done, total: LOG.info("%s: target shard %d of %d", NODE, done, total))
            except TargetCacheError as err:
                raise TrainingInputError(f"{NODE}: {err}") from None
        try:
            session.start(resume=resume_from)
        except (ResumeMismatchError, CheckpointError) as err:
            raise TrainingInputError(f"{NODE}: {err}") from None
        if resume_from is not None:
            LOG.info("%s: resuming '%s' at step %d of %d.", NODE, name, session.step, total_steps)

        start_step, started = session.step, time.perf_counter()
        try:
            session.train()
        except comfy.model_management.InterruptProcessingException:
            LOG.info("%s: cancelled at step %d; checkpoint in %s.", NODE, session.step, checkpoint_dir)
            raise
        except NonFiniteError as err:  # nothing of the bad step was saved; ComfyUI shows this in its error panel
            err.args = (f"{NODE}: {err}",)
            raise
        seconds = time.perf_counter() - started
        LOG.info("%s: %d steps in %.1f s (%.3f s/step).", NODE, session.step - start_step, seconds,
                 seconds / max(1, session.step - start_step))

        # ---- outputs -----------------------------------------------------------------------------------
        export = session.export("comfyui", recommended_steps=recommended_steps, trained_for=trained_for)
        lora = export.tensors
        stored_metadata = stored_lora(lora_path, lora) if os.path.exists(lora_path) and not overwrite else None
        if os.path.exists(lora_path) and not overwrite and stored_metadata is None:
            raise already_exists  # another file of that name, not this finished run's
        if stored_metadata == export.metadata:
            LOG.info("%s: '%s' is already this run's LoRA (step %d of %d); not written again.", NODE, lora_path,
                     session.step, total_steps)
        else:  # a new file, an overwrite, or this run's weights re-queued with other metadata (steps, stack)
            try:
                lora_formats.save_lora(lora_path, lora, export.metadata)
            except OSError as err:
                raise TrainingInputError(
                    f"{NODE}: could not write '{lora_path}' ({err.strerror or err}); no file was left behind. The trained "
                    f"state is in '{checkpoint_dir}': free disk space / fix permissions and queue again with resume on."
                ) from err
            LOG.info("%s: wrote %s", NODE, lora_path)
        _WRITTEN[lora_path] = _file_state(lora_path)
        grid = image_output(session.preview.image())
        loss_map = session.run.loss_map()
    del session, dataset, denoiser
    gc.collect()
    comfy.model_management.soft_empty_cache()
    student = student_model(model, lora)
    settings = lora_formats.sampling_settings(export.metadata)
    if settings is not None:  # Flash Sampler on the student output configures itself like after FlashLoRALoader
        with_flash_sampling(student, settings.as_dict(), f"{OUTPUT_SUBFOLDER}/{name}.safetensors")
    return student, lora, loss_map, grid


NODES = [FlashDistillTrain]
