"""Teacher-target cache: the distillation targets of a whole run, solved once in large batches, read by any student.

The target of a student update (the teacher's K-step CFG DPM-Solver++ solve from z_t, distill.teacher_target)
depends on the data latent, the noise, the grid index, the guidance and the prompt, never on the student. The
draws are counter-based (distill.target_inputs(config, step, process)), so the inputs of every iteration are
known up front: `build_target_cache` computes the targets of every student-update iteration of every process,
grouped by grid index into no-grad batches sized to the memory available, and `TargetCache.target` gives them
back to FlashDistiller (run.Run(target_cache=...)), which then skips the solve. One cache serves every student
trained with the same teacher, data and target settings (other lr, rank, loss weights, ...), ablations and
resumes.

Layout of a cache folder:
    manifest.json                       what determines the targets (`cache_manifest`) + the shard layout
    targets-<first>-<last>.safetensors  the student-update iterations first..last (iteration numbers), one row
                                        per sample: targets [M, C, h, w] float32, steps, process, position (in
                                        its batch), sample_index (dataset row), grid_index, guidance (float64);
                                        its metadata: the identity of the cache it was built for (a hash of the
                                        whole manifest: teacher, data, settings, layout), first / last iteration
                                        and a checksum of its tensors
Every file is written atomically (flash_core.files); a shard exists complete or not at all, so an interrupted
build is finished by running it again (finished shards are kept). A manifest that differs from the run's
settings refuses with every difference (`TargetCacheMismatchError`), like run.Run.resume; a shard of another
cache (copied in from another dataset's build), of another range, truncated or unreadable is refused naming it
(`check` when a run opens the cache, reading its header; its checksum when it is loaded), and a build rebuilds
it; `verify` re-solves random targets and compares.

API:
    cache_manifest(config, teacher_fingerprint, data_fingerprint, num_processes=1) -> dict
    build_target_cache(folder, denoiser, config, dataset, num_processes=1, teacher_batch=None, ...) -> TargetCache
    TargetCache(folder)   .manifest  .check(expected)  .missing_shards()  .target(step, process, inputs, shape)
                          .verify(denoiser, config, dataset, count, seed=0) -> dict
    solve_targets(denoiser, config, dataset, items, num_processes=1, device=None, teacher_batch=None) -> dict
                                        # the rows of (step, process) items, solved as the build does
    default_teacher_batch(denoiser, latent_shape, cond, uncond, device, mixed_precision) -> int
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flash_core import batches, fingerprints
from flash_core.denoiser import Conditioning
from flash_core.distill import (
    DistillConfig,
    guidance_pair,
    sample_guidance,
    student_input,
    student_updates,
    target_inputs,
    teacher_target,
    training_grid,
)
from flash_core.draws import prompt_pair_record
from flash_core.file_formats import safetensors_header
from flash_core.files import write_atomic, write_json_atomic

CACHE_FORMAT = "flash-target-cache"
CACHE_VERSION = 2  # 2: shards carry their cache identity; SD3 targets on the reference flow grid
MANIFEST_FILE = "manifest.json"
SHARD_PREFIX = "targets-"
SHARD_TARGETS = 1024  # samples per shard (SD1.5 latents: 64 MiB)
CPU_TEACHER_BATCH = 64
MAX_TEACHER_BATCH = 512
ROW_KEYS = ("steps", "process", "position", "sample_index", "grid_index", "guidance")
# A shard's safetensors metadata: which cache it belongs to, which iterations it holds, a checksum of its tensors.
SHARD_CACHE_KEY, SHARD_FIRST_KEY, SHARD_LAST_KEY, SHARD_CONTENT_KEY = "cache_identity", "first_step", "last_step", "content"
REBUILD = "delete it and run `flash-distill cache-targets` again: it rebuilds the shards that are missing or damaged " \
          "and keeps the others"
# Tolerance of `verify`: max |stored - recomputed| / max(1, max |recomputed|) (batch composition changes the
# kernels' summation order; bf16 autocast rounds much more).
VERIFY_TOLERANCE = {"no": 1e-4, "bf16": 5e-2}


class TargetCacheError(ValueError):
    """A target cache that cannot serve this run (incomplete, unreadable, draws that differ)."""


class TargetCacheMismatchError(TargetCacheError):
    """The cache was built for other settings, another teacher or other data."""

    def __init__(self, folder: str | os.PathLike, differences: list[str]):
        self.differences = differences
        super().__init__(
            f"the target cache {folder} was built for other settings, teacher or data ({'; '.join(differences)}). "
            "Build a cache for this run in another folder (flash-distill cache-targets), or train without it."
        )


def cache_manifest(config: DistillConfig, teacher_fingerprint: str, data_fingerprint: str, num_processes: int = 1) -> dict[str, Any]:
    """Everything that determines the targets of a run (what a cache records and a run compares)."""
    recipe = config.recipe()
    return {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "backbone": config.backbone,
        "teacher_fingerprint": teacher_fingerprint, "data_fingerprint": data_fingerprint,
        "seed": config.seed, "total_steps": config.total_steps, "alternate_updates": config.alternate_updates,
        "batch_size": recipe.batch_size, "num_processes": num_processes,
        "teacher_grid_steps": recipe.teacher_grid_steps, "student_steps": recipe.student_steps,
        "guidance_range": [float(v) for v in recipe.guidance_range],
        "phase_mode_weights": [[float(w) for w in phase] for phase in recipe.phase_mode_weights],
        "mixed_precision": config.mixed_precision,
        # guidance mode "cfg" draws each sample's prompt pair (the keys are absent in mode "baked": older caches fit)
        **({"guidance_mode": config.guidance_mode} if config.guidance_mode != "baked" else {}),
        **prompt_pair_record(config.guidance_mode),
    }


def manifest_differences(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    return [f"{key}: cache {saved.get(key)!r}, run {expected.get(key)!r}"
            for key in sorted(set(expected) | (set(saved) - {"layout"})) if saved.get(key) != expected.get(key)]


def _shard_name(first: int, last: int) -> str:
    return f"{SHARD_PREFIX}{first:06d}-{last:06d}.safetensors"


def _shard_plan(manifest: Mapping[str, Any]) -> list[list[int]]:
    """The student-update iterations of each shard."""
    config = DistillConfig(backbone=manifest["backbone"], total_steps=manifest["total_steps"],
                           alternate_updates=manifest["alternate_updates"])
    updates, per_shard = student_updates(config), int(manifest["layout"]["steps_per_shard"])
    return [updates[i : i + per_shard] for i in range(0, len(updates), per_shard)]


def _manifest_problem(manifest: Any) -> str | None:
    """What makes a manifest unusable (a key missing or of the wrong kind), or None."""
    from flash_core.recipes import RECIPES

    if not isinstance(manifest, dict):
        return "is not a JSON object"
    layout = manifest.get("layout")
    wanted = {"backbone": lambda v: v in RECIPES, "total_steps": lambda v: _whole(v, 1),
              "alternate_updates": lambda v: isinstance(v, bool), "num_processes": lambda v: _whole(v, 1),
              "batch_size": lambda v: _whole(v, 1),
              "layout": lambda v: isinstance(v, dict) and _whole(v.get("steps_per_shard"), 1)}
    for key, ok in wanted.items():
        if key not in manifest:
            return f"has no '{key}'"
        if not ok(manifest[key]):
            return f"has '{key}' = {manifest[key]!r}" + (", not {'steps_per_shard': N}" if key == "layout" and not
                                                          isinstance(layout, dict) else "")
    return None


def _whole(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def cache_identity(manifest: Mapping[str, Any]) -> str:
    """The identity a cache's shards carry: a hash of its whole manifest (teacher and data fingerprints, every
    target setting, the number of processes and the shard layout)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:32]


