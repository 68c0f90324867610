"""Seed replicates of `make bench-guidance` (`make bench-guidance-seeds`): are its goals met for other training
seeds and other initial noise, or only for the one run the README's tables come from?

Runs training/digits/guidance.py with --goals-only (the baseline and the cfg student; no ablations) at each seed of
--seeds, the seeds side by side (one process each, the cores shared between them), each into
bench/results/guidance/seeds/seed<N>/; then reads those and the full run's bench/results/guidance/ (seed 0, when its
settings match) and writes bench/results/guidance/seeds.json and seeds.md: per goal cell and seed, the quantity the
goal compares (the negative prompt's points ratio, goal >= 0.8; the dial's baseline-to-student Frechet ratio, goal
> 1, i.e. the student nearer the teacher; the accuracy's direction with w), whether each seed met it, and the
smallest value over the seeds; beside the negative's goal, the fraction of the student's own images of the negated digit
the negative removes over the teacher's fraction (the negative's effect apart from how many of the digit each draws).

    python -P -m training.digits.guidance_seeds [--seeds 1 2] [--aggregate-only] [--ema-decay D --out FOLDER]

--ema-decay D passes on to each replicate (the cfg student's LoRA average); with it, --out names the folder of the
full run of the same setting (`make bench-guidance-ema`: bench/results/guidance/ema/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from flash_core.files import write_json_atomic, write_text_atomic
from training.digits import guidance

OUT = guidance.OUT
SEEDS = (1, 2)
# what must agree between the replicates besides the seed (summary.json keys; the students' settings but their seed)
SAME_SETTINGS = ("per_digit", "negative_images", "teacher_steps", "negative_w")


def run_seeds(seeds: list[int], out: Path, ema_decay: float = 0.0) -> dict[int, float]:
    """One goals-only bench per seed, side by side; returns each one's wall seconds. A failed run stops here, naming
    its log."""
    from training.digits.teacher import default_teacher_dir, train_teacher

    train_teacher(default_teacher_dir())  # installed once here, not raced by the replicates
    threads = max(1, (os.cpu_count() or 1) // len(seeds))
    started, running, seconds = time.perf_counter(), {}, {}
    with contextlib.ExitStack() as logs:
        for seed in seeds:
            folder = out / "seeds" / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            log = logs.enter_context(open(folder / "log.txt", "ab"))  # a log, appended run after run
            command = [sys.executable, "-P", "-m", "training.digits.guidance", "--goals-only", "--seed", str(seed),
                       "--out", str(folder), *(["--ema-decay", str(ema_decay)] if ema_decay else [])]
            running[seed] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                              env=os.environ | {"OMP_NUM_THREADS": str(threads)}), log.name)
        for seed, (process, log_name) in running.items():
            code = process.wait()
            seconds[seed] = time.perf_counter() - started
            if code != 0:
                raise SystemExit(f"flash: the seed {seed} replicate failed (exit {code}); see {log_name}")
    return seconds


def goal_cells(summary: dict, rows: list[dict]) -> dict[str, dict]:
    """The quantity each goal compares, per cell, from one run's summary.json and results.json."""
    cells = {}
    for name, check in summary["goals"]["negative"].items():
        cell = f"negative {name.split()[-2]} {name.split()[-1]}"
        cells[cell] = {"value": check["points_ratio"], "standard_error": check["points_ratio_standard_error"],
                       "met": check["met"]}
        beside = check["beside_the_goal"]
        # beside the goal (met: None): the fraction of the student's own images of the digit the negative removes,
        # over the teacher's fraction: the negative's effect without the unconditional mix a points ratio carries
        cells[f"{cell}, own share removed vs teacher's"] = {
            "value": beside["student_removed_fraction"] / beside["teacher_removed_fraction"], "met": None}
    for nfe in guidance.STUDENT_NFES:
        of = {(r["method"], r["w"]): r for r in rows if not r["negative"] and r["nfe"] == nfe}
        checked = summary["goals"]["dial"][f"@{nfe}"]  # guidance.dial_checks: the goal's comparisons
        for w in guidance.DIAL:
            student, baseline = of[("student", w)]["frechet_to_teacher"], of[("baseline", w)]["frechet_to_teacher"]
            # the dial's goal (student nearer the teacher than the baseline) as a ratio: above 1 where met
            cells[f"dial @{nfe} w {w:g}"] = {"value": baseline / student, "student_frechet": student,
                                            "baseline_frechet": baseline,
                                            "met": checked["nearer_than_baseline"][str(w)]}
        cells[f"dial @{nfe} accuracy direction"] = {
            "value": of[("student", max(guidance.DIAL))]["accuracy"] - of[("student", min(guidance.DIAL))]["accuracy"],
            "met": checked["accuracy_same_direction"]}
    return cells


