"""One Flash training run: the loop over FlashDistiller.train_step and everything around it.

The ComfyUI node (nodes/training.py), the CLI (training/cli/), the digits benchmark and bench/ all drive
this module; none keeps a loop of its own. It owns:

* the loop's use of the batch order (flash_core.batches: `batch_indices(seed, step, ...)`, a function of (seed,
  step, process) only, so a resumed run draws exactly the rows the uninterrupted one would) and of the
  identities a resume compares (flash_core.fingerprints: teacher and data);
* the loop (`Run.train`), with the phase schedule of FlashDistiller and the hooks `RunHooks` for progress,
  preview images, cancel (an exception raised by a hook after a finished step) and stop requests;
* the non-finite guard: a non-finite loss, gradient or training latent stops the run with `NonFiniteError`
  (step, what, likely cause) *before* the optimiser step is applied; nothing of that step is saved;
* ONE checkpoint format (`CheckpointStore`): a folder `step-000500/` with `state.flashckpt` (weights_only-loadable:
  run settings, fingerprints, trainer state, step log), `rank-<r>.flashckpt` per process (RNG states) and
  `meta.json` (written last: the completeness marker), a `latest` file, the last `keep` checkpoints kept;
* the resume contract (`Run.resume`): settings, teacher fingerprint (every tensor of the network the trainer
  uses, patches applied upstream included) and dataset fingerprint must match, else `ResumeMismatchError`
  lists every difference and how to start fresh (`allow_changes=True` continues anyway);
* the preview rule (`Preview`, `preview_due`): teacher (K-step CFG solve) | student at 1 / 2 / 4 steps, one
  column per prompt, the same noise for every row (CPU generator seeded with `seed`, student re-noise with
  `seed + steps`); pixels come from a `decode` callback (ComfyUI VAE / latent2rgb, diffusers VAE);
* the export (`lora_modules`, `lora_metadata`; the files themselves: lora_formats.build_lora_export): ONE metadata schema for every LoRA the pack
  writes (kohya `ss_*` keys + `flash.*` keys) and ONE dtype policy, float32 (`EXPORT_DTYPE`): the file holds
  exactly the trained weights; ComfyUI / diffusers cast to the model's dtype when they apply it. Module
  paths are diffusers' (the node maps ComfyUI's LDM paths), so node and CLI write the same file.

API:
    batch_indices(seed, step, num_items, batch_size, rank=0, num_processes=1) -> list[int]
    TensorDataset(latents, cond, uncond)                 # .batch(indices, step) -> Batch, .fingerprint()
    teacher_fingerprint(denoiser) / tensor_fingerprint(tensors)
    run_settings(config, **extra) -> dict                # the settings a checkpoint stores and resume compares
    Preview(distiller, cond, uncond, latent_shape, seed, guidance, teacher_sample_steps, decode, sample_steps=(1, 2, 4))
        .rows() -> [(label, images [n, H, W, 3] in 0..1)]   .image() -> uint8 [H, W, 3] (flash_core.grid)
    RunHooks: on_step(report: StepReport), should_stop() -> bool
    CheckpointStore(root, keep=2, process_index=0, num_processes=1, barrier=None)
        .latest() / .list() / .save(run) / .load(folder)
    Run(distiller, dataset, settings, *, store=None, hooks=None, preview=None, preview_every=0,
        checkpoint_every=0, process_index=0, num_processes=1, teacher_fingerprint=None, dataset_fingerprint=None,
        fresh_hint=..., rollback_on=(), target_cache=None)   # target_cache: flash_core.target_cache.TargetCache
        .resume(folder, allow_changes=False)  .train() -> "done" | "stopped"   .history: list[dict]
    lora_modules(distiller) / lora_metadata(...)    # then lora_formats.build_lora_export(...)
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flash_core import lora_formats
from flash_core.backbones import get_backbone
from flash_core.denoiser import Conditioning
from flash_core.distill import Batch, DistillConfig, FlashDistiller, teacher_target
from flash_core.batches import Dataset, TensorDataset, batch_indices
from flash_core.files import TEMP_PREFIX, replace_folder_atomic, torch_save_atomic, write_text_atomic
from flash_core.fingerprints import conditioning_tensors, teacher_fingerprint, tensor_fingerprint
from flash_core.grid import grid_image
from flash_core.lora_formats.metadata import RECOMMENDED_CFG
from flash_core.schedules import flow_sigmas, trailing_timesteps

CHECKPOINT_FORMAT = "flash-run-checkpoint"
CHECKPOINT_VERSION = 3  # 3: counter-based training draws (no generator states)
CHECKPOINT_PREFIX = "step-"
LATEST_FILE = "latest"
# Checkpoint files carry an extension no ComfyUI model folder lists (.pt / .ckpt would put a training state in every
# LoRA dropdown); checkpoints of earlier versions (.pt) are still read.
CHECKPOINT_SUFFIX = ".flashckpt"
STATE_FILE = f"state{CHECKPOINT_SUFFIX}"
LEGACY_SUFFIX = ".pt"
META_FILE = "meta.json"
EXPORT_DTYPE = torch.float32  # every LoRA file the pack writes (see the module docstring)
PREVIEW_STEPS = (1, 2, 4)
TIMING_KEYS = ("teacher_s", "student_s", "discriminator_s", "dmd_s", "step_s")
RANK_KEYS = ("torch_rng", "python_random", "cuda_rng")
# Run settings that may change on resume: how the run is computed, not what it trains.
FREE_SETTINGS = ("mixed_precision", "grad_checkpointing")


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient or training latent: the run stopped before the optimiser step was applied."""

    def __init__(self, step: int, what: str, cause: str, saved: str | None = None):
        self.step, self.what = step, what
        kept = f"the last good checkpoint ({saved}) and any LoRA file are untouched" if saved else \
            "no checkpoint or LoRA file was written for this run"
        super().__init__(
            f"training stopped at step {step}: {what} is not finite (NaN or inf). Likely cause: {cause}. "
            f"Nothing of step {step} was applied or saved; {kept}."
        )