def shard_metadata(identity: str, steps: Sequence[int], tensors: Mapping[str, Tensor]) -> dict[str, str]:
    """The metadata a shard of the cache `identity` holding iterations `steps` is written with."""
    return {SHARD_CACHE_KEY: identity, SHARD_FIRST_KEY: str(steps[0]), SHARD_LAST_KEY: str(steps[-1]),
            SHARD_CONTENT_KEY: fingerprints.tensor_fingerprint(sorted(tensors.items()))}


class TargetCache:
    """A cache folder (see the module docstring); shards are loaded on demand, one at a time."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        path = self.folder / MANIFEST_FILE
        try:
            self.manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TargetCacheError(f"{self.folder} is not a target cache (no {MANIFEST_FILE}); build one with "
                                   "`flash-distill cache-targets --config ...`") from None
        except (OSError, ValueError) as err:
            raise TargetCacheError(f"{path} cannot be read ({err}); delete the folder and build the cache again") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != CACHE_FORMAT \
                or self.manifest.get("version") != CACHE_VERSION:
            raise TargetCacheError(f"{self.folder} is not a version-{CACHE_VERSION} Flash target cache; build it again")
        problem = _manifest_problem(self.manifest)
        if problem is not None:
            raise TargetCacheError(f"{path} {problem}: it is damaged or was not written by `flash-distill "
                                   f"cache-targets`; delete the folder {self.folder} and build the cache again")
        self.identity = cache_identity(self.manifest)
        self.plan = _shard_plan(self.manifest)
        self._shard_of = {step: i for i, steps in enumerate(self.plan) for step in steps}
        self._loaded: tuple[int, dict[str, Tensor], dict[tuple[int, int], Tensor]] | None = None

    def shard_path(self, index: int) -> Path:
        steps = self.plan[index]
        return self.folder / _shard_name(steps[0], steps[-1])

    def missing_shards(self) -> list[int]:
        return [i for i in range(len(self.plan)) if not self.shard_path(i).is_file()]

    def _rows_per_shard(self, index: int) -> int:
        return len(self.plan[index]) * self.manifest["num_processes"] * self.manifest["batch_size"]

    def shard_problem(self, index: int, metadata: Mapping[str, str] | None = None) -> str | None:
        """What is wrong with an existing shard, from its header alone (cheap: no tensor is read): unreadable or
        truncated, built for another cache (another dataset, teacher or settings), or for other iterations.
        None when it is fine (its checksum is checked when it is loaded)."""
        path, steps = self.shard_path(index), self.plan[index]
        if metadata is None:
            header = safetensors_header(path)
            if header is None:
                return "cannot be read (not a complete safetensors file: truncated or damaged)"
            try:
                ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
                with open(path, "rb") as handle:
                    described = 8 + int.from_bytes(handle.read(8), "little") + max(ends, default=0)
                size = path.stat().st_size
            except (TypeError, ValueError, KeyError, IndexError, OSError) as err:
                return f"cannot be read ({type(err).__name__}: {err})"
            if described != size:
                return f"cannot be read: it is truncated or damaged ({size} bytes, its header describes {described})"
            metadata = header.get("__metadata__") or {}
            if not isinstance(metadata, dict):
                return "cannot be read (its metadata is not a mapping)"
        identity = metadata.get(SHARD_CACHE_KEY)
        if identity is None:
            return "carries no cache identity (built before shards recorded one, or not by cache-targets)"
        if identity != self.identity:
            return (f"was built for another target cache (identity {identity}, this cache {self.identity}: another "
                    "dataset, teacher or settings), so its targets are not this run's")
        if (metadata.get(SHARD_FIRST_KEY), metadata.get(SHARD_LAST_KEY)) != (str(steps[0]), str(steps[-1])):
            return (f"holds iterations {metadata.get(SHARD_FIRST_KEY)}-{metadata.get(SHARD_LAST_KEY)}, not the "
                    f"{steps[0]}-{steps[-1]} its name says")
        return None

    def damaged_shards(self) -> dict[int, str]:
        """Existing shards with a shard_problem, by index (what a build rebuilds and a run refuses)."""
        problems = {i: self.shard_problem(i) for i in range(len(self.plan)) if self.shard_path(i).is_file()}
        return {i: problem for i, problem in problems.items() if problem is not None}

    def check(self, expected: Mapping[str, Any], complete: bool = True) -> None:
        """Refuse a cache of other settings / teacher / data, or (complete=True) one with shards missing, of
        another cache or range, truncated or unreadable."""
        differences = manifest_differences(self.manifest, expected)
        if differences:
            raise TargetCacheMismatchError(self.folder, differences)
        if not complete:
            return
        missing = self.missing_shards()
        if missing:
            raise TargetCacheError(
                f"the target cache {self.folder} is incomplete ({len(missing)} of {len(self.plan)} shards missing, "
                f"e.g. {self.shard_path(missing[0]).name}); run `flash-distill cache-targets` again to finish it"
            )
        damaged = self.damaged_shards()
        if damaged:
            index, problem = next(iter(damaged.items()))
            others = f" ({len(damaged)} shards in all)" if len(damaged) > 1 else ""
            raise TargetCacheError(f"the target shard {self.shard_path(index)} {problem}{others}; {REBUILD}")

    def _shard(self, index: int) -> tuple[dict[str, Tensor], dict[tuple[int, int], Tensor]]:
        if self._loaded is None or self._loaded[0] != index:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            from safetensors import safe_open

            path = self.shard_path(index)
            try:
                tensors = load_file(str(path))
                with safe_open(str(path), framework="pt") as handle:
                    metadata = dict(handle.metadata() or {})
            except FileNotFoundError:
                raise TargetCacheError(f"the target cache lacks {path}; run `flash-distill cache-targets` again") from None
            except (SafetensorError, OSError, ValueError) as err:
                raise TargetCacheError(f"the target shard {path} cannot be read ({err}); {REBUILD}") from None
            problem = self.shard_problem(index, metadata)
            if problem is None and set(tensors) != {"targets", *ROW_KEYS}:
                problem = f"holds the tensors {sorted(tensors)}, not a shard's"
            if problem is None and any(t.shape[0] != self._rows_per_shard(index) for t in tensors.values()):
                problem = f"holds {tensors['targets'].shape[0]} rows, not {self._rows_per_shard(index)}"
            if problem is None and fingerprints.tensor_fingerprint(sorted(tensors.items())) != metadata.get(SHARD_CONTENT_KEY):
                problem = "cannot be read: its tensors differ from the checksum recorded when it was built (damaged)"
            if problem is not None:
                raise TargetCacheError(f"the target shard {path} {problem}; {REBUILD}")
            rows: dict[tuple[int, int], list[int]] = {}
            for row, (step, process) in enumerate(zip(tensors["steps"].tolist(), tensors["process"].tolist())):
                rows.setdefault((step, process), []).append(row)
            self._loaded = (index, tensors, {k: torch.tensor(v) for k, v in rows.items()})
        return self._loaded[1], self._loaded[2]

    def rows(self, step: int, process: int) -> dict[str, Tensor]:
        """The stored rows of (step, process), in batch order: targets and the ROW_KEYS."""
        if step not in self._shard_of:
            raise TargetCacheError(f"the target cache {self.folder} holds no targets of iteration {step} "
                                   "(not a student update of its run)")
        tensors, index = self._shard(self._shard_of[step])
        rows = index.get((step, process))
        if rows is None:
            raise TargetCacheError(f"the target cache {self.folder} holds no targets of iteration {step}, process {process}")
        rows = rows[tensors["position"][rows].argsort()]
        return {key: tensors[key][rows] for key in ("targets", *ROW_KEYS)}

    def target(self, step: int, process: int, inputs, shape: Sequence[int]) -> Tensor:
        """The teacher target of (step, process); its stored grid index / guidance must equal the run's draws."""
        rows = self.rows(step, process)
        grid, guidance = set(rows["grid_index"].tolist()), rows["guidance"].tolist()
        drawn = sample_guidance(inputs, len(guidance)).tolist()
        if grid != {inputs.grid_index} or guidance != drawn or tuple(rows["targets"].shape) != tuple(shape):
            raise TargetCacheError(
                f"the target cache {self.folder} disagrees with this run at iteration {step}, process {process}: "
                f"cache grid index {sorted(grid)}, guidance {sorted(set(guidance))}, shape {tuple(rows['targets'].shape)}; "
                f"run {inputs.grid_index}, {sorted(set(drawn))}, {tuple(shape)}. The run draws differently from the "
                "build (another flash_core version?): build the cache again"
            )
        return rows["targets"]

    def verify(self, denoiser, config: DistillConfig, dataset, count: int, seed: int = 0,
               device: torch.device | str | None = None, teacher_batch: int | None = None) -> dict[str, Any]:
        """Re-solve `count` random stored targets and compare; raises TargetCacheError naming the bad shards.
        Returns {"checked", "max_error", "tolerance"}."""
        rng = random.Random(seed)
        items = [(step, process) for steps in self.plan for step in steps for process in range(self.manifest["num_processes"])]
        picks = sorted(rng.sample(items, min(count, len(items))))
        num_processes, tolerance = self.manifest["num_processes"], VERIFY_TOLERANCE[config.mixed_precision]
        bad, worst, checked = [], 0.0, 0
        for step, process in picks:
            try:
                stored = self.rows(step, process)
            except TargetCacheError as error:
                bad.append(f"iteration {step} process {process}: {error}")
                continue
            fresh = solve_targets(denoiser, config, dataset, [(step, process)], num_processes, device, teacher_batch)
            recomputed = fresh["targets"]
            error = float((stored["targets"] - recomputed).abs().max() / max(1.0, float(recomputed.abs().max())))
            worst, checked = max(worst, error), checked + recomputed.shape[0]
            if not math.isfinite(error) or error > tolerance or not torch.equal(stored["grid_index"], fresh["grid_index"]):
                bad.append(f"iteration {step} process {process} ({self.shard_path(self._shard_of[step]).name}): error {error:.3g}")
        if bad:
            raise TargetCacheError(
                f"the target cache {self.folder} failed verification: {len(bad)} of {len(picks)} checked batches differ "
                f"from a fresh solve beyond {tolerance:g} ({'; '.join(bad[:5])}). Delete those shards and run "
                "`flash-distill cache-targets` again"
            )
        return {"checked": checked, "max_error": worst, "tolerance": tolerance}


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------


