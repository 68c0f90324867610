"""One training session, end to end: the one object every front end drives.

FlashDistillTrain (nodes/training.py), `flash-distill` and `flash-distill cache-targets` (training/cli/), the
digits and stack benchmarks (training/digits/) and the bench/ scripts that train all build a TrainingSession and
call it. None of them constructs a FlashDistiller, initialises a LoRA, opens a target cache or takes a lock: those
live here, once. A front end keeps what is its own: reading its inputs, preparing its data (a
flash_core.batches.Dataset of model-space latents and conditioning), its progress display (flash_core.run.RunHooks)
and where its files go.

A session, in order (docs/architecture.md walks one training request through it):
  1. `open()` (or `with session:`): the output lock (one run per output folder; another process that wants it
     is refused, naming the holder) and, holding it, the clean-up of what a killed run left half-written;
  2. identities, computed once: the teacher (weights, prediction type, schedule, every patch:
     flash_core.fingerprints) and the data (`dataset.fingerprint()`);
  3. `targets(folder, build=...)`: the teacher-target cache (flash_core.target_cache), built under its own lock or
     opened, and checked against this run;
  4. `start(resume=...)`: the student: FlashDistiller over the denoiser (the LoRA is added and initialised once,
     in Denoiser.add_lora), the preview, the checkpoint store and the Run, then the resume (its contract:
     flash_core.run);
  5. `train()`: the loop (flash_core.run.Run: cancel-safe steps and previews, checkpoints);
  6. `export(kind)`: the LoRA in the one metadata schema and dtype (flash_core.lora_formats).
The recipe (flash_core.recipes, with the config's overrides: rank -> alpha by recipes.lora_alpha_for_rank) is
resolved once, when the session is made, and every part reads `session.recipe`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from flash_core import files, lora_formats
from flash_core import target_cache as targets
from flash_core.batches import Dataset
from flash_core.checkpoints import CheckpointStore
from flash_core.denoiser import Conditioning, Denoiser
from flash_core.distill import DistillConfig, FlashDistiller
from flash_core.fingerprints import teacher_fingerprint
from flash_core.preview import PREVIEW_STEPS, Preview
from flash_core.run import Run, RunHooks, run_settings


@dataclass
class PreviewSpec:
    """What a front end gives for previews: the prompts (one column each) and how latents become pixels."""

    cond: Conditioning
    uncond: Conditioning
    latent_shape: tuple[int, ...]  # one sample's latent shape [C, h, w]
    decode: Callable[[Tensor], Tensor]  # model-space latents [n, C, h, w] -> images [n, H, W, 3] in 0..1 (CPU)
    guidance: float | None = None  # teacher row's CFG scale; None: the middle of the recipe's guidance range
    teacher_sample_steps: int | None = None  # teacher row's solver steps; None: the recipe's K
    sample_steps: Sequence[int] = PREVIEW_STEPS  # student rows


@dataclass(frozen=True)
class Processes:
    """This process's place in a multi-process run (accelerate) and the collectives the session needs."""

    index: int = 0
    count: int = 1
    backward: Callable[[Tensor], None] | None = None  # accelerator.backward
    reduce_gradients: Callable[[list], None] | None = None  # average the trainables' .grad across processes
    barrier: Callable[[], None] | None = None  # accelerator.wait_for_everyone

    @property
    def is_main(self) -> bool:
        return self.index == 0


