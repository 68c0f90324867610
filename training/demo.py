"""`make demo`: distil a real text-to-image model into a 2-step Flash student inside ComfyUI, and compare.

The embedded default is the digits teacher of the quality benchmark (training/digits/teacher.py): a small
but real latent text-to-image pipeline (CLIP text encoder, VAE, UNet, SD1.5 noise schedule) trained on
scikit-learn's handwritten digits, so nothing is downloaded. Steps:

1. train the teacher once and cache it (FLASH_CACHE_DIR, default <repo>/.cache/digits/teacher);
2. write the training digits as PNG + caption files into ComfyUI's input folder;
3. start ComfyUI with the Flash nodes (its own folders under <cache>/demo/comfyui, the teacher visible as a
   diffusers pipeline to FlashDiffusersLoader) and, through comfy-cli and the shared workflow files,
   - workflows/api/flash_demo_distill.json: FlashDistillTrain distils the teacher into a LoRA (cached:
     later runs reuse <cache>/demo/models/loras/flash/flash_digits_demo.safetensors unless --retrain),
   - workflows/api/flash_demo_compare.json, once per digit: the teacher (25 and 2 steps, CFG 3) and the
     student (FlashSampler, 1, 2 and 4 steps) on the same prompt and the same noise;
4. scores every path with the benchmark's digit classifier (accuracy, Fréchet distance to held-out real
   digits), times each path alone in ComfyUI (execution time per image), writes grid.png, results.json,
   results.md under <cache>/demo/results and prints them with the URL to open the workflows.

    python -m training.demo [--retrain] [--teacher-steps N] [--student-steps N] [--per-digit N] [--serve]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from training.comfy_env import REPO_ROOT, cache_dir
from training.comfy_server import ComfyServer

DISTILL_WORKFLOW = REPO_ROOT / "workflows" / "api" / "flash_demo_distill.json"
COMPARE_WORKFLOW = REPO_ROOT / "workflows" / "api" / "flash_demo_compare.json"
TEACHER_PIPELINE = "flash_digits_teacher"  # models/diffusers/<name>
LORA_NAME = "flash_digits_demo"  # models/loras/flash/<name>.safetensors, written by FlashDistillTrain
DATASET_FOLDER = "flash_digits"  # input/<name>/: training PNGs + caption .txt files
OUTPUT_PREFIX = "flash_demo"  # output/<prefix>/: distill_preview_*, compare/, timing/
TIMING_REPEATS = 3


@dataclass(frozen=True)
class DemoPath:
    """One generation path of the compare workflow: its SaveImage node and what it costs."""

    key: str
    label: str
    save_node: str
    steps: int
    unet_evals: int  # UNet evaluations per image (CFG doubles them)


PATHS = (
    DemoPath("teacher_25", "teacher, 25 steps, CFG 3", "7", 25, 50),
    DemoPath("teacher_2", "teacher, 2 steps, CFG 3", "10", 2, 4),
    DemoPath("student_1", "Flash student, 1 step", "14", 1, 1),
    DemoPath("student_2", "Flash student, 2 steps", "17", 2, 2),
    DemoPath("student_4", "Flash student, 4 steps", "20", 4, 4),
)


@dataclass
class PathResult:
    key: str
    label: str
    steps: int
    unet_evals: int
    accuracy: float
    frechet_distance: float
    seconds_per_image: float


def demo_dir() -> Path:
    return cache_dir() / "demo"


def load_workflow(path: Path) -> dict:
    return json.loads(path.read_text())


def prune_to(workflow: dict, output_node: str) -> dict:
    """The sub-graph `output_node` depends on (ComfyUI runs every output node of a prompt)."""
    keep, todo = set(), [output_node]
    while todo:
        node = todo.pop()
        if node in keep:
            continue
        keep.add(node)
        todo += [value[0] for value in workflow[node]["inputs"].values() if isinstance(value, list)]
    return {node: copy.deepcopy(workflow[node]) for node in workflow if node in keep}


def compare_workflow(digit: int, per_digit: int, seed: int) -> dict:
    """The compare workflow for one digit's canonical prompt; images land in output/flash_demo/compare/<path>_d<digit>_*."""
    from training.digits.data import canonical_prompt

    workflow = load_workflow(COMPARE_WORKFLOW)
    workflow["2"]["inputs"]["text"] = canonical_prompt(digit)
    workflow["4"]["inputs"]["batch_size"] = per_digit
    for node in workflow.values():
        if node["class_type"] in ("KSampler", "FlashSampler"):
            node["inputs"]["seed"] = seed + digit
    for path in PATHS:
        workflow[path.save_node]["inputs"]["filename_prefix"] = f"{OUTPUT_PREFIX}/compare/{path.key}_d{digit}"
    return workflow


