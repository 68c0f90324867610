"""The training loop: Run drives FlashDistiller.train_step from the first or a resumed step to the last.

flash_core.session.TrainingSession builds a Run (front ends never do) and owns what surrounds it: lock,
identities, student, target cache, previews, checkpoint folder, export. Run owns:

* the loop (`Run.train`): the batch order of flash_core.batches (`batch_indices(seed, step, ...)`, a function of
  (seed, step, process) only, so a resumed run draws exactly the rows the uninterrupted one would), the phase
  schedule of FlashDistiller, and the hooks `RunHooks` for progress, preview images, cancel (an exception raised
  by a hook after a finished step) and stop requests;
* the non-finite guard: a non-finite loss, gradient, training latent or prompt embedding stops the run with
  `NonFiniteError` (step, what, likely cause) *before* the optimiser step is applied; nothing of that step is saved;
* the cancel-safe region: an exception inside a step (rolled back to the state before it) or inside its preview
  or report (the step is kept) saves a checkpoint of the last finished step before it propagates;
* the resume contract (`Run.resume`): settings (`run_settings`), teacher identity (flash_core.fingerprints:
  weights, prediction type, schedule, every patch) and data identity must match, else `ResumeMismatchError`
  lists every difference and how to start fresh (`allow_changes=True` continues anyway).
Checkpoints are flash_core.checkpoints' format, previews flash_core.preview's rule.

API:
    run_settings(config, **extra) -> dict                # the settings a checkpoint stores and resume compares
    RunHooks: on_step(report: StepReport), should_stop() -> bool
    Run(distiller, dataset, settings, *, store=None, hooks=None, preview=None, preview_every=0,
        checkpoint_every=0, process_index=0, num_processes=1, teacher_fingerprint=None, dataset_fingerprint=None,
        fresh_hint=..., rollback_on=(), target_cache=None)   # target_cache: flash_core.target_cache.TargetCache
        .resume(folder, allow_changes=False)  .train() -> "done" | "stopped"   .history: list[dict]
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flash_core.batches import Dataset, batch_indices
from flash_core.checkpoints import (
    CHECKPOINT_PREFIX,
    META_FILE,
    CheckpointError,
    CheckpointStore,
)
from flash_core.distill import DistillConfig, FlashDistiller
from flash_core.draws import prompt_pair_record
from flash_core.fingerprints import conditioning_tensors, teacher_fingerprint
from flash_core.preview import Preview, preview_due
from flash_core.recipes import Recipe
from flash_core.target_cache import TargetCacheError, cache_manifest

TIMING_KEYS = ("teacher_s", "student_s", "discriminator_s", "dmd_s", "step_s")
# Run settings that may change on resume: how the run is computed, not what it trains.
FREE_SETTINGS = ("mixed_precision", "grad_checkpointing")
# Settings newer than some checkpoints: a checkpoint without one was made with this value (what its run did).
ADDED_SETTINGS = {"ema_decay": 0.0}


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



# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


def _plain(value):
    """Tuples -> lists (what a checkpoint round trip gives back), recursively."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def run_settings(config: DistillConfig, recipe: Recipe | None = None, **extra) -> dict[str, Any]:
    """What a checkpoint stores and a resume compares: the config with the recipe's values filled in (`recipe`:
    config.recipe() when already resolved)."""
    recipe = recipe if recipe is not None else config.recipe()
    settings = {k: _plain(v) for k, v in asdict(config).items()}
    settings.update(
        batch_size=recipe.batch_size, lora_rank=recipe.lora_rank, lora_alpha=_plain(recipe.lora_alpha),
        lora_targets=list(recipe.lora_targets), lr=recipe.lr, guidance_range=list(recipe.guidance_range),
        teacher_grid_steps=recipe.teacher_grid_steps, distill_weights=list(recipe.distill_weights),
        adversarial_weights=list(recipe.adversarial_weights), dmd_weights=list(recipe.dmd_weights),
    )
    settings.update(prompt_pair_record(config.guidance_mode))
    settings.update({k: _plain(v) for k, v in extra.items()})
    return settings


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
    num_phases: int = 1  # the recipe's training phases (logs["phase"] counts from 0)


class RunHooks:
    """Override to follow a run. on_step runs after every finished step on every process; an exception it
    raises (ComfyUI's Cancel) saves a checkpoint of that step (single process) and propagates. should_stop -> True saves a
    checkpoint and ends the run with "stopped" (multi-process: return the same answer on every process)."""

    def on_step(self, report: StepReport) -> None:
        pass

    def should_stop(self) -> bool:
        return False


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
        saved, now = {**ADDED_SETTINGS, **state.get("settings", {})}, self.settings
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

    def train(self, stop_at: int | None = None) -> str:
        """Train to total_steps (or to iteration `stop_at`, without a final checkpoint: benchmarks time a slice);
        returns "done" or "stopped" (should_stop). Raises NonFiniteError (nothing saved for that step) and whatever
        a hook raises (after a checkpoint of the finished step)."""
        distiller, dataset, total = self.distiller, self.dataset, self.total_steps
        until = total if stop_at is None else min(total, stop_at)
        batch_size = distiller.recipe.batch_size
        start_step, started = distiller.step, time.perf_counter()
        while distiller.step < until:
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
                report = StepReport(done, total, logs, rate, image, distiller.recipe.num_phases)
                self.hooks.on_step(report)  # log line before the checkpoint
            except BaseException:
                if self.num_processes == 1:  # (a collective save cannot run on one process alone)
                    self._checkpoint()  # a cancel: the state after the last finished step
                raise
            if self.checkpoint_every and done % self.checkpoint_every == 0 and done < total:
                self._checkpoint()
            if self.hooks.should_stop():
                self._checkpoint()
                return "stopped"
        if distiller.step > start_step and until == total:
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


__all__ = [
    "CheckpointError",
    "NonFiniteError",
    "ResumeMismatchError",
    "Run",
    "RunHooks",
    "StepReport",
    "run_settings",
]
