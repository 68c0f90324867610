"""One flash-distill training run: prepare the teacher and the encoded data, then drive the training session
(flash_core.session.TrainingSession: lock, student, target cache, resume, loop, checkpoints, export). The CLI keeps
what is its own: its config, the losses log, sample grids as PNG, Ctrl-C / SIGTERM and the export folder."""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flash_core.files import write_atomic, write_text_atomic
from training.cli.config import TrainConfig, distill_config_for
from training.cli.distributed import GradientAverager, any_rank
from training.cli.errors import EXIT_INTERRUPTED, ConfigError
from training.cli.teacher import (
    TeacherModel,
    build_tiny_pipeline,
    conditioning_to_tensors,
    model_identity,
    tensors_to_conditioning,
    tiny_model_folder,
    weight_dtype_for,
)

# --------------------------------------------------------------------------------------------------
# Small file helpers (every write is atomic, through flash_core.files)
# --------------------------------------------------------------------------------------------------


def save_png_atomic(image, path: Path) -> None:
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))




# --------------------------------------------------------------------------------------------------
# Stopping on Ctrl-C / SIGTERM: finish the step, save a checkpoint, exit 130
# --------------------------------------------------------------------------------------------------


class StopRequest:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each step (a second signal aborts at once)."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.requested:  # second Ctrl-C: give up on the checkpoint
            self.restore()
            raise KeyboardInterrupt
        self.requested = True

    def install(self) -> StopRequest:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


# --------------------------------------------------------------------------------------------------
# Checkpoints: flash_core.run's format (checkpoints/step-000500/{state.flashckpt, rank-<r>.flashckpt, meta.json}, latest)
# --------------------------------------------------------------------------------------------------


def checkpoint_root(config: TrainConfig) -> Path:
    return config.output_dir / "checkpoints"


def find_resume_checkpoint(config: TrainConfig, resume: str) -> Path:
    """The checkpoint folder `--resume` means: 'latest' (the newest in output_dir) or an explicit folder."""
    from flash_core.checkpoints import META_FILE, CheckpointStore

    if resume != "latest":
        folder = Path(resume)
        if not (folder / META_FILE).is_file():
            raise ConfigError(f"--resume {folder}: not a flash-distill checkpoint folder (no {META_FILE})")
        return folder
    root = checkpoint_root(config)
    found = CheckpointStore(root).latest()
    if found is None:
        raise ConfigError(f"--resume: no checkpoint in {root} to resume from (run without --resume to start)")
    return found


# --------------------------------------------------------------------------------------------------
# Losses log and sample grids
# --------------------------------------------------------------------------------------------------


