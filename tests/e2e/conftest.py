"""Live-server fixtures: a real ComfyUI (--cpu, loopback, free port) with this pack and fixture models.

The server gets its own --base-directory (input/output/user/custom_nodes) and the fixture model folders
through --extra-model-paths-config: the cached tiny SD1.5 checkpoint plus files tests write themselves.
"""

from __future__ import annotations

import json
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


E2E_DIR = Path(__file__).resolve().parent


LONGEST_FIRST = ("test_demo.py", "test_distill_train.py")  # the longest modules: started first


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected
def pytest_collection_modifyitems(config, items):
    """The longest end-to-end modules run first (stable: the order within each module stays): under pytest-xdist
    (`make test`, one module per worker at a time) one worker starts on them while the other takes the rest, so
    they do not become the tail of the run."""
    items.sort(key=lambda item: (LONGEST_FIRST.index(Path(item.path).name) if Path(item.path).name in LONGEST_FIRST
                                 and E2E_DIR in Path(item.path).parents else len(LONGEST_FIRST)))


@pytest.fixture(scope="session")
def digits_teacher() -> tuple[Path, TeacherConfig]:
    """(folder, config) of the digits teacher the pack ships (training/digits/shipped_teacher), installed into
    FLASH_CACHE_DIR / .cache in seconds (float32 copies of its fp16 weights, ComfyUI's tokenizer): no test trains it."""
    from training.digits.teacher import default_teacher_dir, shipped_config, train_teacher

    config = shipped_config()
    assert config is not None, "the pack ships no digits teacher (training/digits/shipped_teacher): run `make teacher`"
    return train_teacher(default_teacher_dir(), config), config


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