class ResumeMismatchError(ValueError):
    """The checkpoint was made by another run (settings, teacher or data differ)."""

    def __init__(self, folder: str | os.PathLike, differences: list[str], fresh_hint: str):
        self.differences = differences
        super().__init__(
            f"cannot resume from {folder}: the checkpoint was made with other settings, teacher or data "
            f"({'; '.join(differences)}). {fresh_hint}"
        )


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (corrupt, another format or version, another number of processes)."""


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


def _plain(value):
    """Tuples -> lists (what a checkpoint round trip gives back), recursively."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def run_settings(config: DistillConfig, **extra) -> dict[str, Any]:
    """What a checkpoint stores and a resume compares: the config with the recipe's values filled in."""
    recipe = config.recipe()
    settings = {k: _plain(v) for k, v in asdict(config).items()}
    settings.update(
        batch_size=recipe.batch_size, lora_rank=recipe.lora_rank, lora_alpha=_plain(recipe.lora_alpha),
        lora_targets=list(recipe.lora_targets), lr=recipe.lr, guidance_range=list(recipe.guidance_range),
        teacher_grid_steps=recipe.teacher_grid_steps, distill_weights=list(recipe.distill_weights),
        adversarial_weights=list(recipe.adversarial_weights), dmd_weights=list(recipe.dmd_weights),
    )
    settings.update({k: _plain(v) for k, v in extra.items()})
    return settings


# --------------------------------------------------------------------------------------------------
# Preview
# --------------------------------------------------------------------------------------------------


def preview_due(step: int, total: int, every: int) -> bool:
    """A preview after every `every` steps and after the last one (0 = never)."""
    return bool(every) and (step % every == 0 or step == total)


