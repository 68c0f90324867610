"""Flash distillation at the full SD1.5 size on one GPU, through the pack's training session: seconds per student
update in each phase live and on cached teacher targets, the cache build's throughput, peak memory, and the GPU-hours
of the paper's run at the paper's work.

Model: diffusers' UNet2DConditionModel built from SD1.5's configuration with RANDOM weights on the GPU (nothing
is downloaded; speed does not depend on the weights), bf16 frozen weights, text conditioning random [B, 77, 768].
Training: flash_core's sd15 recipe (LoRA rank 128, K = 32 teacher grid, both optimisers on every batch) with
mixed_precision bf16, driven by flash_core.session.TrainingSession exactly as the node and the CLI drive it.

Measured, at batch 4 and 16, on a short run with the recipe's four phases (1 warm-up + `--timed` iterations each;
an iteration's cost depends on its phase, not on the run's length):
  * seconds per student update in each phase, live (the K-step CFG teacher solve inside) and cached (the same
    run's targets built beforehand by the session's target cache). The teacher solve from grid index g costs
    K - g CFG evaluations, so the live teacher part is taken BY EXPECTATION over the phase's timestep mixture:
    (seconds per CFG evaluation measured on the timed iterations) x E_mixture[K - g], not the few indices drawn;
    the drawn-index figure is kept beside it (`drawn_update_s`);
  * peak memory (torch.cuda.max_memory_allocated) of the live and the cached run;
  * the cache build: CFG teacher evaluations per second at batch 4, 16 and a large batch, the targets per second
    that gives (E[K - g] over the four phases' mixtures), and the measured build of the short run's cache.
Projections at the paper's work: 2 GPUs x batch 4 x 10k student updates = 80,000 student samples (the paper's 26
H100-hours; Lightning counts the student's and the discriminator's optimiser steps, hence its "20k steps"). Per
student sample, and on 1 GPU at batch 4 (20k updates) and batch 16 (5k updates), live and cached (build included).
Writes bench/results/gpu.json (with torch.cuda.get_device_name()) and prints a table.

    python -P bench/gpu.py                # on a CUDA GPU, a few minutes on an H100
    python -P bench/gpu.py --smoke        # on the CPU with a tiny UNet, seconds (checks the script, no numbers)
    python -P bench/gpu.py --reproject    # no GPU: recompute gpu.json's projections from its last GPU measurements

Imports flash_core only (torch, diffusers, peft through flash_core), never ComfyUI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flash_core.backends.diffusers import UNetDenoiser
from flash_core.batches import TensorDataset
from flash_core.denoiser import Conditioning
from flash_core.distill import DistillConfig, guided_output, phase_mixture_probs
from flash_core.files import write_json_atomic
from flash_core.recipes import Recipe
from flash_core.session import TrainingSession

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"
# The paper's run: 2 GPUs x batch 4 x 10k student updates (each with its discriminator update).
PAPER = {"gpus": 2, "batch_per_gpu": 4, "student_updates": 10_000, "h100_hours": 26.0}
PAPER_SAMPLES = PAPER["gpus"] * PAPER["batch_per_gpu"] * PAPER["student_updates"]  # 80,000 student samples
PARTS = ("teacher_s", "student_s", "discriminator_s", "dmd_s")
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


FULL = Spec(SD15_UNET, (4, 64, 64), (77, 768), (4, 16), 64, 4, "bf16", {})
SMOKE = Spec(TINY_UNET, (4, 8, 8), (77, 32), (1, 2), 4, 1, "no", {"teacher_grid_steps": 4, "lora_rank": 4, "lora_alpha": 4})


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


def expected_evaluations(recipe: Recipe, phase: int) -> float:
    """E[K - g] under the phase's timestep mixture: the CFG evaluations of an average teacher solve."""
    grid = recipe.teacher_grid_steps
    return float(sum(p * (grid - g) for g, p in enumerate(phase_mixture_probs(recipe, phase).tolist())))


def phase_rows(session: TrainingSession, per_phase: int, live: bool) -> dict[int, dict[str, float]]:
    """Per phase (1-based), seconds per student update from the session's step log, its first iteration left out
    (warm-up). Live: the teacher part by expectation over the mixture (module docstring)."""
    recipe = session.recipe
    grid = recipe.teacher_grid_steps
    rows = {}
    for phase in range(recipe.num_phases):
        logs = session.history[phase * per_phase + 1 : (phase + 1) * per_phase]
        updates = sum(h["student_update"] for h in logs)
        parts = {key: sum(h[key] for h in logs) / updates for key in PARTS}
        drawn = sum(h["step_s"] for h in logs) / updates
        row = {"drawn_update_s": drawn, **parts}
        if live:
            per_evaluation = statistics.mean(h["teacher_s"] / (grid - h["grid_index"]) for h in logs if h["student_update"])
            evaluations = expected_evaluations(recipe, phase)
            row.update(teacher_s=per_evaluation * evaluations, seconds_per_teacher_evaluation=per_evaluation,
                       expected_teacher_evaluations=evaluations,
                       drawn_grid_indices=[int(h["grid_index"]) for h in logs if h["student_update"]])
        overhead = drawn - sum(parts.values())  # data, guards, logging: the step's time outside its parts
        row["update_s"] = sum(row[key] for key in PARTS) + overhead
        rows[phase + 1] = row
    return rows


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


