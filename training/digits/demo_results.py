"""`make demo`'s scoring and results: each path's images read back and scored with the benchmark's digit
classifier (accuracy, Fréchet distance), the markdown table, and the files a run writes (grid.png,
results.json, results.md, timing.json with one record per kind of run)."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from flash_core.files import write_text_atomic
from training.digits.demo_workflows import PATHS


@dataclass
class PathResult:
    key: str
    label: str
    steps: int
    unet_evals: int
    accuracy: float
    frechet_distance: float
    seconds_per_image: float


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