def distill_workflow(student_steps: int) -> dict:
    workflow = load_workflow(DISTILL_WORKFLOW)
    workflow["5"]["inputs"]["steps"] = student_steps
    return workflow


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
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index, (pixels, digit) in enumerate(zip(to_uint8(train.images), train.digits.tolist())):
        Image.fromarray(pixels).save(folder / f"{index:04d}.png")
        (folder / f"{index:04d}.txt").write_text(training_prompt(int(digit), rng))
    marker.write_text(f"{len(train.digits)} {seed}")
    return len(train.digits)


# ---- running -------------------------------------------------------------------------------------
def run_cli(server: ComfyServer, workflow: dict, name: str, timeout: float, stream: bool = False) -> float:
    """Write `workflow` to <demo>/workflows/<name>.json and run it with comfy-cli; returns seconds.
    With stream, comfy-cli's own progress bars (per node, FlashDistillTrain's steps) go to the terminal."""
    path = demo_dir() / "workflows" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(workflow, indent=1))
    started = time.monotonic()
    result = server.comfy_cli_run(path, timeout=timeout, stream=stream)
    if result.returncode != 0:
        raise RuntimeError(
            f"comfy run --workflow {path} failed (exit {result.returncode}):\n{(result.stdout or '')[-2000:]}\n"
            f"{(result.stderr or '')[-2000:]}\nComfyUI log: {server.log_path}"
        )
    return time.monotonic() - started