class Preview:
    """Teacher (DPM-Solver++ with CFG from the same noise, `teacher_sample_steps` steps: K in the node) | student
    at each of `sample_steps` (1 / 2 / 4) sampling steps, one column per prompt. decode(latents [n, C, h, w],
    model space) -> images [n, H, W, 3] in 0..1 (CPU)."""

    def __init__(self, distiller: FlashDistiller, cond: Conditioning, uncond: Conditioning, latent_shape: Sequence[int],
                 seed: int, guidance: float, teacher_sample_steps: int, decode: Callable[[Tensor], Tensor],
                 sample_steps: Sequence[int] = PREVIEW_STEPS):
        self.distiller, self.decode = distiller, decode
        self.cond, self.uncond = cond, uncond.expand_to(cond.batch_size) if uncond.batch_size == 1 else uncond
        generator = torch.Generator().manual_seed(seed)
        self.noise = torch.randn((cond.batch_size, *latent_shape), generator=generator)  # the same noise for every row
        self.seed, self.guidance, self.teacher_sample_steps = seed, guidance, teacher_sample_steps
        self.sample_steps = tuple(sample_steps)
        self._teacher: Tensor | None = None

    def teacher_images(self) -> Tensor:
        if self._teacher is None:
            distiller = self.distiller
            den, device = distiller.denoiser, distiller.device
            with torch.no_grad(), den.teacher():
                x0 = teacher_target(den, self.noise.to(device), 0, self.cond.to(device), self.uncond.to(device),
                                    self.guidance, self.teacher_sample_steps)
            self._teacher = self.decode(x0)
        return self._teacher

    def student_latents(self, steps: int) -> Tensor:
        generator = torch.Generator(self.distiller.device).manual_seed(self.seed + steps)
        return self.distiller.student_sample(self.noise, self.cond, steps, generator=generator)

    def rows(self) -> list[tuple[str, Tensor]]:
        with torch.random.fork_rng(devices=[]):  # previews never change the training's random stream
            rows = [(f"teacher\nK={self.teacher_sample_steps}\ncfg {self.guidance:g}", self.teacher_images())]
            for steps in self.sample_steps:
                rows.append((f"student\n{steps} step{'s' if steps > 1 else ''}", self.decode(self.student_latents(steps))))
        return rows

    def image(self) -> np.ndarray:
        return grid_image(self.rows())


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------


@dataclass
class StepReport:
    step: int  # optimiser steps done
    total: int
    logs: dict[str, float]  # losses, phase, timings of this step (this process)
    seconds_per_step: float  # mean over this session's steps
    preview: np.ndarray | None = None  # uint8 [H, W, 3] when a preview was due


class RunHooks:
    """Override to follow a run. on_step runs after every finished step on every process; an exception it
    raises (ComfyUI's Cancel) saves a checkpoint of that step (single process) and propagates. should_stop -> True saves a
    checkpoint and ends the run with "stopped" (multi-process: return the same answer on every process)."""

    def on_step(self, report: StepReport) -> None:
        pass

    def should_stop(self) -> bool:
        return False


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def rank_file_name(process_index: int, suffix: str = CHECKPOINT_SUFFIX) -> str:
    """One process's file of a checkpoint (its RNG states)."""
    return f"rank-{process_index}{suffix}"


def _step_of(folder: Path) -> int:
    return int(folder.name[len(CHECKPOINT_PREFIX):])


