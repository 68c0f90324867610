"""`make demo`: distil a real text-to-image model into a 2-step Flash student inside ComfyUI, and compare.

The embedded default is the digits teacher of the quality benchmark (training/digits/teacher.py): a small
but real latent text-to-image pipeline (CLIP text encoder, VAE, UNet, SD1.5 noise schedule) trained on
scikit-learn's handwritten digits, so nothing is downloaded. Steps:

1. teacher: the digits teacher the pack ships (training/digits/shipped_teacher), installed once into the cache
   (FLASH_CACHE_DIR, default <repo>/.cache/digits/teacher) in seconds; other --teacher-* settings train one;
2. setup: write the training digits as PNG + caption files into ComfyUI's input folder and start ComfyUI with
   the Flash nodes (its own folders under <cache>/demo/comfyui, the teacher visible as a diffusers pipeline
   to FlashDiffusersLoader);
3. distillation: queue workflows/api/flash_demo_distill.json (FlashDistillTrain distils the teacher into a
   LoRA) and follow it on ComfyUI's websocket as the browser does: step, loss and ETA on one line, every
   preview grid the node sends saved under <cache>/demo/previews/. Cached: later runs reuse
   <cache>/demo/models/loras/flash/flash_digits_demo.safetensors unless --retrain;
4. comparison: workflows/api/flash_demo_compare.json through comfy-cli (`comfy run --workflow F --wait`),
   once per digit: the teacher (25 and 2 steps, CFG 3) and the student (FlashSampler, 1, 2 and 4 steps) on
   the same prompt and the same noise; then each path alone, timed by ComfyUI (execution time per image);
5. scoring: every path with the benchmark's digit classifier (accuracy, Fréchet distance to held-out real
   digits); writes grid.png, results.json, results.md and timing.json (seconds per step, core count, what
   came from the cache) to --results-dir, by default <cache>/demo/results/ (a run changes no tracked file);
   --record writes them to the committed bench/results/demo/ instead (the README's table and grid).

The terminal gets short lines: one per started and finished step, live progress (rewritten in place on a
terminal, a plain line every few seconds otherwise). comfy-cli's output and every ComfyUI answer go to
<cache>/demo/demo.log, the server's own output to <cache>/demo/comfyui.log; a failure names both.

The parts: demo_console.py (terminal and log), demo_workflows.py (the ComfyUI graphs and running them),
demo_progress.py (following the distillation), demo_results.py (scoring and the results files).

    python -m training.digits.demo [--retrain] [--teacher-steps N] [--total-steps N] [--per-digit N] [--serve]
                                   [--results-dir DIR | --record]
"""

from __future__ import annotations

import time

IMPORTED_AT = time.monotonic()  # the run's clock starts before torch's import (seconds of a newcomer's wait)

import argparse
import contextlib
import hashlib
import io
import json
import shutil
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from flash_core.files import replace_folder_atomic, staging_folder, write_text_atomic
from training.digits.demo_console import INDENT, PLAIN_EVERY_S, STEPS, Console, DemoLog, StepLog, duration, shown
from training.digits.demo_progress import run_distillation
from training.digits.demo_results import machine, markdown_table, read_images, run_kind, score, write_outputs
from training.digits.demo_workflows import (
    DATASET_FOLDER,
    LORA_NAME,
    OUTPUT_PREFIX,
    PATHS,
    TEACHER_PIPELINE,
    compare_workflow,
    demo_dir,
    distill_workflow,
    run_cli,
    time_paths,
)
from training.fixtures.comfy_env import REPO_ROOT
from training.fixtures.comfy_server import ComfyServer

RESULTS_DIR = REPO_ROOT / "bench" / "results" / "demo"  # committed: the README's table, grid and run times


# ---- preparation ---------------------------------------------------------------------------------
def prepare_models(teacher_dir: Path, models_root: Path) -> None:
    """models_root/diffusers/<TEACHER_PIPELINE> -> the cached teacher folder."""
    link = models_root / "diffusers" / TEACHER_PIPELINE
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.resolve() == teacher_dir.resolve():
            return
        link.unlink() if link.is_symlink() else shutil.rmtree(link)
    link.symlink_to(teacher_dir.resolve(), target_is_directory=True)


def write_dataset(folder: Path, seed: int) -> int:
    """The training split as <i>.png + <i>.txt (one training prompt each), the layout LoadImageTextDataSet reads."""
    from PIL import Image

    from training.digits.data import load_splits, to_uint8, training_prompt

    train, _ = load_splits()
    marker = folder / ".complete"
    if marker.is_file() and marker.read_text() == f"{len(train.digits)} {seed}":
        return len(train.digits)
    staging = staging_folder(folder)  # written whole, then moved onto `folder`: never half a dataset there
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index, (pixels, digit) in enumerate(zip(to_uint8(train.images), train.digits.tolist())):
        Image.fromarray(pixels).save(staging / f"{index:04d}.png")
        (staging / f"{index:04d}.txt").write_text(training_prompt(int(digit), rng))
    (staging / marker.name).write_text(f"{len(train.digits)} {seed}")
    replace_folder_atomic(staging, folder)
    return len(train.digits)


