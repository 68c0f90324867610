"""Flash distillation at the full SD1.5 size on one GPU: step time per phase live and on cached teacher targets,
the cache build's throughput, peak memory, and the GPU-hours the recipe projects to.

Model: diffusers' UNet2DConditionModel built from SD1.5's configuration with RANDOM weights on the GPU (nothing
is downloaded; speed does not depend on the weights), bf16 frozen weights, text conditioning random [B, 77, 768].
Training: flash_core's sd15 recipe (LoRA rank 128, K = 32 teacher grid, 20k iterations alternating student and
discriminator updates, batch 4) with mixed_precision bf16, run by FlashDistiller.train_step.

Measured, at batch 4 and 16:
  * seconds per student update in each phase (a student iteration + the discriminator iteration that follows it,
    as the recipe alternates them), live (the K-step CFG teacher solve inside) and cached (the teacher targets of
    the same iterations read from memory, solved beforehand by flash_core.target_cache.solve_targets); 1 warm-up
    update per phase, then `--timed` updates per phase at iterations of that phase;
  * peak memory (torch.cuda.max_memory_allocated) of the live and the cached run;
  * the cache build: CFG teacher evaluations per second at batch 4, 16 and a large batch (what the build uses),
    the targets per second that gives (a target needs K - grid index evaluations; mean over the phase mixtures),
    and the measured seconds of solving the timed iterations' targets;
  * the projection for the recipe on 1 GPU: live = 10k student updates at batch 4; cached = the cache build
    (40k targets) + 10k cached updates.
Writes bench/results/gpu.json (with torch.cuda.get_device_name()) and prints a table.

    python -P bench/gpu.py            # on a CUDA GPU, about 3 minutes on an H100
    python -P bench/gpu.py --smoke    # on the CPU with a tiny UNet, seconds (checks the script, no numbers)

Imports flash_core only (torch, diffusers, peft through flash_core), never ComfyUI.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flash_core import target_cache
from flash_core.backends.diffusers import UNetDenoiser
from flash_core.denoiser import Conditioning
from flash_core.files import write_json_atomic
from flash_core.distill import (
    DistillConfig,
    FlashDistiller,
    guided_output,
    phase_mixture_probs,
)
from flash_core.run import TensorDataset, batch_indices

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"
RECIPE_ITERATIONS = 20_000
SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json (the non-default keys)
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
)
TINY_UNET = dict(  # --smoke: the tests' tiny SD1.5-family UNet
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)


@dataclass
class Spec:
    unet: dict
    latent: tuple[int, int, int]
    text: tuple[int, int]
    batches: tuple[int, ...]
    large_batch: int
    timed: int
    mixed_precision: str
    overrides: dict  # DistillConfig overrides of the sd15 recipe


FULL = Spec(SD15_UNET, (4, 64, 64), (77, 768), (4, 16), 64, 3, "bf16", {})
SMOKE = Spec(TINY_UNET, (4, 8, 8), (77, 32), (1, 2), 4, 1, "no", {"teacher_grid_steps": 4, "lora_rank": 4, "lora_alpha": 4})


class MemoryTargets:
    """Solved targets by iteration, served like flash_core.target_cache.TargetCache.target (same draw checks)."""

    def __init__(self, solved: dict[str, torch.Tensor], batch: int):
        self.rows = {}
        for start in range(0, solved["targets"].shape[0], batch):
            step = int(solved["steps"][start])
            self.rows[step] = (int(solved["grid_index"][start]), float(solved["guidance"][start]),
                               solved["targets"][start : start + batch])

    def target(self, step: int, process: int, inputs, shape) -> torch.Tensor:
        grid_index, guidance, targets = self.rows[step]
        if (grid_index, guidance, tuple(targets.shape)) != (inputs.grid_index, inputs.guidance, tuple(shape)):
            raise RuntimeError(f"iteration {step}: the solved target's draws differ from the trainer's")
        return targets


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def build_unet(spec: Spec, device: torch.device) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs (an 860M-parameter init on the CPU is slow)
        unet = UNet2DConditionModel(**spec.unet)
    return unet.to(torch.bfloat16 if spec.mixed_precision == "bf16" else torch.float32)


def random_dataset(spec: Spec, count: int, device: torch.device) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(count, *spec.latent, generator=g)
    cond = Conditioning(torch.randn(count, *spec.text, generator=g))
    uncond = Conditioning(torch.randn(1, *spec.text, generator=g))
    return TensorDataset(latents.to(device), cond.to(device), uncond.to(device))


def update_seconds(distiller: FlashDistiller, dataset: TensorDataset, steps: list[int], device) -> tuple[float, dict]:
    """Seconds of one student update at iteration `steps[i]` (+ its discriminator iteration), median over steps;
    and the mean split (teacher_s, student_s, discriminator_s, dmd_s) of those iterations."""
    config, size = distiller.config, distiller.recipe.batch_size
    seconds, parts = [], {"teacher_s": 0.0, "student_s": 0.0, "discriminator_s": 0.0, "dmd_s": 0.0}
    for step in steps:
        distiller.step = step
        start = sync(device)
        for iteration in (step, step + 1):
            batch = dataset.batch(batch_indices(config.seed, iteration, len(dataset), size), iteration)
            logs = distiller.train_step(batch)
            for key in parts:
                parts[key] += logs[key] / len(steps)
        seconds.append(sync(device) - start)
    return statistics.median(seconds), parts


def evaluations_per_second(denoiser, spec: Spec, batch: int, device, repeats: int = 3) -> float:
    """Sample-evaluations per second of one CFG teacher evaluation (cond + uncond forward) at `batch`."""
    x = torch.randn(batch, *spec.latent, device=device)
    t = torch.full((batch,), 500.0, device=device)
    cond = Conditioning(torch.randn(batch, *spec.text, device=device))
    uncond = Conditioning(torch.randn(1, *spec.text, device=device))
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=spec.mixed_precision == "bf16")
    samples = []
    with torch.no_grad(), denoiser.teacher(), autocast:
        for i in range(repeats + 1):
            start = sync(device)
            guided_output(denoiser, x, t, cond, uncond, 7.5)
            if i:
                samples.append(sync(device) - start)
    return batch / statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny UNet on the CPU: checks the script in seconds")
    parser.add_argument("--timed", type=int, default=None, help="timed student updates per phase (default 3; smoke 1)")
    parser.add_argument("--out", type=Path, default=None, help="results file (default bench/results/gpu.json; smoke: none)")
    args = parser.parse_args(argv)
    spec = SMOKE if args.smoke else FULL
    timed = args.timed or spec.timed
    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU here; run it on a GPU (or --smoke on the CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    started = time.perf_counter()
    denoiser = UNetDenoiser(build_unet(spec, device))
    per_phase_steps = RECIPE_ITERATIONS // 4

    runs: dict[str, dict] = {}
    build_seconds, build_targets = 0.0, 0
    for size in spec.batches:
        config = DistillConfig(backbone="sd15", total_steps=RECIPE_ITERATIONS, batch_size=size,
                               mixed_precision=spec.mixed_precision, **spec.overrides)
        distiller = FlashDistiller(denoiser, config, device=device)  # the LoRA is added once, reused
        dataset = random_dataset(spec, max(64, 4 * size), device)
        steps = {phase: [phase * per_phase_steps + 2 * j for j in range(1 + timed)] for phase in range(4)}
        row: dict[str, dict] = {"live": {}, "cached": {}}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for phase, phase_steps in steps.items():
            update_seconds(distiller, dataset, phase_steps[:1], device)  # warm-up (first use of each loss)
            seconds, parts = update_seconds(distiller, dataset, phase_steps[1:], device)
            row["live"][phase + 1] = {"update_s": seconds, **parts}
        peak_live = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

        items = [(s, 0) for phase_steps in steps.values() for s in phase_steps[1:]]
        start = sync(device)
        solved = target_cache.solve_targets(denoiser, config, dataset, items, device=device, teacher_batch=spec.large_batch)
        build_seconds += sync(device) - start
        build_targets += solved["targets"].shape[0]
        distiller.target_cache = MemoryTargets(solved, size)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for phase, phase_steps in steps.items():
            seconds, parts = update_seconds(distiller, dataset, phase_steps[1:], device)
            row["cached"][phase + 1] = {"update_s": seconds, **parts}
        distiller.target_cache = None
        peak_cached = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        for kind, peak in (("live", peak_live), ("cached", peak_cached)):
            phases = row[kind]
            row[kind] = {"phases": phases, "mean_update_s": statistics.mean(p["update_s"] for p in phases.values()),
                         "peak_memory_gib": peak}
        runs[str(size)] = row

    recipe = DistillConfig(backbone="sd15", **spec.overrides).recipe()
    grid = recipe.teacher_grid_steps
    evals_per_target = statistics.mean(  # a solve from grid index g takes K - g CFG evaluations
        float(sum(p * (grid - g) for g, p in enumerate(phase_mixture_probs(recipe, phase).tolist()))) for phase in range(4))
    throughput = {str(b): evaluations_per_second(denoiser, spec, b, device) for b in (*spec.batches, spec.large_batch)}
    targets_per_s = throughput[str(spec.large_batch)] / evals_per_target
    updates = RECIPE_ITERATIONS // 2
    recipe_batch = str(recipe.batch_size) if str(recipe.batch_size) in runs else str(spec.batches[0])
    live_hours = runs[recipe_batch]["live"]["mean_update_s"] * updates / 3600
    build_hours = updates * int(recipe_batch) / targets_per_s / 3600
    cached_hours = build_hours + runs[recipe_batch]["cached"]["mean_update_s"] * updates / 3600
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "smoke": args.smoke, "torch": torch.__version__,
        "model": "SD1.5 UNet2DConditionModel, random weights" if not args.smoke else "tiny UNet (smoke)",
        "mixed_precision": spec.mixed_precision, "lora_rank": recipe.lora_rank, "teacher_grid_steps": grid,
        "timed_updates_per_phase": timed, "runs": runs,
        "cache_build": {"teacher_evaluations_per_s": throughput, "large_batch": spec.large_batch,
                        "mean_evaluations_per_target": evals_per_target, "targets_per_s": targets_per_s,
                        "measured_targets": build_targets, "measured_seconds": build_seconds},
        "projection_1_gpu": {"iterations": RECIPE_ITERATIONS, "student_updates": updates, "batch_size": int(recipe_batch),
                             "live_gpu_hours": live_hours, "cache_build_gpu_hours": build_hours,
                             "cached_gpu_hours_with_build": cached_hours},
        "wall_s": time.perf_counter() - started, "command": "python -P bench/gpu.py",
    }
    out = args.out if args.out is not None else (None if args.smoke else RESULTS)
    if out is not None:
        write_json_atomic(out, results)

    print(f"{results['device']}: {results['model']}, {spec.mixed_precision}, rank {recipe.lora_rank}, K = {grid}")
    print("| batch | run | phase 1 | phase 2 | phase 3 | phase 4 | mean s / student update | peak GiB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for size, row in runs.items():
        for kind in ("live", "cached"):
            r = row[kind]
            phases = " | ".join(f"{r['phases'][p]['update_s']:.3f}" for p in range(1, 5))
            peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
            print(f"| {size} | {kind} | {phases} | {r['mean_update_s']:.3f} | {peak} |")
    print(f"\nteacher CFG evaluations / s: {', '.join(f'batch {b}: {v:.1f}' for b, v in throughput.items())}; "
          f"{evals_per_target:.1f} evaluations per target -> {targets_per_s:.1f} targets / s")
    print(f"recipe on 1 GPU ({updates} student updates, batch {recipe_batch}): live {live_hours:.2f} GPU-h; cached "
          f"{cached_hours:.2f} GPU-h (build {build_hours:.2f} + training)")
    print(f"wall {results['wall_s']:.0f} s" + (f"; saved {out}" if out is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