class CheckpointStore:
    """root/step-000500/{state.flashckpt, rank-<r>.flashckpt, meta.json}, root/latest. Every file is written atomically into a
    staging folder that is renamed when complete; meta.json marks a complete checkpoint. After a save, the
    `keep` newest checkpoints up to the saved step stay; checkpoints of later steps (an abandoned run that went
    further before a fresh start) are removed once the new run has one."""

    def __init__(self, root: str | os.PathLike, keep: int = 2, process_index: int = 0, num_processes: int = 1,
                 barrier: Callable[[], None] | None = None):
        self.root, self.keep = Path(root), max(1, keep)
        self.process_index, self.num_processes = process_index, num_processes
        self.barrier = barrier or (lambda: None)
        self.last_saved: Path | None = None

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    def list(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                 and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / META_FILE).is_file()]
        return sorted(found, key=_step_of)

    def latest(self) -> Path | None:
        marker = self.root / LATEST_FILE
        if marker.is_file():
            folder = self.root / marker.read_text(encoding="utf-8").strip()
            if (folder / META_FILE).is_file():
                return folder
        found = self.list()
        return found[-1] if found else None

    def save(self, run: Run) -> Path:
        """Every process calls this at the same step (collective when num_processes > 1)."""
        step = run.distiller.step
        name = f"{CHECKPOINT_PREFIX}{step:06d}"
        final, staging = self.root / name, self.root / f"{TEMP_PREFIX}{name}"  # a killed save leaves an orphan
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.barrier()
        state = run.distiller.state_dict()
        rank_state = {key: state.pop(key) for key in RANK_KEYS if key in state}
        torch_save_atomic(rank_state, staging / rank_file_name(self.process_index))
        if self.is_main:
            torch_save_atomic({
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
                "settings": run.settings, "fingerprints": run.fingerprints, "history": run.history,
                "num_processes": self.num_processes, "distiller": state,
            }, staging / STATE_FILE)
        self.barrier()
        if self.is_main:
            meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
                    "phase": run.distiller.phase, "num_processes": self.num_processes, "settings": run.settings}
            write_text_atomic(staging / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
            replace_folder_atomic(staging, final)
            write_text_atomic(self.root / LATEST_FILE, name + "\n")
            self._prune(step)
        self.barrier()
        self.last_saved = final
        return final

    def _prune(self, step: int) -> None:
        found = self.list()
        keep = [p for p in found if _step_of(p) <= step][-self.keep:]
        for old in found:
            if old not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def later_than(self, step: int, folder: Path | None = None) -> list[Path]:
        """The complete checkpoints in this store of steps after `step` (other than `folder`)."""
        return [p for p in self.list() if _step_of(p) > step and (folder is None or p.resolve() != folder.resolve())]

    def _refuse_going_back(self, folder: Path, step: int) -> None:
        """Resuming from a checkpoint older than ones this store holds would replace them (each later step is saved
        again under the same name, the rest pruned) and, at the end, the exported LoRA: refused, whatever else is
        allowed (--allow-changes included), until the user says so by deleting them (or resumes elsewhere)."""
        later = self.later_than(step, folder)
        if later:
            names = ", ".join(p.name for p in later)
            raise CheckpointError(
                f"{folder} is step {step}, but {self.root} holds later checkpoints ({names}): continuing from step "
                f"{step} would replace them as the run passes their steps, and at its end the exported LoRA. To go "
                f"back to step {step}, delete {names} first; to keep them, copy {folder} into the checkpoints folder "
                "of another output and resume there"
            )

    def load(self, folder: str | os.PathLike) -> dict:
        """The checkpoint's state with this process's RNG states merged in (weights_only: no arbitrary objects)."""
        folder = Path(folder)
        suffix = CHECKPOINT_SUFFIX if (folder / STATE_FILE).is_file() or not (folder / f"state{LEGACY_SUFFIX}").is_file() else LEGACY_SUFFIX
        try:
            state = torch.load(folder / f"state{suffix}", map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"{folder} is not a checkpoint of this version (no {STATE_FILE}); start fresh") from None
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
            raise CheckpointError(f"the checkpoint {folder / STATE_FILE} cannot be read ({err}); delete it or start fresh") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"{folder} is not a version-{CHECKPOINT_VERSION} Flash checkpoint; delete it or start fresh")
        self._refuse_going_back(folder, int(state.get("step", 0)))
        rank_file = folder / rank_file_name(self.process_index, suffix)
        if state.get("num_processes", 1) != self.num_processes or not rank_file.is_file():
            raise CheckpointError(
                f"{folder} was saved by {state.get('num_processes')} processes, this run has {self.num_processes}; "
                "resume with the same number of processes"
            )
        state["distiller"].update(torch.load(rank_file, map_location="cpu", weights_only=True))
        return state


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