def aggregate(out: Path) -> dict:
    """seeds.json / seeds.md from every replicate under out/seeds/ and the full run in out (seed 0)."""
    runs = {}
    for folder in [out, *sorted((out / "seeds").glob("seed*"))]:
        if (folder / "summary.json").is_file():
            summary = json.loads((folder / "summary.json").read_text())
            runs[summary.get("seed", 0)] = (folder, summary, json.loads((folder / "results.json").read_text()))
    if not runs:
        raise SystemExit(f"flash: no bench-guidance results under {out}; run make bench-guidance-seeds")
    reference = next(iter(runs.values()))[1]
    for seed, (folder, summary, _) in runs.items():
        differing = [k for k in SAME_SETTINGS if summary[k] != reference[k]]
        differing += [f"students.{name}" for name in ("baseline", "student")
                      if {k: v for k, v in summary["students"][name].items() if k != "seed"}
                      != {k: v for k, v in reference["students"][name].items() if k != "seed"}]
        if differing:
            raise SystemExit(f"flash: {folder / 'summary.json'} (seed {seed}) was run with other settings "
                             f"({', '.join(differing)}); rerun it or remove it")
    per_seed = {seed: goal_cells(summary, rows) for seed, (_, summary, rows) in sorted(runs.items())}
    names = list(next(iter(per_seed.values())))
    cells = {name: {"values": {str(seed): per_seed[seed][name] for seed in per_seed},
                    "smallest": min(per_seed[seed][name]["value"] for seed in per_seed),
                    "met_in": None if per_seed[min(per_seed)][name]["met"] is None
                    else sum(per_seed[seed][name]["met"] for seed in per_seed)} for name in names}
    result = {"command": "python -P -m training.digits.guidance_seeds", "seeds": sorted(per_seed),
              "settings": {k: reference[k] for k in SAME_SETTINGS},
              "met_per_seed": {str(seed): all(c["met"] for c in per_seed[seed].values() if c["met"] is not None)
                               for seed in per_seed},
              "cells": cells}
    write_json_atomic(out / "seeds.json", result)
    write_text_atomic(out / "seeds.md", markdown(result) + "\n")
    return result


def markdown(result: dict) -> str:
    seeds = [str(s) for s in result["seeds"]]
    lines = ["| goal cell | " + " | ".join(f"seed {s}" for s in seeds) + " | met in |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for name, cell in result["cells"].items():
        values = [cell["values"][s] for s in seeds]
        shown = [(f"{v['value']:+.3f}" if "direction" in name else f"{v['value']:.2f}")
                 + (f" ± {v['standard_error']:.2f}" if v.get("standard_error") is not None else "")
                 + ("" if v["met"] in (True, None) else " (missed)") for v in values]
        met_in = "beside the goal" if cell["met_in"] is None else f"{cell['met_in']} of {len(seeds)}"
        lines.append(f"| {name} | " + " | ".join(shown) + f" | {met_in} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--aggregate-only", action="store_true", help="only read the runs already under --out")
    parser.add_argument("--ema-decay", type=float, default=0.0, help="each replicate's --ema-decay (guidance.py)")
    args = parser.parse_args(argv)
    if not args.aggregate_only:
        seconds = run_seeds(args.seeds, args.out, args.ema_decay)
        print("replicates' wall time:", {seed: round(s) for seed, s in seconds.items()})
    result = aggregate(args.out)
    print(markdown(result))
    print("goals met per seed:", result["met_per_seed"])
    return result


if __name__ == "__main__":
    main()
