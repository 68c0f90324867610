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

    python -m training.digits.demo [--retrain] [--teacher-steps N] [--total-steps N] [--per-digit N] [--serve]
                                   [--results-dir DIR | --record]
"""

from __future__ import annotations

import time

IMPORTED_AT = time.monotonic()  # the run's clock starts before torch's import (seconds of a newcomer's wait)

import argparse
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import re
import shutil
import statistics
import sys
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from flash_core.files import (
    replace_folder_atomic,
    staging_folder,
    write_atomic,
    write_text_atomic,
)
from training.fixtures.comfy_env import REPO_ROOT, cache_dir
from training.fixtures.comfy_progress import PromptEvent, PromptFailed, PromptFollower
from training.fixtures.comfy_server import ComfyServer

DISTILL_WORKFLOW = REPO_ROOT / "workflows" / "api" / "flash_demo_distill.json"
COMPARE_WORKFLOW = REPO_ROOT / "workflows" / "api" / "flash_demo_compare.json"
RESULTS_DIR = REPO_ROOT / "bench" / "results" / "demo"  # committed: the README's table, grid and run times
TEACHER_PIPELINE = "flash_digits_teacher"  # models/diffusers/<name>
LORA_NAME = "flash_digits_demo"  # models/loras/flash/<name>.safetensors, written by FlashDistillTrain
DATASET_FOLDER = "flash_digits"  # input/<name>/: training PNGs + caption .txt files
OUTPUT_PREFIX = "flash_demo"  # output/<prefix>/: distill_preview_*, compare/, timing/
DISTILL_NODE = "5"  # FlashDistillTrain in flash_demo_distill.json
TIMING_REPEATS = 3
STEPS = ("teacher", "setup", "distillation", "comparison", "scoring")  # timing.json's steps, in run order
LINE_WIDTH = 120  # no line of the demo's own output is wider (a path alone may be)
PLAIN_EVERY_S = 15.0  # without a terminal: one progress line at most this often
INDENT = "      "


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


def distill_workflow(total_steps: int) -> dict:
    workflow = load_workflow(DISTILL_WORKFLOW)
    workflow["5"]["inputs"]["steps"] = total_steps  # FlashDistillTrain's input id "steps" (shown as total_steps)
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


# ---- terminal output -----------------------------------------------------------------------------
class Console:
    """The demo's terminal: short lines. Live progress is one line rewritten in place (\\r) on a terminal;
    without one (a pipe, a log file, a test) it is printed as a plain line at most every PLAIN_EVERY_S."""

    def __init__(self, stream: TextIO | None = None, every_s: float = PLAIN_EVERY_S):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.width = min(LINE_WIDTH, shutil.get_terminal_size().columns - 1) if self.tty else LINE_WIDTH
        self.every_s = every_s
        self._live = ""  # what the live line shows now (terminal only)
        self._last_plain = -math.inf

    def line(self, text: str = "") -> None:
        self.end_live()
        self.stream.write(text + "\n")
        self.stream.flush()

    def live(self, text: str, force: bool = False) -> bool:
        """Show `text` as the live line; False when it was not printed (no terminal, printed too recently).
        force: print it now, and on a terminal keep it (the final state of a progress line)."""
        text = text[: self.width]
        if self.tty:
            self.stream.write("\r" + text + " " * max(0, len(self._live) - len(text)) + ("\n" if force else ""))
            self._live = "" if force else text
        elif force or time.monotonic() - self._last_plain >= self.every_s:
            self.stream.write(text + "\n")
            self._last_plain = time.monotonic()
        else:
            return False
        self.stream.flush()
        return True

    def labelled(self, label: str, path: Path | str, indent: str = "") -> None:
        """`label: path` on one line when it fits the width, else the path on the next line."""
        line = f"{indent}{label}: {shown(path)}"
        self.line(line if len(line) <= self.width else f"{indent}{label}:\n{INDENT}{shown(path)}")

    def end_live(self) -> None:
        if self._live:
            self.stream.write("\r" + " " * len(self._live) + "\r")
            self._live = ""


def shown(path: Path | str) -> str:
    """A path as the user types it: relative to the working directory when inside it."""
    path = Path(path).absolute()
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def duration(seconds: float) -> str:
    if seconds < 100:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


class StepLog:
    """The numbered steps: a line when one starts, one when it finishes (what, how long, where), and their
    seconds for timing.json."""

    def __init__(self, console: Console):
        self.console = console
        self.seconds: dict[str, float] = {}
        self._started = 0.0

    def start(self, name: str, text: str) -> None:
        self._started = time.monotonic()
        self.console.line(f"[{STEPS.index(name) + 1}/{len(STEPS)}] {text}")

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def finish(self, name: str, text: str, where: Path | str | None = None) -> None:
        self.seconds[name] = self.elapsed()
        line = f"[{STEPS.index(name) + 1}/{len(STEPS)}] {text} in {duration(self.seconds[name])}"
        if where is None:
            self.console.line(line)
        else:
            self.console.labelled(line, where)


class DemoLog:
    """<cache>/demo/demo.log: the details the terminal leaves out (comfy-cli's output, ComfyUI's answers)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, f"make demo, {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")

    def write(self, title: str, text: str = "") -> None:
        with self.path.open("a") as log:
            log.write(f"\n== {title}\n{text.rstrip()}\n" if text else f"\n== {title}\n")