PROMPT_CAUSE = ("NaN / inf in the conditioning (a broken text encoder, or a NaN CONDITIONING upstream: re-encode "
                "these prompts)")
LIKELY_CAUSES = (
    "the learning rate is too high (lr {lr:g}: try 10x lower)",
    "bad training latents (NaN / inf in the data: re-encode the images)",
    "bf16 overflow (train with mixed_precision off / fp32)",
)


class Run:
    """One training run of `distiller` on `dataset` (see the module docstring)."""

    def __init__(self, distiller: FlashDistiller, dataset: Dataset, settings: Mapping[str, Any] | None = None, *,
                 store: CheckpointStore | None = None, hooks: RunHooks | None = None, preview: Preview | None = None,
                 preview_every: int = 0, checkpoint_every: int = 0, process_index: int = 0, num_processes: int = 1,
                 teacher_fingerprint: str | None = None, dataset_fingerprint: str | None = None,
                 fresh_hint: str = "Start fresh (without resume) or use another output.",
                 rollback_on: tuple[type[BaseException], ...] = (), target_cache=None):
        self.distiller, self.dataset = distiller, dataset
        self.config = distiller.config
        self.settings = dict(settings) if settings is not None else run_settings(distiller.config)
        self.settings.setdefault("num_processes", num_processes)
        self.store, self.hooks, self.preview = store, hooks or RunHooks(), preview
        self.preview_every, self.checkpoint_every = preview_every, checkpoint_every
        self.process_index, self.num_processes = process_index, num_processes
        self.fresh_hint = fresh_hint
        # Exceptions that may interrupt a step midway (ComfyUI checks Cancel inside every op): the state before
        # the step is kept in memory, restored and checkpointed when one is raised (costs a copy per step).
        self.rollback_on = tuple(rollback_on)
        self.fingerprints = {
            "teacher": teacher_fingerprint if teacher_fingerprint is not None else _teacher_fingerprint(distiller.denoiser),
            "data": dataset_fingerprint if dataset_fingerprint is not None else dataset.fingerprint(),
        }
        # Precomputed teacher targets (flash_core.target_cache): built for exactly this run's target settings,
        # teacher, data and processes, and complete, else TargetCacheMismatchError / TargetCacheError here.
        self.target_cache = target_cache
        if target_cache is not None:
            from flash_core.target_cache import cache_manifest

            target_cache.check(cache_manifest(self.config, self.fingerprints["teacher"], self.fingerprints["data"], num_processes))
        distiller.target_cache = target_cache
        self.history: list[dict[str, float]] = []
        self.resumed_from: Path | None = None
        self._current_step = 0
        self._latents_finite = self._prompts_finite = True
        for optimizer, what in ((distiller.student_optimizer, "a LoRA gradient"),
                                (distiller.discriminator_optimizer, "a discriminator-head gradient")):
            _unwrap_optimizer(optimizer).register_step_pre_hook(self._guard(what))

    @property
    def total_steps(self) -> int:
        return self.config.total_steps

    # ---- the non-finite guard ----
    def _cause(self) -> str:
        lr, latents = self.distiller.recipe.lr, self._latents_finite
        causes = [c.format(lr=lr) for c in LIKELY_CAUSES]
        if not latents:
            return f"this step's training latents contain NaN / inf ({causes[1]})"
        if self.config.mixed_precision != "bf16":
            causes = causes[:2]
        return "; or ".join(causes)

    def _saved(self) -> str | None:
        if self.store is None:
            return None
        latest = self.store.last_saved or self.store.latest()
        return str(latest) if latest is not None else None

    def _guard(self, what: str):
        def check(optimizer, args, kwargs):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            bad_grads = bool(grads) and not bool(torch.stack([g.detach().float().norm() for g in grads]).isfinite().all())
            # one decision for every process (a rank-local stop leaves the others waiting in a collective)
            bad_grads, bad_latents, bad_prompts = self._on_any_process(
                bad_grads, not self._latents_finite, not self._prompts_finite)
            if bad_grads or bad_latents or bad_prompts:
                self._latents_finite = not bad_latents
                if bad_prompts and not bad_latents:
                    what_, cause = "the prompt embeddings (of a process)", PROMPT_CAUSE
                else:
                    what_, cause = ("the training latents (of a process)" if bad_latents else what), self._cause()
                raise NonFiniteError(self._current_step, what_, cause, self._saved())
        return check

    def _on_any_process(self, *flags: bool) -> tuple[bool, ...]:
        """`flags` OR-ed over every process of a multi-process run (one all-reduce): the same on all of them."""
        import torch.distributed as dist

        if self.num_processes == 1 or not (dist.is_available() and dist.is_initialized()):
            return flags
        values = torch.tensor([float(f) for f in flags], device=self.distiller.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in values.tolist())

    # ---- resume ----
    def resume(self, folder: str | os.PathLike, allow_changes: bool = False) -> list[str]:
        """Load a checkpoint of this run; differences in settings / teacher / data refuse unless allow_changes.
        Returns the differences (empty when none)."""
        if self.store is None:
            raise ValueError("resume needs a CheckpointStore")
        state = self.store.load(folder)
        differences = self.differences(state)
        if differences and not allow_changes:
            raise ResumeMismatchError(folder, differences, self.fresh_hint)
        try:
            self.distiller.load_state_dict(state["distiller"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{folder} does not fit this student ({err}); start fresh") from None
        self.history = [dict(h) for h in state["history"] if h.get("step", 0) <= self.distiller.step]
        self.resumed_from = Path(folder)
        self.store.last_saved = Path(folder)
        return differences

    def differences(self, state: Mapping[str, Any]) -> list[str]:
        saved, now = state.get("settings", {}), self.settings
        diffs = [f"{key}: checkpoint {saved.get(key)!r}, now {now.get(key)!r}"
                 for key in sorted(set(saved) | set(now)) if key not in FREE_SETTINGS and saved.get(key) != now.get(key)]
        for key, label in (("teacher", "teacher weights (fingerprint of every tensor)"), ("data", "training data")):
            before, after = state.get("fingerprints", {}).get(key), self.fingerprints.get(key)
            if before != after:
                diffs.append(f"{label}: checkpoint {before}, now {after}")
        return diffs

    # ---- the loop ----
    def _snapshot(self) -> dict:
        """The trainer's state before a step, its own copy (optimiser state tensors are updated in place)."""
        state = self.distiller.state_dict()
        for key in ("student_optimizer", "discriminator_optimizer"):
            state[key] = copy.deepcopy(state[key])
        return state

    def _checkpoint(self) -> Path | None:
        if self.store is None:
            return None
        if self.store.last_saved is not None and self.store.last_saved.name == f"{CHECKPOINT_PREFIX}{self.distiller.step:06d}" \
                and (self.store.last_saved / META_FILE).is_file():
            return self.store.last_saved
        return self.store.save(self)

    def train(self) -> str:
        """Train to total_steps; returns "done" or "stopped" (should_stop). Raises NonFiniteError (nothing saved
        for that step) and whatever a hook raises (after a checkpoint of the finished step)."""
        from flash_core.target_cache import TargetCacheError  # (imported here, as cache_manifest is)
        distiller, dataset, total = self.distiller, self.dataset, self.total_steps
        batch_size = distiller.recipe.batch_size
        start_step, started = distiller.step, time.perf_counter()
        while distiller.step < total:
            step = distiller.step
            self._current_step = step + 1
            indices = batch_indices(self.config.seed, step, len(dataset), batch_size, self.process_index, self.num_processes)
            batch = dataset.batch(indices, step)
            self._latents_finite = bool(torch.isfinite(batch.latents).all())
            if not self._latents_finite and self.num_processes == 1:
                raise NonFiniteError(step + 1, f"the training latents (dataset rows {list(indices)})",
                                     "bad training latents (NaN / inf in the data: re-encode these images)", self._saved())
            self._prompts_finite = all(bool(torch.isfinite(t).all()) for _, t in
                                       conditioning_tensors("cond", batch.cond) + conditioning_tensors("uncond", batch.uncond))
            if not self._prompts_finite and self.num_processes == 1:  # not the learning rate's fault: say so
                raise NonFiniteError(step + 1, f"the prompt embeddings (dataset rows {list(indices)}, or the unconditional)",
                                     PROMPT_CAUSE, self._saved())
            begin = time.perf_counter()
            snapshot = self._snapshot() if self.rollback_on else None
            try:
                logs = distiller.train_step(batch)
            except self.rollback_on:  # e.g. ComfyUI's Cancel, raised inside a forward pass: undo the half step
                distiller.load_state_dict(snapshot)
                if self.num_processes == 1:
                    self._checkpoint()
                raise
            except TargetCacheError as err:  # raised before anything of the step is applied (the target is read first)
                saved = self._checkpoint() if self.num_processes == 1 and step > 0 else None  # the finished steps
                kept = f"; steps 1-{step} are in the checkpoint {saved}: resume from it" if saved is not None else ""
                raise TargetCacheError(f"{err}. Training stopped before step {step + 1}{kept}") from err
            except FloatingPointError as err:  # FlashDistiller found its loss non-finite before the update
                raise NonFiniteError(step + 1, "the student's loss", self._cause(), self._saved()) from err
            logs["step_s"] = time.perf_counter() - begin
            bad = [k for k, v in logs.items() if k.startswith("loss") and not math.isfinite(v)]
            if bad:  # the step was applied in memory; it is never saved
                raise NonFiniteError(step + 1, f"the loss '{bad[0]}'", self._cause(), self._saved())
            done = distiller.step
            self.history.append({"step": done, **logs})
            rate = (time.perf_counter() - started) / max(1, done - start_step)
            try:  # the step is finished: a Cancel (or any exception) in its preview or its report keeps it
                due = self.preview is not None and preview_due(done, total, self.preview_every)
                image = self.preview.image() if due else None  # teacher solve, student samples, decode: any may raise
                self.hooks.on_step(StepReport(done, total, logs, rate, image))  # log line before the checkpoint
            except BaseException:
                if self.num_processes == 1:  # (a collective save cannot run on one process alone)
                    self._checkpoint()  # a cancel: the state after the last finished step
                raise
            if self.checkpoint_every and done % self.checkpoint_every == 0 and done < total:
                self._checkpoint()
            if self.hooks.should_stop():
                self._checkpoint()
                return "stopped"
        if distiller.step > start_step:
            self._checkpoint()
        return "done"

    def loss_map(self) -> dict[str, list[float]]:
        """Loss name -> one value per iteration (ComfyUI's LOSS_MAP, plotted against the node's steps); with
        alternating updates a discriminator iteration repeats the student's latest losses and the reverse."""
        keys = sorted({k for h in self.history for k in h if k.startswith("loss")})
        return {k: [float(h[k]) for h in self.history if k in h] for k in keys}


_teacher_fingerprint = teacher_fingerprint  # Run's keyword argument of the same name shadows it


def _unwrap_optimizer(optimizer):
    """The torch optimizer inside an accelerate AcceleratedOptimizer."""
    return getattr(optimizer, "optimizer", optimizer)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------

EXPORT_KINDS = ("comfyui", "diffusers", "peft")


def lora_modules(distiller: FlashDistiller) -> list[lora_formats.LoraModule]:
    """The student's LoRA as lora_formats modules, in EXPORT_DTYPE, under the denoiser's diffusers module paths
    (Denoiser.lora_path: ComfyDenoiser maps ComfyUI's LDM paths), so every front end writes the same names."""
    tensors = {k: v.detach().to("cpu", EXPORT_DTYPE) for k, v in distiller.lora_state_dict().items()}
    modules = lora_formats.modules_from_peft_state_dict(tensors, distiller.recipe.lora_alpha)
    paths = {m.path: distiller.denoiser.lora_path(m.path) for m in modules}
    return modules if all(old == new for old, new in paths.items()) else lora_formats.rename_modules(modules, paths)


def sampling_timesteps(distiller: FlashDistiller, steps: int) -> list[int]:
    """The student's `steps`-step sampling grid in model timesteps (trailing DDPM, or flow sigmas * 1000)."""
    if distiller.denoiser.is_flow:
        return [round(1000 * s) for s in flow_sigmas(steps)]
    return trailing_timesteps(steps)


def lora_metadata(distiller: FlashDistiller, settings: Mapping[str, Any], history: Sequence[Mapping[str, float]], *,
                  base_model: str, teacher: str | None = None, recommended_steps: int | None = None,
                  trained_for: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The one metadata schema: kohya's ss_* (LoRA managers show rank / alpha / base) and Flash's flash.* keys.

    `trained_for` is the stack the teacher was (base checkpoint name + sha256, LoRAs with strengths: what
    nodes/stack.describe_stack returns); lora_formats.sampling_settings reads the sampling keys back. `recommended_steps`:
    the sampling steps FlashSampler defaults to (default: the student grid the recipe trains, 4)."""
    recipe = distiller.recipe
    steps = recommended_steps or recipe.student_steps
    losses = [{k: v for k, v in h.items() if k.startswith("loss")} for h in history]
    last = losses[-1] if losses else {}
    window = {k: float(np.mean([h[k] for h in losses[-50:] if k in h])) for k in last}
    backbone = settings.get("backbone", recipe.backbone)
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(recipe.lora_rank),
        "ss_network_alpha": str(recipe.lora_alpha),
        "ss_base_model_version": get_backbone(backbone).base_model_version,
        "ss_steps": str(distiller.step),
        "ss_learning_rate": str(recipe.lr),
        "ss_seed": str(settings.get("seed", "")),
        "flash.format_version": "1",
        "flash.backbone": backbone,
        "flash.base_model": base_model,
        "flash.base_fingerprint": teacher or "",
        "flash.rank": str(recipe.lora_rank),
        "flash.alpha": str(recipe.lora_alpha),
        "flash.trained_steps": str(distiller.step),  # training iterations done (= ss_steps)
        "flash.total_steps": str(settings.get("total_steps", distiller.config.total_steps)),
        "flash.student_steps": str(recipe.student_steps),  # the student grid the timestep mixture sits on
        "flash.timesteps": json.dumps(sampling_timesteps(distiller, steps)),
        "flash.sampling": f"FlashSampler (LCM-style few-step sampling on the trailing grid), {steps} steps, cfg 1",
        "flash.prediction_type": distiller.denoiser.prediction_type,
        "flash.recommended_steps": str(steps),
        "flash.recommended_cfg": f"{RECOMMENDED_CFG:g}",
        "flash.trained_for": json.dumps(dict(trained_for)) if trained_for else "",
        "flash.teacher_grid_steps": str(recipe.teacher_grid_steps),
        "flash.guidance_range": json.dumps(list(recipe.guidance_range)),
        "flash.loss_weights": json.dumps({"distill": list(recipe.distill_weights), "adversarial": list(recipe.adversarial_weights),
                                          "dmd": list(recipe.dmd_weights)}),
        "flash.learning_rate": str(recipe.lr),
        "flash.batch_size": str(recipe.batch_size),
        "flash.dtype": str(EXPORT_DTYPE).removeprefix("torch."),
        "flash.losses_last": json.dumps(last),
        "flash.losses_mean_last_50": json.dumps(window),
    }


__all__ = [
    "EXPORT_DTYPE",
    "Batch",
    "CheckpointError",
    "CheckpointStore",
    "Dataset",
    "NonFiniteError",
    "Preview",
    "ResumeMismatchError",
    "Run",
    "RunHooks",
    "StepReport",
    "TensorDataset",
    "batch_indices",
    "lora_metadata",
    "lora_modules",
    "preview_due",
    "run_settings",
    "teacher_fingerprint",
    "tensor_fingerprint",
]
