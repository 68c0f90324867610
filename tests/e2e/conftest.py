"""Live-server fixtures: a real ComfyUI (--cpu, loopback, free port) with this pack and fixture models.

The server gets its own --base-directory (input/output/user/custom_nodes) and the fixture model folders
through --extra-model-paths-config: the cached tiny SD1.5 checkpoint plus files tests write themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from training.digits.teacher import TeacherConfig
from training.fixtures import tiny_checkpoint
from training.fixtures.browser import Frontend, open_frontend
from training.fixtures.comfy_server import ComfyServer

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO_ROOT / "workflows"
TINY_CHECKPOINT = tiny_checkpoint.CHECKPOINT_NAME
TINY_LORA = tiny_checkpoint.LORA_NAME


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for folder in ("checkpoints", "loras"):
        (root / folder).mkdir()
    (root / "checkpoints" / TINY_CHECKPOINT).symlink_to(tiny_checkpoint.build())
    (root / "loras" / TINY_LORA).symlink_to(tiny_checkpoint.build_lora())
    return root


# The digits teacher of the tests that run the embedded default (test_demo, test_distill_my_stack) when the default
# one is not cached: the default recipe at half the batch and a cut VAE budget, 7.5 min on the idle 2-core machine
# against 12 (its ~1000 UNet steps are what make prompts steer it: at 400 it is still unconditional, 13 %
# accuracy; this one scores 82 % at 25 steps, the default 88 %). Trained once into the cache, then reused.
E2E_TEACHER = TeacherConfig(vae_steps=120, batch_size=32)


E2E_DIR = Path(__file__).resolve().parent
_background_teacher: dict = {}  # "process": the Popen training the e2e teacher, "threads": pytest's torch threads


def e2e_teacher_folder() -> Path:
    from training.fixtures.comfy_env import cache_dir

    return cache_dir() / "digits" / "teacher-e2e"


def cached_teacher() -> tuple[Path, TeacherConfig] | None:
    from training.digits.teacher import default_teacher_dir, is_complete

    for folder, config in ((default_teacher_dir(), TeacherConfig()), (e2e_teacher_folder(), E2E_TEACHER)):
        if is_complete(folder, config):
            return folder, config
    return None


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected: only a run that will use the teacher trains it
def pytest_collection_modifyitems(config, items):
    """The end-to-end tests run last. When some of them need the digits teacher and none is cached (a fresh
    machine), it is trained meanwhile by a background process on the other core (one torch thread each for it
    and for the tests before); the `digits_teacher` fixture then waits for it through train_teacher's lock."""
    items.sort(key=lambda item: E2E_DIR in Path(item.path).parents)  # stable: the order within each part stays
    if _background_teacher or not any("digits_teacher" in getattr(item, "fixturenames", ()) for item in items):
        return
    if config.option.collectonly or cached_teacher() is not None:
        return
    import torch

    folder = e2e_teacher_folder()
    folder.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-P", "-m", "training.digits.teacher", "--out", str(folder),
               "--steps", str(E2E_TEACHER.steps), "--vae-steps", str(E2E_TEACHER.vae_steps),
               "--batch-size", str(E2E_TEACHER.batch_size), "--seed", str(E2E_TEACHER.seed)]
    with open(folder.parent / "teacher-e2e.log", "w") as log:  # the child keeps its own handle
        _background_teacher["process"] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _background_teacher["threads"] = torch.get_num_threads()
    torch.set_num_threads(1)


def pytest_sessionfinish(session, exitstatus):
    process = _background_teacher.get("process")
    if process is not None and process.poll() is None:  # the run ended before any test needed the teacher
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="session")
def digits_teacher() -> tuple[Path, TeacherConfig]:
    """(folder, config) of a finished digits teacher: the cached default (`make demo`), else the e2e one, trained
    on a fresh machine (minutes; in the background while the other tests run) into FLASH_CACHE_DIR / .cache,
    where the floor-version run finds it."""
    from training.digits.teacher import train_teacher

    cached = cached_teacher()
    if cached is None:
        cached = train_teacher(e2e_teacher_folder(), E2E_TEACHER), E2E_TEACHER  # waits for the background build
    process = _background_teacher.get("process")
    if process is not None:
        process.wait()
        assert process.returncode == 0, f"the background teacher build failed: see {e2e_teacher_folder().parent}/teacher-e2e.log"
        import torch

        torch.set_num_threads(_background_teacher["threads"])
    return cached


@pytest.fixture(scope="session")
def server(tmp_path_factory, models_root):
    base = tmp_path_factory.mktemp("comfy_base")
    srv = ComfyServer(models_root=models_root, base_dir=base, log_path=base / "comfyui.log")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def frontend(server) -> Iterator[Frontend]:
    """The real frontend of the session's ComfyUI server in a real (headless) Chromium."""
    with open_frontend(server.url) as opened:
        yield opened


def load_api_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def small(workflow: dict, size: int = 64) -> dict:
    """Shrink every EmptyLatentImage so the tiny model runs in about a second on the CPU."""
    for node in workflow.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"]["width"] = node["inputs"]["height"] = size
    return workflow


def error_text(entry: dict) -> str:
    """The text ComfyUI's error panel shows for a run: validation answer or execution_error message."""
    if "rejected" in entry:
        return json.dumps(entry["rejected"])
    messages = entry.get("status", {}).get("messages", [])
    errors = [data for kind, data in messages if kind == "execution_error"]
    return "\n".join(f"{e.get('node_type')}: {e.get('exception_message')}" for e in errors)