LOSS_PATTERN = re.compile(r"\bloss[\s:=]+(-?[0-9.]+(?:e[-+]?[0-9]+)?|nan|inf)", re.IGNORECASE)


class DistillProgress:
    """Shows a FlashDistillTrain prompt's websocket events: the node running, then `step i/n  loss  s/step  ETA`
    on the live line, and one line per preview grid the node sends (saved to `preview_dir`)."""

    def __init__(self, console: Console, log: DemoLog, workflow: dict, preview_dir: Path, output_dir: Path):
        self.console, self.log, self.output_dir = console, log, output_dir
        self.titles = {node: data.get("_meta", {}).get("title", data["class_type"]) for node, data in workflow.items()}
        self.preview_dir = preview_dir
        shutil.rmtree(preview_dir, ignore_errors=True)  # an earlier run's grids
        self.previews: list[Path] = []
        self.outputs: dict[str, dict] = {}
        self.step = self.total = 0
        self.node_text = ""
        self._first: tuple[float, int] | None = None  # (time, step) of the first step report
        self._running: str | None = None
        self._running_since = 0.0
        self._shown_step = -1  # the step of the last progress line printed

    def __call__(self, event: PromptEvent) -> None:
        if event.kind == "executing" and event.node != self._running:  # ComfyUI may announce a node twice
            self._running, self._running_since = event.node, time.monotonic()
            self.console.line(f"{INDENT}running {self.titles.get(event.node, event.node)}"[: self.console.width])
        elif event.kind == "progress" and event.node == DISTILL_NODE:
            self.step, self.total = event.value, event.total
            if self._first is None:
                self._first = (time.monotonic(), event.value)
            if self.console.live(self.status(), force=self.step == self.total):
                self._shown_step = self.step
        elif event.kind == "progress":
            self.console.live(f"{INDENT}{self.titles.get(event.node, event.node)}: {event.value}/{event.total}")
        elif event.kind == "text" and event.node == DISTILL_NODE:
            self.node_text = event.text.strip()
            self.log.write("FlashDistillTrain", self.node_text)
        elif event.kind == "preview":
            path = self.preview_dir / f"distill_step{self.step:05d}.{event.image_format}"
            write_atomic(path, lambda tmp: Path(tmp).write_bytes(event.image))
            self.previews.append(path)
            self.console.labelled(f"preview grid, step {self.step}", path, INDENT)
        elif event.kind == "executed":
            self.outputs[event.node] = event.output or {}
            for image in (event.output or {}).get("images", []):
                if image.get("type") == "output":  # SaveImage's file (PreviewImage's are temporary)
                    path = self.output_dir / image.get("subfolder", "") / image["filename"]
                    self.console.labelled(f"saved {self.titles.get(event.node, event.node)}", path, INDENT)

    def tick(self) -> None:
        """About once a second between events: the ETA ticks on a terminal; without one, a step not shown yet."""
        if self._first is not None and self.step < self.total:
            if (self.console.tty or self.step != self._shown_step) and self.console.live(self.status()):
                self._shown_step = self.step
        elif self._first is None and self._running is not None:  # a node without a progress bar (VAE encoding)
            title = self.titles.get(self._running, self._running)
            self.console.live(f"{INDENT}{title}: {duration(time.monotonic() - self._running_since)}")

    def status(self) -> str:
        parts = [f"{INDENT}step {self.step}/{self.total}"]
        loss = LOSS_PATTERN.search(self.node_text)
        if loss:
            parts.append(f"loss {loss.group(1)}")
        elif self.node_text:
            parts.append(self.node_text[:60])
        started, first_step = self._first or (time.monotonic(), self.step)
        if self.step > first_step:
            seconds_per_step = (time.monotonic() - started) / (self.step - first_step)
            parts.append(f"{seconds_per_step:.2f} s/step")
            if self.step < self.total:
                parts.append(f"ETA {duration(seconds_per_step * (self.total - self.step))}")
        return "  ".join(parts)