def projections(runs: dict, recipe: Recipe, throughput: dict, large_batch: int) -> dict:
    """GPU-hours of the paper's work (PAPER_SAMPLES student samples) from the measured seconds per student update."""
    evaluations = statistics.mean(expected_evaluations(recipe, phase) for phase in range(recipe.num_phases))
    targets_per_s = throughput[str(large_batch)] / evaluations
    build_hours = PAPER_SAMPLES / targets_per_s / 3600  # one target per student sample
    out = {"paper": {**PAPER, "student_samples": PAPER_SAMPLES}, "mean_evaluations_per_target": evaluations,
           "targets_per_s": targets_per_s, "cache_build_gpu_hours": build_hours, "one_gpu": {}}
    for size, row in runs.items():
        updates = PAPER_SAMPLES // int(size)  # the same student samples on one GPU at this batch
        live = row["live"]["mean_update_s"] * updates / 3600
        cached = build_hours + row["cached"]["mean_update_s"] * updates / 3600
        out["one_gpu"][size] = {
            "student_updates": updates,
            "seconds_per_student_sample": {"live": row["live"]["mean_update_s"] / int(size),
                                           "cached": row["cached"]["mean_update_s"] / int(size)},
            "live_gpu_hours": live, "cached_gpu_hours_with_build": cached,
            "paper_over_live": PAPER["h100_hours"] / live, "paper_over_cached": PAPER["h100_hours"] / cached,
        }
    return out