def _teacher_context(denoiser):
    return denoiser.teacher() if denoiser.has_lora else contextlib.nullcontext()


def _autocast(device: torch.device, mixed_precision: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")


def _device_of(denoiser, device) -> torch.device:
    return torch.device(device) if device is not None else next(denoiser.lora_module.parameters()).device


def solve_targets(denoiser, config: DistillConfig, dataset, items: Sequence[tuple[int, int]], num_processes: int = 1,
                 device=None, teacher_batch: int | None = None) -> dict[str, Tensor]:
    """The targets of (step, process) items, solved grouped by grid index in batches of `teacher_batch` samples;
    rows in item order. The inputs are exactly the training run's (batches.batch_indices, distill.target_inputs)."""
    recipe, device = config.recipe(), _device_of(denoiser, device)
    grid = training_grid(denoiser, recipe.teacher_grid_steps, recipe.student_steps)
    samples: list[dict[str, Any]] = []
    for step, process in items:
        indices = batches.batch_indices(config.seed, step, len(dataset), recipe.batch_size, process, num_processes)
        batch = dataset.batch(indices, step)
        latents = batch.latents.to(device, torch.float32)
        inputs = target_inputs(config, step, process, latents.shape, recipe=recipe)
        z_t, _ = student_input(denoiser, grid, latents, inputs)
        cond, uncond = guidance_pair(inputs, batch.cond.to(device), batch.uncond.to(device))  # positive, negative
        guidance = sample_guidance(inputs, latents.shape[0]).tolist()
        for position, row in enumerate(indices):
            samples.append({"z_t": z_t[position : position + 1], "cond": cond[position], "uncond": uncond[position],
                            "steps": step, "process": process, "position": position, "sample_index": row,
                            "grid_index": inputs.grid_index, "guidance": guidance[position]})
    batch_limit = teacher_batch or CPU_TEACHER_BATCH
    targets: list[Tensor | None] = [None] * len(samples)
    by_grid: dict[int, list[int]] = {}
    for i, sample in enumerate(samples):
        by_grid.setdefault(sample["grid_index"], []).append(i)
    with torch.no_grad(), _teacher_context(denoiser), _autocast(device, config.mixed_precision):
        for grid_index, members in sorted(by_grid.items()):
            for start in range(0, len(members), batch_limit):
                chunk = members[start : start + batch_limit]
                z_t = torch.cat([samples[i]["z_t"] for i in chunk])
                cond = Conditioning.cat([samples[i]["cond"] for i in chunk])
                uncond = Conditioning.cat([samples[i]["uncond"] for i in chunk])
                guidance = torch.tensor([samples[i]["guidance"] for i in chunk], dtype=torch.float64)
                x0 = teacher_target(denoiser, z_t, grid_index, cond, uncond, guidance, recipe.teacher_grid_steps,
                                    recipe.student_steps).float().cpu()
                for j, i in enumerate(chunk):
                    targets[i] = x0[j]
    out = {"targets": torch.stack(targets).contiguous()}
    for key in ROW_KEYS:
        dtype = torch.float64 if key == "guidance" else torch.int64
        out[key] = torch.tensor([s[key] for s in samples], dtype=dtype)
    return out


def default_teacher_batch(denoiser, latent_shape: Sequence[int], cond: Conditioning, uncond: Conditioning,
                          device=None, mixed_precision: str = "no") -> int:
    """Samples per no-grad teacher batch: CUDA from the free memory (a probe measures one CFG evaluation per
    sample, 70 % of the free memory is used), CPU CPU_TEACHER_BATCH."""
    device = _device_of(denoiser, device)
    if device.type != "cuda":
        return CPU_TEACHER_BATCH
    from flash_core.distill import guided_output

    probe = 4
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    x = torch.zeros((probe, *latent_shape), device=device)
    with torch.no_grad(), _teacher_context(denoiser), _autocast(device, mixed_precision):
        guided_output(denoiser, x, torch.full((probe,), 500.0, device=device), cond[0].to(device).expand_to(probe),
                      uncond[0].to(device).expand_to(probe), 5.0)
    per_sample = max(1, (torch.cuda.max_memory_allocated(device) - base) // probe)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(MAX_TEACHER_BATCH, 0.7 * free // per_sample)))


def build_target_cache(
    folder: str | os.PathLike, denoiser, config: DistillConfig, dataset, *, num_processes: int = 1,
    teacher_fingerprint: str | None = None, dataset_fingerprint: str | None = None, teacher_batch: int | None = None,
    shard_targets: int = SHARD_TARGETS, device=None, progress: Callable[[int, int], None] | None = None,
) -> TargetCache:
    """Solve and store the targets of every student update of the run `config` describes, for `num_processes`
    processes. Resumable: finished shards are kept, the rest is computed. A folder built for other settings is
    refused (TargetCacheMismatchError). progress(done_shards, total_shards) after each shard."""
    from safetensors.torch import save_file

    folder = Path(folder)
    expected = cache_manifest(
        config, teacher_fingerprint if teacher_fingerprint is not None else fingerprints.teacher_fingerprint(denoiser),
        dataset_fingerprint if dataset_fingerprint is not None else dataset.fingerprint(), num_processes,
    )
    if (folder / MANIFEST_FILE).is_file():
        cache = TargetCache(folder)
        cache.check(expected, complete=False)
    else:
        per_step = config.recipe().batch_size * num_processes
        layout = {"steps_per_shard": max(1, shard_targets // per_step)}
        write_json_atomic(folder / MANIFEST_FILE, {**expected, "layout": layout})
        cache = TargetCache(folder)
    if teacher_batch is None:
        probe = dataset.batch([0], 0)
        teacher_batch = default_teacher_batch(denoiser, probe.latents.shape[1:], probe.cond, probe.uncond, device,
                                              config.mixed_precision)
    missing = sorted(set(cache.missing_shards()) | set(cache.damaged_shards()))  # of another cache, truncated: rebuilt
    for done, index in enumerate(missing):
        steps = cache.plan[index]
        items = [(step, process) for step in steps for process in range(num_processes)]
        tensors = solve_targets(denoiser, config, dataset, items, num_processes, device, teacher_batch)
        metadata = shard_metadata(cache.identity, steps, tensors)
        write_atomic(cache.shard_path(index), lambda tmp, t=tensors, m=metadata: save_file(t, tmp, metadata=m))
        if progress is not None:
            progress(len(cache.plan) - len(missing) + done + 1, len(cache.plan))
    return cache


__all__ = [
    "TargetCache",
    "TargetCacheError",
    "TargetCacheMismatchError",
    "build_target_cache",
    "cache_identity",
    "cache_manifest",
    "default_teacher_batch",
    "manifest_differences",
    "shard_metadata",
    "solve_targets",
]