def truncate_losses(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (the resumed run writes them again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def append_losses(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (rewritten atomically so a kill never leaves half a line)."""
    previous = path.read_text(encoding="utf-8") if path.is_file() else ""
    write_text_atomic(path, previous + json.dumps(record, sort_keys=True) + "\n")




# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

class EncodedRows:
    """The encoded dataset as flash_core.run's Dataset: rows -> Batch (SDXL-style zero uncond built per batch)."""

    def __init__(self, encoded, uncond_tensors: dict):
        self.encoded = encoded
        self.uncond = tensors_to_conditioning(uncond_tensors) if uncond_tensors else None

    def __len__(self) -> int:
        return len(self.encoded)

    def batch(self, indices, step: int):
        from flash_core.distill import Batch

        latents, cond_tensors, _ = self.encoded.rows(indices)
        cond = tensors_to_conditioning(cond_tensors)
        uncond = self.uncond if self.uncond is not None else prompt_uncond_conditioning({}, cond, cond.batch_size)
        return Batch(latents=latents, cond=cond, uncond=uncond)

    def fingerprint(self) -> str:
        from flash_core.fingerprints import tensor_fingerprint

        named = [("latents", self.encoded.latents)] + sorted(self.encoded.conditioning.items())
        if self.uncond is not None:
            named += [(f"uncond.{k}", v) for k, v in sorted(conditioning_to_tensors(self.uncond).items())]
        return tensor_fingerprint(named)


class CliHooks:
    """flash_core.run hooks for the CLI: tqdm, losses.jsonl every log_every steps (averaged over processes),
    sample grids as PNG, and Ctrl-C / SIGTERM (StopRequest) agreed on by every process."""

    def __init__(self, config: TrainConfig, accelerator, progress, stop: StopRequest, losses_path: Path):
        self.config, self.accelerator, self.progress, self.stop = config, accelerator, progress, stop
        self.losses_path = losses_path

    def on_step(self, report) -> None:
        import torch

        step, logs, accelerator = report.step, report.logs, self.accelerator
        self.progress.update(1)
        if step % self.config.log_every == 0 or step == report.total:
            keys = sorted(k for k in logs if k != "step_s")
            values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=accelerator.device)
            values = accelerator.reduce(values, reduction="mean")  # losses averaged over ranks
            if accelerator.is_main_process:
                record = {"step": step, **{k: float(v) for k, v in zip(keys, values.tolist())}}
                append_losses(self.losses_path, record)
                self.progress.set_postfix(loss=f"{record['loss']:.4f}", phase=int(record["phase"]))
        if report.preview is not None:
            save_png_atomic(_pil(report.preview), self.config.output_dir / "samples" / f"step-{step:06d}.png")

    def should_stop(self) -> bool:
        return any_rank(self.accelerator, self.stop.requested)


def _pil(array):
    from PIL import Image

    return Image.fromarray(array, mode="RGB")


def preview_spec(config: TrainConfig, teacher: TeacherModel, prompts_cond: dict, prompts_uncond: dict):
    """The session's preview (teacher | student 1 / 2 / 4 steps rows, one column per sample prompt), decoded by the
    pipeline's VAE."""
    from flash_core.session import PreviewSpec

    cond = tensors_to_conditioning(prompts_cond)
    uncond = prompt_uncond_conditioning(prompts_uncond, cond, cond.batch_size)

    def decode(latents):
        pixels = teacher.decode_latents(latents).float().cpu()  # [n, 3, H, W] in [-1, 1]
        return ((pixels.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)  # -> [n, H, W, 3] in [0, 1]

    return PreviewSpec(cond, uncond, teacher.sample_latent_shape, decode, guidance=config.teacher_guidance,
                       teacher_sample_steps=config.teacher_sample_steps, sample_steps=config.sample_steps)


def export_lora(config: TrainConfig, session, base_model: str) -> dict[str, Path]:
    """Write the trained LoRA in the configured formats (rank 0) with the session's metadata and dtype."""
    export_dir, written = config.output_dir / "export", {}
    for kind in config.export:
        export = session.export(kind, name=config.export_name, base_model=base_model)
        written[kind] = export.save(export_dir)  # atomic: LoraExport.save writes through flash_core.files
    return written


def prompt_uncond_conditioning(uncond_tensors: dict, cond, size: int):
    """Batch-1 unconditional (empty / negative prompt) or SDXL-style zeros of `cond`."""
    from flash_core.denoiser import zero_conditioning

    if not uncond_tensors:
        return zero_conditioning(cond)
    return tensors_to_conditioning(uncond_tensors).expand_to(size)


@dataclass
class Prepared:
    """The loaded teacher and the encoded dataset of a config (training and cache-targets share them)."""

    teacher: Any
    encoded: Any
    uncond_tensors: dict
    sample_cond: dict
    distill_config: Any
    base_model: str

    @property
    def dataset(self):
        return EncodedRows(self.encoded, self.uncond_tensors)


def prepare(config: TrainConfig, accelerator) -> Prepared:
    """Load the teacher, encode the dataset once (main process first) and the sample / unconditional prompts."""
    import torch
    from tqdm.auto import tqdm

    from training import data

    main_process = accelerator.is_main_process

    # -- model --
    if config.random_tiny:
        folder = tiny_model_folder(config)
        with accelerator.main_process_first():
            build_tiny_pipeline(folder, config.tiny_seed)
        base_model = "random_tiny"
    else:
        folder = config.model_path
        base_model = str(config.model_path.resolve())
    spec = data.DataSpec(
        path=config.data_path, kind=config.data_kind, captions=config.captions, image_column=config.image_column,
        text_column=config.text_column, split=config.split, resolution=config.resolution, max_items=config.max_items,
    )
    model_key = f"{config.backbone}|{model_identity(folder)}|{config.mixed_precision}"  # bf16 runs encode in bf16
    cache_file = data.cache_path(spec, model_key, config.cache_dir)
    if not cache_file.is_file():
        data.verify_items(data.list_items(spec))  # empty / missing captions / broken files: fail before loading a model

    weight_dtype = weight_dtype_for(config.mixed_precision)
    teacher = TeacherModel(folder, config.backbone, config.resolution, accelerator.device, weight_dtype)
    distill_config = distill_config_for(config)
    recipe = distill_config.recipe()
    sample_prompts = config.sample_prompts

    # -- data: encode once (main process first; the other ranks then read the cache) --
    cache_dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    with accelerator.main_process_first():
        encoded = data.encode_dataset(
            spec, teacher.encode_images, teacher.encode_prompts, model_key, config.cache_dir,
            batch_size=config.encode_batch_size, dtype=cache_dtype,
            progress=(lambda chunks: tqdm(chunks, desc="encoding dataset", disable=not main_process)),
        )
        if sample_prompts is None:
            sample_prompts = encoded.captions[:4]
        uncond_tensors = teacher.unconditional(  # {} for SDXL-style zeros (built from each batch)
            recipe.uncond,
            lambda prompts: data.encode_prompts_cached(prompts, teacher.encode_prompts, model_key, config.cache_dir, cache_dtype),
        )
        sample_cond = data.encode_prompts_cached(sample_prompts, teacher.encode_prompts, model_key, config.cache_dir, cache_dtype)
    teacher.release_text_encoders()
    teacher.sample_latent_shape = tuple(encoded.latents.shape[1:])
    return Prepared(teacher, encoded, uncond_tensors, sample_cond, distill_config, base_model)


def run(config: TrainConfig, resume: str | None, dump_rank_lora: bool, allow_changes: bool = False) -> int:
    """Train; returns the process exit code (0 done, 130 stopped by a signal after checkpointing).
    Raises NonFiniteError (main: exit EXIT_NON_FINITE), ConfigError / DataError / OutputLockedError (exit 2).

    The session's main process holds output_dir's lock for the whole run (a second run on it refuses, naming this
    one) and, holding it, first removes the temporaries a killed run left behind.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from flash_core.checkpoints import CheckpointError, CheckpointStore
    from flash_core.run import ResumeMismatchError
    from flash_core.session import Processes, TrainingSession
    from flash_core.target_cache import TargetCacheError

    existing = CheckpointStore(checkpoint_root(config)).list()
    resume_folder = find_resume_checkpoint(config, resume) if resume else None
    if resume_folder is None and existing:
        raise ConfigError(
            f"{checkpoint_root(config)} already holds checkpoints: pass --resume to continue that run, or choose another output_dir"
        )

    accelerator = Accelerator(mixed_precision="no")  # the trainer does its own bf16 autocast
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(
            f"flash-distill trains data-parallel (LoRA + discriminator head are small, the teacher is shared); "
            f"launch without {accelerator.distributed_type.name} (e.g. `accelerate launch --multi_gpu ...`)"
        )
    main_process = accelerator.is_main_process
    set_seed(config.seed)  # the same LoRA and discriminator init on every rank

    prepared = prepare(config, accelerator)
    losses_path = config.output_dir / "losses.jsonl"
    stop = StopRequest()
    hooks = CliHooks(config, accelerator, None, stop, losses_path)
    session = TrainingSession(
        prepared.teacher.denoiser, prepared.distill_config, prepared.dataset,
        output=config.output_dir, output_label=f"flash-distill --config {config.source}",
        checkpoints=checkpoint_root(config), keep_checkpoints=config.keep_checkpoints,
        checkpoint_every=config.checkpoint_every,
        preview=preview_spec(config, prepared.teacher, prepared.sample_cond, prepared.uncond_tensors) if config.sample_every else None,
        preview_every=config.sample_every, hooks=hooks,
        settings={"base_model": prepared.base_model, "resolution": config.resolution},
        fresh_hint=f"Start fresh with another output_dir (or delete {checkpoint_root(config)}), or pass --allow-changes "
                   "to continue anyway.",
        device=accelerator.device,
        processes=Processes(accelerator.process_index, accelerator.num_processes, backward=accelerator.backward,
                            reduce_gradients=GradientAverager(accelerator), barrier=accelerator.wait_for_everyone),
    )
    with session:
        if config.target_cache is not None:
            try:
                session.targets(config.target_cache, build=False)
            except TargetCacheError as error:
                raise ConfigError(f"target_cache: {error}") from None
        try:
            differences = session.start(resume=resume_folder, allow_changes=allow_changes)
        except (ResumeMismatchError, CheckpointError) as error:
            raise ConfigError(f"--resume: {error}") from None
        if resume_folder is not None and main_process:
            truncate_losses(losses_path, session.step)
            for difference in differences:
                print(f"flash-distill: warning: continuing despite a changed {difference} (--allow-changes)", file=sys.stderr)
            print(f"flash-distill: resumed from {resume_folder} at step {session.step}", file=sys.stderr)
        elif main_process:
            import yaml

            write_text_atomic(config.output_dir / "config.yaml", yaml.safe_dump(config.raw, sort_keys=False))

        progress = hooks.progress = tqdm(total=config.total_steps, initial=session.step, desc="flash-distill",
                                         disable=not main_process, dynamic_ncols=True)
        stop.install()  # from here on, Ctrl-C means: finish the step, checkpoint, exit 130
        try:
            status = session.train()
        finally:
            progress.close()
            stop.restore()
        if status == "stopped":
            if main_process:
                print(f"flash-distill: stopped at step {session.step}; checkpoint {session.store.last_saved}. "
                      "Continue with --resume.", file=sys.stderr)
            return EXIT_INTERRUPTED

        if dump_rank_lora:  # test/debug mode: every rank writes the LoRA it holds
            from safetensors.torch import save_file

            dump = config.output_dir / "debug" / f"lora-rank{accelerator.process_index}.safetensors"
            lora = {k: v.contiguous() for k, v in session.distiller.lora_state_dict().items()}
            write_atomic(dump, lambda tmp: save_file(lora, tmp))
        if main_process:
            for kind, path in export_lora(config, session, prepared.base_model).items():
                print(f"flash-distill: exported {kind} LoRA to {path}", file=sys.stderr)
        accelerator.wait_for_everyone()
    return 0