def measure(spec: Spec, timed: int, device: torch.device) -> dict:
    denoiser = UNetDenoiser(build_unet(spec, device))
    runs: dict[str, dict] = {}
    build_seconds, build_targets = 0.0, 0
    for size in spec.batches:
        per_phase = 1 + timed  # both optimisers on every iteration: every iteration is a student update
        config = DistillConfig(backbone="sd15", total_steps=4 * per_phase, batch_size=size,
                               mixed_precision=spec.mixed_precision, **spec.overrides)
        dataset = random_dataset(spec, max(64, 4 * size), device)
        row: dict[str, dict] = {}
        for kind in ("live", "cached"):
            session = TrainingSession(denoiser, config, dataset, device=device)  # the LoRA is added once, reused
            with tempfile.TemporaryDirectory() as folder:
                if kind == "cached":
                    start = sync(device)
                    cache = session.targets(folder, build=True)
                    build_seconds += sync(device) - start
                    build_targets += sum(len(steps) for steps in cache.plan) * size
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                session.train()
            phases = phase_rows(session, per_phase, live=kind == "live")
            row[kind] = {"phases": phases, "mean_update_s": statistics.mean(p["update_s"] for p in phases.values()),
                         "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
        runs[str(size)] = row
    throughput = {str(b): evaluations_per_second(denoiser, spec, b, device) for b in (*spec.batches, spec.large_batch)}
    return {"runs": runs, "throughput": throughput, "build_seconds": build_seconds, "build_targets": build_targets}


def reproject(path: Path) -> dict:
    """Recompute the projections of `path` from its last GPU measurements (no GPU needed). Files written before
    the session-based measurement hold per-phase parts of drawn timesteps: their live teacher part is re-taken
    by expectation, as seconds per CFG evaluation at batch 4 (the cache-build throughput) x E_mixture[K - g]."""
    results = json.loads(path.read_text(encoding="utf-8"))
    recipe = DistillConfig(backbone="sd15").recipe()
    throughput = results["cache_build"]["teacher_evaluations_per_s"]
    for size, row in results["runs"].items():
        live = row["live"]
        if "seconds_per_teacher_evaluation" not in next(iter(live["phases"].values())) and size in throughput:
            per_evaluation = int(size) / throughput[size]  # seconds of one CFG evaluation of the batch
            for phase, part in live["phases"].items():
                part["drawn_update_s"], part["drawn_teacher_s"] = part["update_s"], part["teacher_s"]
                part["expected_teacher_evaluations"] = expected_evaluations(recipe, int(phase) - 1)
                part["seconds_per_teacher_evaluation"] = per_evaluation
                part["teacher_s"] = per_evaluation * part["expected_teacher_evaluations"]
                part["update_s"] = part["drawn_update_s"] - part["drawn_teacher_s"] + part["teacher_s"]
            live["mean_update_s"] = statistics.mean(p["update_s"] for p in live["phases"].values())
    results["projection"] = projections(results["runs"], recipe, throughput, results["cache_build"]["large_batch"])
    results.pop("projection_1_gpu", None)
    results["projection"]["reprojected"] = (
        f"recomputed without a GPU by `python -P bench/gpu.py --reproject` from the measurements of the last GPU run "
        f"({results['device']}, torch {results['torch']}): those were taken with alternating updates (a student "
        "iteration + a discriminator iteration per update); re-measure on a GPU for the both-every-batch default")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny UNet on the CPU: checks the script in seconds")
    parser.add_argument("--reproject", action="store_true", help="recompute the projections of the results file, no GPU")
    parser.add_argument("--timed", type=int, default=None, help="timed student updates per phase (default 4; smoke 1)")
    parser.add_argument("--out", type=Path, default=None, help="results file (default bench/results/gpu.json; smoke: none)")
    args = parser.parse_args(argv)
    if args.reproject:
        out = args.out or RESULTS
        results = reproject(RESULTS)
        write_json_atomic(out, results)
        print_projection(results)
        print(f"saved {out}")
        return 0
    spec = SMOKE if args.smoke else FULL
    timed = args.timed or spec.timed
    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU here; run it on a GPU (or --smoke on the CPU, --reproject for projections)",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    started = time.perf_counter()
    measured = measure(spec, timed, device)
    recipe = DistillConfig(backbone="sd15", **spec.overrides).recipe()
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "smoke": args.smoke, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "model": "SD1.5 UNet2DConditionModel, random weights" if not args.smoke else "tiny UNet (smoke)",
        "mixed_precision": spec.mixed_precision, "lora_rank": recipe.lora_rank, "teacher_grid_steps": recipe.teacher_grid_steps,
        "update_order": "both optimisers on every batch", "timed_updates_per_phase": timed, "runs": measured["runs"],
        "cache_build": {"teacher_evaluations_per_s": measured["throughput"], "large_batch": spec.large_batch,
                        "measured_targets": measured["build_targets"], "measured_seconds": measured["build_seconds"]},
        "projection": projections(measured["runs"], recipe, measured["throughput"], spec.large_batch),
        "wall_s": time.perf_counter() - started, "command": "python -P bench/gpu.py",
    }
    out = args.out if args.out is not None else (None if args.smoke else RESULTS)
    if out is not None:
        write_json_atomic(out, results)
    print(f"{results['device']}: {results['model']}, {spec.mixed_precision}, rank {recipe.lora_rank}, K = {recipe.teacher_grid_steps}")
    print("| batch | run | phase 1 | phase 2 | phase 3 | phase 4 | mean s / student update | peak GiB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for size, row in results["runs"].items():
        for kind in ("live", "cached"):
            r = row[kind]
            phases = " | ".join(f"{r['phases'][p]['update_s']:.3f}" for p in range(1, 5))
            peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
            print(f"| {size} | {kind} | {phases} | {r['mean_update_s']:.3f} | {peak} |")
    print_projection(results)
    print(f"wall {results['wall_s']:.0f} s" + (f"; saved {out}" if out is not None else ""))
    return 0


def print_projection(results: dict) -> None:
    projection = results["projection"]
    print(f"teacher CFG evaluations / s: "
          f"{', '.join(f'batch {b}: {v:.1f}' for b, v in results['cache_build']['teacher_evaluations_per_s'].items())}; "
          f"{projection['mean_evaluations_per_target']:.1f} evaluations per target -> {projection['targets_per_s']:.1f} targets / s")
    print(f"the paper's work ({PAPER_SAMPLES} student samples = {PAPER['gpus']} GPUs x batch {PAPER['batch_per_gpu']} x "
          f"{PAPER['student_updates']} updates, {PAPER['h100_hours']:g} H100-h) on 1 GPU:")
    for size, row in projection["one_gpu"].items():
        print(f"  batch {size} ({row['student_updates']} updates): live {row['live_gpu_hours']:.2f} GPU-h "
              f"({row['paper_over_live']:.1f}x less than the paper), cached {row['cached_gpu_hours_with_build']:.2f} GPU-h "
              f"with the build's {projection['cache_build_gpu_hours']:.2f} ({row['paper_over_cached']:.1f}x less)")


if __name__ == "__main__":
    sys.exit(main())