# ---- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from training.digits.benchmark import add_total_steps_flag
    from training.digits.teacher import TeacherConfig

    parser = argparse.ArgumentParser(description="Distil the digits teacher with FlashDistillTrain in ComfyUI and compare.")
    parser.add_argument("--retrain", action="store_true", help="distil the student again (the teacher stays cached)")
    parser.add_argument("--teacher-steps", type=int, default=TeacherConfig.steps, help="teacher UNet steps (first run)")
    parser.add_argument("--teacher-vae-steps", type=int, default=TeacherConfig.vae_steps)
    parser.add_argument("--teacher-batch-size", type=int, default=TeacherConfig.batch_size)
    add_total_steps_flag(parser, 500, "FlashDistillTrain total_steps (iterations = batches: a student and a discriminator update each)")
    parser.add_argument("--per-digit", type=int, default=10, help="images per digit and path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="where grid.png, results.json, results.md and timing.json go (default: "
                             "<cache>/demo/results, so a run changes no tracked file)")
    parser.add_argument("--record", action="store_true",
                        help="write them to the committed bench/results/demo (the README's table and grid)")
    parser.add_argument("--progress-every", type=float, default=PLAIN_EVERY_S, metavar="S",
                        help="without a terminal: one progress line at most every S seconds (0: every update)")
    parser.add_argument("--serve", action=argparse.BooleanOptionalAction, default=sys.stdin.isatty(),
                        help="keep ComfyUI running afterwards to open the workflows (default: from a terminal)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.record and args.results_dir is not None:
        print("make demo: give --record or --results-dir, not both", file=sys.stderr)
        return 2
    args.results_dir = RESULTS_DIR if args.record else args.results_dir or demo_dir() / "results"
    console = Console(every_s=args.progress_every)
    log = DemoLog(demo_dir() / "demo.log")
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: log.write(
        "warning", warnings.formatwarning(message, category, filename, lineno, line))  # libraries' notes: the log
    try:
        return run_demo(args, console, log)
    except KeyboardInterrupt:
        console.end_live()
        print("\nmake demo interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, OSError) as error:  # a failed workflow / server: its message, not a trace
        console.end_live()
        log.write("failed", f"{type(error).__name__}: {error}")
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]  # the rest is in the log
        print(f"\nmake demo failed: {first_line}\ndetails: {shown(log.path)} (comfy-cli, ComfyUI's answers), "
              f"{shown(demo_dir() / 'comfyui.log')} (ComfyUI)", file=sys.stderr)
        return 1


def teacher_identity(teacher_dir: Path) -> dict:
    from training.digits.teacher import INFO_FILE

    return {"teacher": str(teacher_dir.resolve()), "teacher_config": json.loads((teacher_dir / INFO_FILE).read_text())["config"]}


def teacher_training_seconds(teacher_dir: Path) -> float | None:
    """The teacher's own record of its training time (VAE + UNet), kept in its folder when it was built."""
    from training.digits.teacher import INFO_FILE

    timings = json.loads((teacher_dir / INFO_FILE).read_text()).get("timings_s", {})
    return round(sum(timings.values()), 1) if timings else None


def run_demo(args: argparse.Namespace, console: Console, log: DemoLog) -> int:
    from training.digits.teacher import (
        TeacherConfig,
        default_teacher_dir,
        is_complete,
        shipped_config,
        train_teacher,
    )

    torch.set_num_threads(min(2, torch.get_num_threads()))
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    host = machine()
    demo = demo_dir()
    base, models_root = demo / "comfyui", demo / "models"
    steps = StepLog(console)

    config = TeacherConfig(steps=args.teacher_steps, vae_steps=args.teacher_vae_steps,
                           batch_size=args.teacher_batch_size, seed=args.seed)
    teacher_dir = default_teacher_dir()
    teacher_cached = is_complete(teacher_dir, config)
    shipped = not teacher_cached and shipped_config() == config
    if teacher_cached:
        steps.start("teacher", "teacher: the digits pipeline is cached")
        steps.finish("teacher", "teacher: cached", teacher_dir)
    else:
        steps.start("teacher", "teacher: installing the digits pipeline the pack ships" if shipped else
                    f"teacher: training the digits pipeline ({config.steps} UNet steps, once; then cached)")
        with contextlib.redirect_stdout(io.StringIO()) as said:  # its summary line goes to the log
            train_teacher(teacher_dir, config)
        log.write("teacher", said.getvalue())
        steps.finish("teacher", "teacher: installed (shipped)" if shipped else "teacher: trained", teacher_dir)

    steps.start("setup", "setup: training digits as PNG + caption files, ComfyUI with the Flash nodes")
    prepare_models(teacher_dir, models_root)
    dataset = base / "input" / DATASET_FOLDER
    count = write_dataset(dataset, args.seed)
    server = ComfyServer(models_root=models_root, base_dir=base, port=args.port, log_path=demo / "comfyui.log")
    server.start()
    steps.finish("setup", f"setup: {count} training digits and ComfyUI ({server.url})", dataset)
    try:
        lora = models_root / "loras" / "flash" / f"{LORA_NAME}.safetensors"
        settings_file = lora.with_suffix(".demo.json")
        workflow = distill_workflow(args.total_steps)
        wanted = {**teacher_identity(teacher_dir),
                  "workflow_sha256": hashlib.sha256(json.dumps(workflow, sort_keys=True).encode()).hexdigest()}
        student_cached = (not args.retrain and lora.is_file() and settings_file.is_file()
                          and json.loads(settings_file.read_text()) == wanted)
        if student_cached:
            steps.start("distillation", "distillation: the Flash student is cached (--retrain to distil again)")
            steps.finish("distillation", "distillation: cached", lora)
        else:
            steps.start("distillation", f"distillation: flash_demo_distill.json, FlashDistillTrain {args.total_steps} steps")
            settings_file.unlink(missing_ok=True)
            run_distillation(server, workflow, console, log, timeout=4 * 3600)
            write_text_atomic(settings_file, json.dumps(wanted))
            steps.finish("distillation", f"distillation: {args.total_steps} steps", lora)

        steps.start("comparison", "comparison: comfy run flash_demo_compare.json per digit (teacher 25 / 2 steps, "
                                  "student 1 / 2 / 4)")
        output = server.output_dir() / OUTPUT_PREFIX / "compare"
        for stale in (output, output.with_name("timing")):  # earlier runs' images would be scored again
            shutil.rmtree(stale, ignore_errors=True)
        for digit in range(10):
            console.live(f"{INDENT}comfy run: digit {digit + 1}/10")
            seconds = run_cli(server, compare_workflow(digit, args.per_digit, args.seed), f"flash_demo_compare_d{digit}",
                              timeout=600, log=log)
            console.live(f"{INDENT}comfy run: digit {digit + 1}/10 done in {duration(seconds)}", force=digit == 9)
        path_seconds = time_paths(server, args.per_digit, args.seed, console, log)
        console.end_live()
        steps.finish("comparison", f"comparison: {len(PATHS)} paths x 10 digits x {args.per_digit} images", output)

        steps.start("scoring", "scoring: digit classifier (accuracy, Fréchet distance), grid and tables")
        images = {path.key: read_images(output, path.key, args.per_digit) for path in PATHS}
        results = score(images, path_seconds)
        settings = {k: v for k, v in vars(args).items() if k not in ("serve", "port", "results_dir", "record", "progress_every")}
        steps.seconds["scoring"] = steps.elapsed()  # before writing, so timing.json has it
        timing = {"date": started_at, "kind": run_kind(teacher_cached, student_cached),
                  "teacher": "cached" if teacher_cached else "shipped" if shipped else "trained",
                  "teacher_training_s": teacher_training_seconds(teacher_dir),
                  "student": "cached" if student_cached else "distilled", "machine": host, "settings": settings,
                  "steps_s": {name: round(steps.seconds[name], 1) for name in STEPS},
                  "total_s": round(time.monotonic() - IMPORTED_AT, 1)}
        write_outputs(args.results_dir, results, images, settings, timing)
        steps.finish("scoring", "scoring: results", args.results_dir)

        console.line("\n" + markdown_table(results) + "\n")
        for label, path in (("grid", args.results_dir / "grid.png"), ("table", args.results_dir / "results.md"),
                            ("times", args.results_dir / "timing.json"), ("images", output), ("student", lora),
                            ("log", log.path)):
            console.labelled(label, path)
        console.line(f"\ndemo finished in {duration(timing['total_s'])} (teacher {timing['teacher']}, "
                     f"student {timing['student']})")
        if args.serve:
            console.line(f"\nOpen {server.url} and load a workflow from the template browser")
            console.line("(Workflow > Browse Templates > ComfyUI-Flash: flash_demo_compare, flash_demo_distill).")
            console.line("ComfyUI keeps running; press Ctrl-C to stop.")
            try:
                while server.alive():
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
