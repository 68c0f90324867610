"""Training cost of Flash distillation per student update, live and on a teacher-target cache, against the bare
cost of the model.

On the cached digits teacher (training/digits/teacher.py, the quality benchmark's model) with the digits
student settings, in one process on this machine:
  * seconds per student update in each phase, live (the teacher's K-step CFG DPM-Solver++ solve in every
    update) and cached (targets read from a flash_core.target_cache built beforehand), split as
    FlashDistiller.train_step reports it: teacher solve / cache read, student (forward + backward of the LoRA
    student, distillation and adversarial generator terms), discriminator, DMD. A student update's seconds are the
    wall time of all iterations of the phase divided by its student updates (by default every iteration updates
    the student and then the discriminator; with alternate_updates a discriminator iteration is part of each
    update's cost);
  * the cache build: seconds per target (grouped no-grad teacher batches, flash_core.target_cache);
  * the bare forward + backward of the same UNet on the same batch, and `live_over_bare` / `cached_over_bare`:
    seconds per student update averaged over the four phases, divided by it;
  * peak resident memory of the process (ru_maxrss).
Live and cached runs train the same student from the same draws (the cache test checks equal losses); they run
side by side in one process, alternating for `--rounds` rounds (each with its own bare measurement), and every
number is the minimum over the rounds: on a shared machine the least disturbed round is the closest to the cost.
Prints a table and saves bench/results/train_cost.json.

    OMP_NUM_THREADS=1 python -P bench/train_cost.py [--steps-per-phase N]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time

import torch

from flash_core import target_cache
from flash_core.files import write_json_atomic
from training.fixtures.comfy_env import REPO_ROOT
from training.digits.benchmark import StudentSettings, student_session
from training.digits.data import load_splits
from training.digits.teacher import (
    TeacherConfig,
    default_teacher_dir,
    load_teacher_pipeline,
    train_teacher,
)

RESULTS = REPO_ROOT / "bench" / "results" / "train_cost.json"
PARTS = ("teacher_s", "student_s", "discriminator_s", "dmd_s")


def bare_forward_backward(unet, batch, repeats: int = 5) -> float:
    """Seconds of one forward + backward of the full UNet on the training batch (all weights trainable)."""
    x = batch.latents
    t = torch.full((x.shape[0],), 500)
    context = batch.cond.encoder_hidden_states
    samples = []
    for _ in range(repeats + 1):
        unet.zero_grad(set_to_none=True)
        start = time.perf_counter()
        unet(x, t, context).sample.square().mean().backward()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples[1:])


def per_update(history: list[dict]) -> dict[int, dict[str, float]]:
    """Per phase (1-based): seconds per student update, in all and by part, without the phase's first pair of
    iterations (it builds optimiser state / imports lazily)."""
    by_phase: dict[int, list[dict]] = {}
    for logs in history:
        by_phase.setdefault(int(logs["phase"]), []).append(logs)
    rows = {}
    for phase, logs in sorted(by_phase.items()):
        warm = logs[2:] if sum(h["student_update"] for h in logs[2:]) else logs
        updates = sum(h["student_update"] for h in warm)
        rows[phase + 1] = {key: sum(h[key] for h in warm) / updates for key in (*PARTS, "step_s")}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-per-phase", type=int, default=12, help="iterations per phase (half update the student)")
    parser.add_argument("--rounds", type=int, default=3, help="live + cached runs, alternating; minimum over rounds")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    pipe = load_teacher_pipeline(train_teacher(default_teacher_dir(), TeacherConfig()))
    train, _ = load_splits()
    settings = StudentSettings(total_steps=4 * args.steps_per_phase)

    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        builder = student_session(pipe, train, settings, {})  # builds the targets with the teacher (no LoRA yet)
        start = time.perf_counter()
        cache = builder.targets(folder, build=True)
        build_s = time.perf_counter() - start
        dataset = builder.dataset
        count = sum(len(steps) for steps in cache.plan) * settings.batch_size
        for _ in range(args.rounds):
            live = student_session(pipe, train, settings, {})  # the training session every front end drives
            live.train()
            cached = student_session(pipe, train, settings, {})
            cached.targets(folder, build=False)
            cached.train()
            bare = bare_forward_backward(pipe.unet.train(), dataset.batch(list(range(settings.batch_size)), 0))
            rounds.append({"live": per_update(live.history), "cached": per_update(cached.history), "bare": bare})
    bare = min(r["bare"] for r in rounds)
    rows = {kind: {phase: {key: min(r[kind][phase][key] for r in rounds) for key in rounds[0][kind][phase]}
                   for phase in rounds[0][kind]} for kind in ("live", "cached")}
    averages = {kind: statistics.mean(row["step_s"] for row in phases.values()) for kind, phases in rows.items()}
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results = {
        "model": "digits teacher UNet (32, 64), 8x8x4 latents", "batch_size": settings.batch_size,
        "teacher_grid_steps": settings.teacher_grid_steps, "iterations_per_phase": args.steps_per_phase,
        "rounds": args.rounds,
        "bare_forward_backward_s": bare,
        "live_over_bare": averages["live"] / bare, "cached_over_bare": averages["cached"] / bare,
        "seconds_per_student_update": averages,
        "cache_build": {"targets": count, "seconds": build_s, "seconds_per_target": build_s / count,
                        "teacher_batch": target_cache.CPU_TEACHER_BATCH},
        "phases": rows, "peak_rss_mib": peak_mib, "threads": torch.get_num_threads(),
        "command": "OMP_NUM_THREADS=1 python -P bench/train_cost.py",
    }
    write_json_atomic(RESULTS, results)

    print("seconds per student update (the discriminator iteration of each update included)")
    print("| phase | run | teacher solve / cache read | student | discriminator | DMD | update | update / bare fwd+bwd |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for phase in rows["live"]:
        for kind in ("live", "cached"):
            row = rows[kind][phase]
            print(f"| {phase} | {kind} | {row['teacher_s']:.3f} | {row['student_s']:.3f} | {row['discriminator_s']:.3f} | "
                  f"{row['dmd_s']:.3f} | {row['step_s']:.3f} | {row['step_s'] / bare:.1f}x |")
    print(f"\nbare UNet forward + backward, batch {settings.batch_size}: {bare:.3f} s; live {results['live_over_bare']:.2f}x, "
          f"cached {results['cached_over_bare']:.2f}x; cache build {1000 * build_s / count:.2f} ms per target "
          f"({count} targets); peak RSS {peak_mib:.0f} MiB")
    print(f"saved {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