# ---- running -------------------------------------------------------------------------------------
def save_workflow(workflow: dict, name: str) -> Path:
    path = demo_dir() / "workflows" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(workflow, indent=1))
    return path


def run_cli(server: ComfyServer, workflow: dict, name: str, timeout: float, log: DemoLog) -> float:
    """Write `workflow` to <demo>/workflows/<name>.json and run it with comfy-cli (`comfy run --workflow F --wait`);
    its output goes to the log. Returns seconds."""
    path = save_workflow(workflow, name)
    started = time.monotonic()
    result = server.comfy_cli_run(path, timeout=timeout)
    seconds = time.monotonic() - started
    log.write(f"comfy run --workflow {path} --wait: exit {result.returncode}, {seconds:.1f} s",
              f"{result.stdout or ''}\n{result.stderr or ''}")
    if result.returncode != 0:
        raise RuntimeError(f"comfy run --workflow {shown(path)} failed (exit {result.returncode})")
    return seconds


def run_distillation(server: ComfyServer, workflow: dict, console: Console, log: DemoLog, timeout: float) -> DistillProgress:
    """Queue the distillation and show its progress until it finished (its LoRA written)."""
    log.write("queue flash_demo_distill", f"workflow: {save_workflow(workflow, 'flash_demo_distill')}")
    progress = DistillProgress(console, log, workflow, demo_dir() / "previews", server.output_dir())
    follower = PromptFollower("127.0.0.1", server.port, server.post)
    try:
        prompt_id = follower.run(workflow, progress, timeout=timeout, is_alive=server.alive, tick=progress.tick)
    except PromptFailed as error:
        console.end_live()
        log.write("flash_demo_distill failed", json.dumps(error.details, indent=1))
        raise
    console.end_live()
    log.write(f"flash_demo_distill finished: prompt {prompt_id}", json.dumps(progress.outputs, indent=1))
    return progress