class TrainingSession:
    """A Flash training session over `denoiser` (the teacher network; the student is it plus a LoRA) on `dataset`.

    output:       the folder the session locks for its whole life and cleans of orphaned temporaries (None: no lock,
                  for benchmarks that write nothing); `output_label` names the holder in a refusal;
    clean:        more (folder, recursive, stem) to clean of orphaned temporaries while holding the lock;
    checkpoints:  the checkpoint folder (None: no checkpoints, no resume), `keep_checkpoints`, `checkpoint_every`;
    preview:      PreviewSpec (None: no previews), every `preview_every` steps and after the last;
    settings:     extra run settings a checkpoint stores and a resume compares (base_model, resolution ...);
    rollback_on:  exceptions that may interrupt a step midway (ComfyUI's Cancel): the step is undone, a
                  checkpoint of the last finished one kept.
    """

    def __init__(self, denoiser: Denoiser, config: DistillConfig, dataset: Dataset, *,
                 output: str | os.PathLike | None = None, output_label: str = "a Flash training run",
                 clean: Sequence[tuple[str | os.PathLike, bool, str | None]] = (),
                 checkpoints: str | os.PathLike | None = None, keep_checkpoints: int = 2, checkpoint_every: int = 0,
                 preview: PreviewSpec | None = None, preview_every: int = 0, hooks: RunHooks | None = None,
                 settings: Mapping[str, Any] | None = None,
                 fresh_hint: str = "Start fresh (without resume) or use another output.",
                 rollback_on: tuple[type[BaseException], ...] = (), device=None, processes: Processes = Processes()):
        self.denoiser, self.config, self.dataset = denoiser, config, dataset
        self.recipe = config.recipe()  # resolved once: every part of the session reads this one
        self.output, self.output_label, self.clean = output, output_label, tuple(clean)
        self.checkpoint_folder, self.keep_checkpoints = checkpoints, keep_checkpoints
        self.checkpoint_every, self.preview_spec, self.preview_every = checkpoint_every, preview, preview_every
        self.hooks, self.fresh_hint, self.rollback_on = hooks, fresh_hint, tuple(rollback_on)
        self.device, self.processes = device, processes
        self.settings = run_settings(config, recipe=self.recipe, **dict(settings or {}))
        self.target_cache: targets.TargetCache | None = None
        self.distiller: FlashDistiller | None = None
        self.run: Run | None = None
        self.preview: Preview | None = None
        self.store: CheckpointStore | None = None
        self._lock: files.OutputLock | None = None
        self._teacher: str | None = None
        self._data: str | None = None

    # ---- 1. the lock -------------------------------------------------------------------------------
    def open(self) -> TrainingSession:
        """Take the output lock (main process) and remove what a killed run left half-written."""
        if self.output is not None and self.processes.is_main and self._lock is None:
            self._lock = files.OutputLock(self.output, what=self.output_label).acquire()
            files.remove_orphaned_temporaries(self.output)
            for folder, recursive, stem in self.clean:
                files.remove_orphaned_temporaries(folder, recursive=recursive, stem=stem)
        return self

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> TrainingSession:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- 2. identities -----------------------------------------------------------------------------
    @property
    def teacher_fingerprint(self) -> str:
        """The teacher's identity (computed once: it hashes every weight)."""
        if self._teacher is None:
            self._teacher = teacher_fingerprint(self.denoiser)
        return self._teacher

    @property
    def data_fingerprint(self) -> str:
        if self._data is None:
            self._data = self.dataset.fingerprint()
        return self._data

    # ---- 3. the teacher-target cache ----------------------------------------------------------------
    def targets(self, folder: str | os.PathLike, *, build: bool, num_processes: int | None = None,
                teacher_batch: int | None = None, progress: Callable[[int, int], None] | None = None) -> targets.TargetCache:
        """The run's target cache in `folder`: built (or finished: finished shards are kept) under the folder's own
        lock when `build`, else opened; checked against this run's settings, teacher and data either way (raises
        TargetCacheError / TargetCacheMismatchError naming the folder and what to do). `num_processes`: build for a
        run of that many processes (default this session's)."""
        count = num_processes or self.processes.count
        if build:
            with files.OutputLock(folder, what=f"{self.output_label}: target cache"):
                files.remove_orphaned_temporaries(folder)
                cache = targets.build_target_cache(
                    folder, self.denoiser, self.config, self.dataset, num_processes=count,
                    teacher_fingerprint=self.teacher_fingerprint, dataset_fingerprint=self.data_fingerprint,
                    teacher_batch=teacher_batch, device=self.device, progress=progress,
                )
        else:
            cache = targets.TargetCache(folder)
        cache.check(targets.cache_manifest(self.config, self.teacher_fingerprint, self.data_fingerprint, count))
        self.target_cache = cache
        return cache

    def verify_targets(self, count: int, teacher_batch: int | None = None) -> dict[str, Any]:
        """Re-solve `count` stored targets of the cache and compare (TargetCache.verify)."""
        if self.target_cache is None:
            raise ValueError("verify_targets needs a target cache: call targets() first")
        return self.target_cache.verify(self.denoiser, self.config, self.dataset, count, device=self.device,
                                        teacher_batch=teacher_batch)

    # ---- 4. the student and the run ------------------------------------------------------------------
    def student(self) -> FlashDistiller:
        """The student: FlashDistiller over the denoiser, its LoRA added and initialised once (Denoiser.add_lora,
        seeded by the config's seed) and its discriminator head; built on first use. A session that only samples
        (a LoRA loaded into it) stops here."""
        if self.distiller is None:
            processes = self.processes
            self.distiller = FlashDistiller(self.denoiser, self.config, device=self.device, backward=processes.backward,
                                            process_index=processes.index, reduce_gradients=processes.reduce_gradients,
                                            recipe=self.recipe)
        return self.distiller

    def start(self, resume: str | os.PathLike | None = None, allow_changes: bool = False) -> list[str]:
        """Build the student, preview, checkpoint store and Run; `resume`: "latest" (the newest checkpoint, if any),
        a checkpoint folder, or None (fresh). Returns the settings that differ from the resumed checkpoint
        (only with allow_changes; otherwise a difference raises ResumeMismatchError)."""
        processes = self.processes
        self.student()
        if self.preview_spec is not None and processes.is_main:
            spec = self.preview_spec
            guidance = spec.guidance if spec.guidance is not None else sum(self.recipe.guidance_range) / 2
            self.preview = Preview(self.distiller, spec.cond, spec.uncond, spec.latent_shape, self.config.seed, guidance,
                                   spec.teacher_sample_steps or self.recipe.teacher_grid_steps, spec.decode,
                                   sample_steps=spec.sample_steps)
        if self.checkpoint_folder is not None:
            self.store = CheckpointStore(self.checkpoint_folder, keep=self.keep_checkpoints, process_index=processes.index,
                                         num_processes=processes.count, barrier=processes.barrier)
        self.run = Run(self.distiller, self.dataset, self.settings, store=self.store, hooks=self.hooks,
                       preview=self.preview, preview_every=self.preview_every, checkpoint_every=self.checkpoint_every,
                       process_index=processes.index, num_processes=processes.count,
                       teacher_fingerprint=self.teacher_fingerprint, dataset_fingerprint=self.data_fingerprint,
                       fresh_hint=self.fresh_hint, rollback_on=self.rollback_on, target_cache=self.target_cache)
        folder = self.store.latest() if resume == "latest" and self.store is not None else resume
        if folder is None:
            return []
        return self.run.resume(folder, allow_changes=allow_changes)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint in the checkpoint folder (before start(): for the front end's checks)."""
        if self.checkpoint_folder is None:
            return None
        return CheckpointStore(self.checkpoint_folder).latest()

    def existing_checkpoints(self) -> list[Path]:
        return CheckpointStore(self.checkpoint_folder).list() if self.checkpoint_folder is not None else []

    # ---- 5. training ---------------------------------------------------------------------------------
    def train(self, stop_at: int | None = None) -> str:
        """Train to total_steps (start() first; `stop_at`: only to that iteration): "done" or "stopped" (a hook's stop
        request, after a checkpoint)."""
        if self.run is None:
            self.start()
        return self.run.train(stop_at)

    @property
    def step(self) -> int:
        return self.distiller.step if self.distiller is not None else 0

    @property
    def history(self) -> list[dict[str, float]]:
        return self.run.history if self.run is not None else []

    # ---- 6. export -----------------------------------------------------------------------------------
    def lora_modules(self) -> list[lora_formats.LoraModule]:
        """The student's LoRA as lora_formats modules, in EXPORT_DTYPE, under the denoiser's diffusers module paths
        (Denoiser.lora_path: ComfyDenoiser maps ComfyUI's LDM paths), so every front end writes the same names."""
        tensors = {k: v.detach().to("cpu", lora_formats.EXPORT_DTYPE) for k, v in self.distiller.lora_state_dict().items()}
        modules = lora_formats.modules_from_peft_state_dict(tensors, self.recipe.lora_alpha)
        paths = {m.path: self.denoiser.lora_path(m.path) for m in modules}
        return modules if all(old == new for old, new in paths.items()) else lora_formats.rename_modules(modules, paths)

    def metadata(self, *, base_model: str | None = None, recommended_steps: int | None = None,
                 trained_for: Mapping[str, Any] | None = None) -> dict[str, str]:
        """The LoRA's metadata (lora_formats.lora_metadata: kohya ss_* and flash.* keys)."""
        return lora_formats.lora_metadata(
            self.distiller, self.run.settings, self.run.history,
            base_model=base_model if base_model is not None else str(self.settings.get("base_model", "")),
            teacher=self.teacher_fingerprint, recommended_steps=recommended_steps, trained_for=trained_for,
        )

    def export(self, kind: str = "comfyui", *, name: str = "flash-lora",
               base_model: str | None = None, recommended_steps: int | None = None,
               trained_for: Mapping[str, Any] | None = None) -> lora_formats.LoraExport:
        """The trained LoRA as a file-ready export (`kind`: comfyui, diffusers, peft) with the session's metadata."""
        metadata = self.metadata(base_model=base_model, recommended_steps=recommended_steps, trained_for=trained_for)
        return lora_formats.build_lora_export(self.lora_modules(), self.config.backbone, kind, name=name,
                                              metadata=metadata, base_model=metadata["flash.base_model"],
                                              dtype=lora_formats.EXPORT_DTYPE)


__all__ = ["PreviewSpec", "Processes", "TrainingSession"]