def execution_seconds(entry: dict) -> float:
    """ComfyUI's own execution time of a finished prompt (execution_start -> execution_success)."""
    stamps = {event: data["timestamp"] for event, data in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def time_paths(server: ComfyServer, per_digit: int, seed: int) -> dict[str, float]:
    """Seconds per image of each path, executed alone in ComfyUI (median of TIMING_REPEATS, warm models)."""
    timings = {}
    for path in PATHS:
        samples = []
        for repeat in range(TIMING_REPEATS + 1):  # the first run warms the path up (model patching, caches)
            workflow = prune_to(compare_workflow(0, per_digit, seed + 1000 * (repeat + 1)), path.save_node)
            workflow[path.save_node]["inputs"]["filename_prefix"] = f"{OUTPUT_PREFIX}/timing/{path.key}"
            entry = server.run(workflow, timeout=600)
            if entry["status"].get("status_str") != "success":
                raise RuntimeError(f"timing run of {path.key} failed: {json.dumps(entry)[:2000]}")
            if repeat:
                samples.append(execution_seconds(entry) / per_digit)
        timings[path.key] = statistics.median(samples)
    return timings


def read_images(folder: Path, key: str, per_digit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [-1, 1], digits) of one path, digits 0..9 in order."""
    from PIL import Image

    from training.digits.data import from_uint8

    images, digits = [], []
    for digit in range(10):
        files = sorted(folder.glob(f"{key}_d{digit}_*.png"))[-per_digit:]
        if len(files) != per_digit:
            raise RuntimeError(f"expected {per_digit} images {folder}/{key}_d{digit}_*.png, found {len(files)}")
        images += [np.asarray(Image.open(f).convert("RGB")) for f in files]
        digits += [digit] * per_digit
    return from_uint8(np.stack(images)), torch.tensor(digits)


def score(images_by_path: dict[str, tuple[torch.Tensor, torch.Tensor]], timings: dict[str, float]) -> list[PathResult]:
    from training.digits.data import load_splits
    from training.digits.evaluator import load_evaluator

    evaluator = load_evaluator()
    _, held_out = load_splits()
    results = []
    for path in PATHS:
        images, digits = images_by_path[path.key]
        results.append(PathResult(
            key=path.key, label=path.label, steps=path.steps, unet_evals=path.unet_evals,
            accuracy=evaluator.accuracy(images, digits),
            frechet_distance=evaluator.frechet_distance(images, held_out.images),
            seconds_per_image=timings[path.key],
        ))
    return results


def markdown_table(results: list[PathResult]) -> str:
    lines = ["| path | steps | UNet evals / image | accuracy | Fréchet distance | ComfyUI time / image (ms) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.label} | {r.steps} | {r.unet_evals} | {100 * r.accuracy:.1f} % | "
                     f"{r.frechet_distance:.1f} | {1000 * r.seconds_per_image:.1f} |")
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from training.digits.teacher import TeacherConfig

    parser = argparse.ArgumentParser(description="Distil the digits teacher with FlashDistillTrain in ComfyUI and compare.")
    parser.add_argument("--retrain", action="store_true", help="distil the student again (the teacher stays cached)")
    parser.add_argument("--teacher-steps", type=int, default=TeacherConfig.steps, help="teacher UNet steps (first run)")
    parser.add_argument("--teacher-vae-steps", type=int, default=TeacherConfig.vae_steps)
    parser.add_argument("--student-steps", type=int, default=500, help="FlashDistillTrain steps")
    parser.add_argument("--per-digit", type=int, default=10, help="images per digit and path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--serve", action=argparse.BooleanOptionalAction, default=sys.stdin.isatty(),
                        help="keep ComfyUI running afterwards to open the workflows (default: from a terminal)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run_demo(args)
    except (RuntimeError, TimeoutError, OSError) as error:  # a failed workflow / server: its message, not a trace
        print(f"\nmake demo failed: {error}", file=sys.stderr)
        return 1


def run_demo(args: argparse.Namespace) -> int:
    from training.digits.teacher import (
        TeacherConfig,
        default_teacher_dir,
        train_teacher,
    )

    torch.set_num_threads(min(2, torch.get_num_threads()))
    demo_started = time.monotonic()
    demo = demo_dir()
    base, models_root, results_dir = demo / "comfyui", demo / "models", demo / "results"
    timings: dict[str, float] = {}

    print("[1/5] the digits teacher (trained once, then cached)...", flush=True)
    started = time.monotonic()
    teacher_dir = train_teacher(default_teacher_dir(), TeacherConfig(steps=args.teacher_steps, vae_steps=args.teacher_vae_steps,
                                                                     seed=args.seed))
    timings["teacher_s"] = time.monotonic() - started
    prepare_models(Path(teacher_dir), models_root)
    count = write_dataset(base / "input" / DATASET_FOLDER, args.seed)
    print(f"      teacher: {teacher_dir}\n      training data: {count} digits in {base / 'input' / DATASET_FOLDER}", flush=True)

    print("[2/5] starting ComfyUI with the Flash nodes...", flush=True)
    server = ComfyServer(models_root=models_root, base_dir=base, port=args.port, log_path=demo / "comfyui.log")
    server.start()
    try:
        lora = models_root / "loras" / "flash" / f"{LORA_NAME}.safetensors"
        settings_file = lora.with_suffix(".demo.json")
        wanted = {"student_steps": args.student_steps, "teacher": str(Path(teacher_dir).resolve())}
        cached = lora.is_file() and settings_file.is_file() and json.loads(settings_file.read_text()) == wanted
        if cached and not args.retrain:
            print(f"[3/5] the Flash student is cached: {lora} (--retrain to distil again)", flush=True)
        else:
            print(f"[3/5] comfy run flash_demo_distill.json: FlashDistillTrain, {args.student_steps} steps...",
                  flush=True)
            settings_file.unlink(missing_ok=True)
            timings["distill_s"] = run_cli(server, distill_workflow(args.student_steps), "flash_demo_distill", timeout=3600,
                                         stream=True)
            settings_file.write_text(json.dumps(wanted))
            print(f"      wrote {lora} in {timings['distill_s']:.0f} s", flush=True)

        print("[4/5] comfy run flash_demo_compare.json for each digit: teacher 25 / 2 steps, student 1 / 2 / 4 steps...",
              flush=True)
        output = server.output_dir() / OUTPUT_PREFIX / "compare"
        for stale in (output, output.with_name("timing")):  # earlier runs' images would be scored again
            shutil.rmtree(stale, ignore_errors=True)
        for digit in tqdm(range(10), desc="digits"):
            run_cli(server, compare_workflow(digit, args.per_digit, args.seed), f"flash_demo_compare_d{digit}", timeout=600)
        path_seconds = time_paths(server, args.per_digit, args.seed)

        print("[5/5] scoring with the digit classifier...", flush=True)
        images = {path.key: read_images(output, path.key, args.per_digit) for path in PATHS}
        results = score(images, path_seconds)
        timings["total_s"] = time.monotonic() - demo_started
        write_outputs(results_dir, results, images, args, timings)
        print("\n" + markdown_table(results))
        print(f"\ngrid:    {results_dir / 'grid.png'}\ntable:   {results_dir / 'results.md'}\n"
              f"json:    {results_dir / 'results.json'}\nimages:  {output}\nstudent: {lora}")
        print(f"\ndemo finished in {timings['total_s'] / 60:.1f} min (teacher {timings['teacher_s']:.0f} s"
              + (f", distillation {timings['distill_s']:.0f} s" if "distill_s" in timings else ", student cached") + ")")
        if args.serve:
            print(f"\nOpen {server.url} and load a workflow from the template browser "
                  "(Workflow > Browse Templates > ComfyUI-Flash: flash_demo_compare, flash_demo_distill).")
            print("ComfyUI keeps running; press Ctrl-C to stop.", flush=True)
            try:
                while server.alive():
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    finally:
        server.stop()
    return 0


def write_outputs(folder: Path, results: list[PathResult], images: dict, args: argparse.Namespace, timings: dict) -> None:
    from training.digits.benchmark import write_grid, write_json

    folder.mkdir(parents=True, exist_ok=True)
    write_grid(folder / "grid.png", [(p.label, images[p.key][0]) for p in PATHS], images[PATHS[0].key][1],
               args.per_digit)
    write_json(folder / "results.json", {
        "settings": {k: v for k, v in vars(args).items() if k not in ("serve", "port")},
        "results": [asdict(r) for r in results], "timings_s": timings,
    })
    tmp = folder / "results.md.tmp"
    tmp.write_text(markdown_table(results) + "\n")
    os.replace(tmp, folder / "results.md")


if __name__ == "__main__":
    sys.exit(main())