def execution_seconds(entry: dict) -> float:
    """ComfyUI's own execution time of a finished prompt (execution_start -> execution_success)."""
    stamps = {event: data["timestamp"] for event, data in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def time_paths(server: ComfyServer, per_digit: int, seed: int, console: Console, log: DemoLog) -> dict[str, float]:
    """Seconds per image of each path, executed alone in ComfyUI (median of TIMING_REPEATS, warm models)."""
    timings = {}
    for number, path in enumerate(PATHS, 1):
        samples = []
        for repeat in range(TIMING_REPEATS + 1):  # the first run warms the path up (model patching, caches)
            console.live(f"{INDENT}timing path {number}/{len(PATHS)} ({path.label}): run {repeat + 1}/{TIMING_REPEATS + 1}")
            workflow = prune_to(compare_workflow(0, per_digit, seed + 1000 * (repeat + 1)), path.save_node)
            workflow[path.save_node]["inputs"]["filename_prefix"] = f"{OUTPUT_PREFIX}/timing/{path.key}"
            entry = server.run(workflow, timeout=600)
            if entry["status"].get("status_str") != "success":
                log.write(f"timing run of {path.key} failed", json.dumps(entry, indent=1))
                raise RuntimeError(f"timing run of {path.key} failed ({entry['status'].get('status_str')})")
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


# ---- results and run times -----------------------------------------------------------------------
def run_kind(teacher_cached: bool, student_cached: bool) -> str:
    """timing.json's key for a run: what it had to make (a first run installs the shipped teacher)."""
    if not teacher_cached:
        return "first_run" if not student_cached else "teacher_installed_student_cached"
    return "later_run" if student_cached else "teacher_cached_student_distilled"


def machine() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    return {"cpu_cores": os.cpu_count(), "cpu": cpu, "torch_threads": torch.get_num_threads(),
            "load_average_1min_at_start": round(os.getloadavg()[0], 2)}


def write_outputs(folder: Path, results: list[PathResult], images: dict, settings: dict, timing: dict) -> None:
    """grid.png, results.json, results.md; timing.json keeps one record per run kind (first run, later run...)."""
    from training.digits.benchmark import write_grid

    folder.mkdir(parents=True, exist_ok=True)
    write_grid(folder / "grid.png", [(p.label, images[p.key][0]) for p in PATHS], images[PATHS[0].key][1],
               settings["per_digit"])
    write_text_atomic(folder / "results.json", json.dumps({
        "command": "make demo", "date": timing["date"], "settings": settings,
        "results": [asdict(r) for r in results]}, indent=2) + "\n")
    write_text_atomic(folder / "results.md", markdown_table(results) + "\n\n" + (
        f"`make demo` on {timing['date'][:10]}: FlashDistillTrain {settings['total_steps']} steps, "
        f"{settings['per_digit']} images per digit and path, seed {settings['seed']}; "
        f"{timing['machine']['cpu_cores']} CPU cores.\n"))
    timing_file = folder / "timing.json"
    runs = json.loads(timing_file.read_text())["runs"] if timing_file.is_file() else {}
    runs[timing["kind"]] = timing
    write_text_atomic(timing_file, json.dumps({
        "command": "make demo",
        "note": "seconds per step of `make demo` (after `make setup`), one record per kind of run: first_run trains "
                "the teacher and distils the student, later_run finds both cached; total_s includes Python's imports; "
                "teacher_training_s is the teacher's own record of its training, also when it came from the cache",
        "runs": dict(sorted(runs.items()))}, indent=2) + "\n")


# ---- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from training.digits.benchmark import add_total_steps_flag
    from training.digits.teacher import TeacherConfig

    parser = argparse.ArgumentParser(description="Distil the digits teacher with FlashDistillTrain in ComfyUI and compare.")
    parser.add_argument("--retrain", action="store_true", help="distil the student again (the teacher stays cached)")
    parser.add_argument("--teacher-steps", type=int, default=TeacherConfig.steps, help="teacher UNet steps (first run)")
    parser.add_argument("--teacher-vae-steps", type=int, default=TeacherConfig.vae_steps)
    parser.add_argument("--teacher-batch-size", type=int, default=TeacherConfig.batch_size)
    add_total_steps_flag(parser, 1000, "FlashDistillTrain total_steps (iterations: half student, half discriminator updates)")
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
