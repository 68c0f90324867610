"""`make demo`'s ComfyUI graphs: the names they use (teacher pipeline, student LoRA, dataset folder, output
prefix), the compare workflow's generation paths, the workflows filled in for a run, and running them (comfy-cli
for the comparison, ComfyUI's API for the timing runs)."""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from flash_core.files import write_text_atomic
from training.digits.demo_console import INDENT, Console, DemoLog, shown
from training.fixtures.comfy_env import REPO_ROOT, cache_dir
from training.fixtures.comfy_server import ComfyServer

DISTILL_WORKFLOW = REPO_ROOT / "workflows" / "api" / "flash_demo_distill.json"
COMPARE_WORKFLOW = REPO_ROOT / "workflows" / "api" / "flash_demo_compare.json"
TEACHER_PIPELINE = "flash_digits_teacher"  # models/diffusers/<name>
LORA_NAME = "flash_digits_demo"  # models/loras/flash/<name>.safetensors, written by FlashDistillTrain
DATASET_FOLDER = "flash_digits"  # input/<name>/: training PNGs + caption .txt files
OUTPUT_PREFIX = "flash_demo"  # output/<prefix>/: distill_preview_*, compare/, timing/
DISTILL_NODE = "5"  # FlashDistillTrain in flash_demo_distill.json
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
