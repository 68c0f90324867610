"""Training cost of one Flash distillation step, split by part, against the bare cost of the models.

On the cached digits teacher (training/digits/teacher.py, the quality benchmark's model) with the digits
student settings, in one process on this machine:
  * seconds per optimiser step in each phase, split as FlashDistiller.train_step reports it: teacher solve
    (K-step DPM-Solver++ with CFG, no grad), student (forward + backward of the LoRA student, distillation and
    adversarial generator terms), discriminator update, DMD (fake and real scores);
  * the bare forward + backward of the same UNet on the same batch, and the ratio of a step to it;
  * peak resident memory of the process (ru_maxrss).
Prints a table and saves bench/results/train_cost.json.

    python -P bench/train_cost.py [--steps-per-phase N]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch

from flash_core.files import write_json_atomic
from training.comfy_env import REPO_ROOT
from training.digits.benchmark import StudentSettings, student_run
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-per-phase", type=int, default=8)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    pipe = load_teacher_pipeline(train_teacher(default_teacher_dir(), TeacherConfig()))
    train, _ = load_splits()
    settings = StudentSettings(steps=4 * args.steps_per_phase)
    trainer = student_run(pipe, train, settings, {})  # flash_core.run, as every front end trains
    trainer.train()

    per_phase: dict[int, list[dict]] = {}
    for logs in trainer.history:  # step_s: the wall time of train_step, as the run measures it
        per_phase.setdefault(int(logs["phase"]), []).append(logs)
    bare = bare_forward_backward(pipe.unet.train(), trainer.dataset.batch(list(range(settings.batch_size)), 0))

    rows = {}
    for phase, logs in sorted(per_phase.items()):
        warm = logs[1:] or logs  # the first step of a phase builds optimiser state / lazily imports
        rows[phase + 1] = {key: statistics.median(entry[key] for entry in warm) for key in (*PARTS, "step_s")}
        rows[phase + 1]["ratio_to_bare_forward_backward"] = rows[phase + 1]["step_s"] / bare
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results = {"model": "digits teacher UNet (32, 64), 8x8x4 latents", "batch_size": settings.batch_size,
               "teacher_grid_steps": settings.teacher_grid_steps, "bare_forward_backward_s": bare,
               "phases": rows, "peak_rss_mib": peak_mib, "threads": torch.get_num_threads()}
    write_json_atomic(RESULTS, results)

    print("| phase | teacher solve (s) | student (s) | discriminator (s) | DMD (s) | step (s) | step / bare fwd+bwd |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for phase, row in rows.items():
        print(f"| {phase} | {row['teacher_s']:.3f} | {row['student_s']:.3f} | {row['discriminator_s']:.3f} | "
              f"{row['dmd_s']:.3f} | {row['step_s']:.3f} | {row['ratio_to_bare_forward_backward']:.1f}x |")
    print(f"\nbare UNet forward + backward, batch {settings.batch_size}: {bare:.3f} s; peak RSS {peak_mib:.0f} MiB")
    print(f"saved {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
