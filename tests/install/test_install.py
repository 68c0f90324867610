"""The pack installed the way its users install it, into a ComfyUI environment with the newest packages.

`make newest` builds .venv-newest/ as a user's ComfyUI 0.30.0 environment is built (its own requirements.txt at
the newest releases the registries serve), then installs the pack's requirements.txt as ComfyUI-Manager does
(tests/install/manager_install.py, which records the installed versions before and after and pip's report).
This module checks that record (nothing already installed was upgraded, downgraded or replaced, torch above all),
then installs the pack as `comfy node install` does from the Comfy Registry: the package `comfy node pack` builds
(comfy-cli's own zip_files) unzipped into custom_nodes/, its requirements.txt given to pip. A real ComfyUI starts
with that copy as its only Flash pack, the six nodes register from it, and a Flash Sampler graph and a short
Flash Distill Train graph run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.fixtures import tiny_checkpoint
from training.fixtures.comfy_server import PACK_DIR_NAME, ComfyServer

from .conftest import RECORD

pytestmark = [pytest.mark.slow, pytest.mark.install_check]

REPO_ROOT = Path(__file__).resolve().parents[2]
REGISTRY_ID = "comfyui-flash"  # pyproject.toml [project] name: the folder `comfy node install` unpacks into
NODE_IDS = ["FlashDiffusersLoader", "FlashDistillTrain", "FlashLoRALoader", "FlashSampler", "FlashSamplerSelect",
            "FlashScheduler"]
# comfy-cli lives in the development venv (requirements-dev.txt), not in the user's environment this one stands for
ZIP = "import sys; from comfy_cli.file_utils import zip_files; zip_files(sys.argv[1])"


def _dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _record() -> dict:
    return json.loads(RECORD.read_text())


def test_installing_the_requirements_changed_no_installed_package():
    record = _record()
    assert record["requirements"] == (REPO_ROOT / "requirements.txt").read_text(), \
        "requirements.txt changed since .venv-newest was built: run `make newest`"
    assert record["returncode"] == 0, record["pip_output"]
    before, after = record["before"], record["after"]
    by_pip = {_dist(name): version for name, version in record["installed_by_pip"].items()}
    assert {"torch", "torchvision", "torchaudio", "transformers", "numpy", "safetensors"} <= set(before)
    changed = {name: f"{version} -> {after.get(name, 'removed')}" for name, version in before.items()
               if after.get(name) != version}
    assert not changed, f"pip install -r requirements.txt changed packages ComfyUI had installed: {changed}"
    replaced = {name: version for name, version in by_pip.items() if name in before}
    assert not replaced, f"pip install -r requirements.txt reinstalled packages ComfyUI had installed: {replaced}"
    assert {"peft", "diffusers"} <= set(by_pip), "the pack's own packages come from its requirements.txt"
    # what this lane is for: the newest releases, transformers 5.x among them
    assert int(after["transformers"].split(".")[0]) >= 5, after["transformers"]


@pytest.fixture(scope="module")
def registry_install(tmp_path_factory) -> Path:
    """A ComfyUI base directory whose custom_nodes/ holds the registry package of this checkout, unpacked."""
    base = tmp_path_factory.mktemp("registry_base")
    archive = base / "node.zip"
    python = os.environ.get("FLASH_DEV_PYTHON") or str(REPO_ROOT / ".venv" / "bin" / "python")
    built = subprocess.run([python, "-c", ZIP, str(archive)], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    with zipfile.ZipFile(archive) as package:
        package.extractall(base / "custom_nodes" / REGISTRY_ID)
    return base


def test_the_registry_package_requirements_are_the_ones_installed(registry_install):
    """`comfy node install` then installs the package's requirements.txt: the same file, so nothing more to do."""
    requirements = registry_install / "custom_nodes" / REGISTRY_ID / "requirements.txt"
    assert requirements.read_text() == (REPO_ROOT / "requirements.txt").read_text()
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-q", "--report", "-",
                             "-r", str(requirements)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["install"] == []


def test_the_packaged_nodes_import_their_own_flash_core(registry_install):
    """The pack's __init__.py appends its folder to sys.path: the registry copy uses its own flash_core, even where
    a flash_core is installed (this venv's editable install of the checkout comes later on the import path)."""
    folder = registry_install / "custom_nodes" / REGISTRY_ID
    code = f"import sys; sys.path.append({str(folder)!r}); import flash_core; print(flash_core.__file__)"
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(folder), result.stdout


class RegistryServer(ComfyServer):
    """ComfyServer with the unpacked registry package as the only Flash pack (no link to this checkout)."""

    def command(self) -> list[str]:
        command = super().command()
        link = self.base_dir / "custom_nodes" / PACK_DIR_NAME
        if link.is_symlink():
            link.unlink()
        return command


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for folder in ("checkpoints", "loras"):
        (root / folder).mkdir()
    (root / "checkpoints" / tiny_checkpoint.CHECKPOINT_NAME).symlink_to(tiny_checkpoint.build())
    (root / "loras" / tiny_checkpoint.LORA_NAME).symlink_to(tiny_checkpoint.build_lora())
    return root


@pytest.fixture(scope="module")
def server(registry_install, models_root):
    srv = RegistryServer(models_root=models_root, base_dir=registry_install,
                         log_path=registry_install / "comfyui.log")
    srv.start()
    yield srv
    srv.stop()


def _workflow(name: str) -> dict:
    """A shipped API workflow at test size: 64x64 latents (the tiny model runs them in about a second)."""
    workflow = json.loads((REPO_ROOT / "workflows" / "api" / f"{name}.json").read_text())
    for node in workflow.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
    return workflow


def _errors(entry: dict) -> str:
    messages = entry.get("status", {}).get("messages", [])
    return json.dumps(entry.get("rejected")) + "\n".join(
        f"{data.get('node_type')}: {data.get('exception_message')}" for kind, data in messages if kind == "execution_error")


def test_comfyui_starts_and_the_six_nodes_register_from_the_package(server):
    info = server.get("/object_info", timeout=60)
    flash = {node_id: entry["python_module"] for node_id, entry in info.items() if node_id.startswith("Flash")}
    assert sorted(flash) == NODE_IDS
    assert set(flash.values()) == {f"custom_nodes.{REGISTRY_ID}"}, flash
    log = server.log_tail(10**7)
    assert f"custom_nodes/{REGISTRY_ID}" in log and "IMPORT FAILED" not in log


def test_a_flash_sampler_graph_runs(server):
    entry = server.run(_workflow("flash_txt2img"), timeout=300)  # checkpoint -> Flash LoRA Loader -> Flash Sampler
    assert entry["status"]["status_str"] == "success", _errors(entry)
    images = server.output_images(entry)
    assert images and np.asarray(Image.open(images[0])).std() > 0


def test_a_short_flash_distill_train_graph_runs(server, models_root):
    """The shipped distillation workflow at its smallest: 2 teacher latents, 2 steps, then Flash Sampler on the
    student. Less ComfyUI's own Plot Loss Graph (8): it divides by the loss range, zero over so few steps."""
    workflow = _workflow("flash_distill_train")
    del workflow["8"]
    workflow["4"]["inputs"]["batch_size"] = 2
    workflow["5"]["inputs"]["steps"] = 2
    workflow["6"]["inputs"].update(lora_name="installed_student", steps=2, rank=4, learning_rate=1e-4,
                                   teacher_steps=4, batch_size=2, preview_every=0, overwrite=True,
                                   gradient_checkpointing=False)
    workflow["10"]["inputs"]["steps"] = 2
    for key, node in workflow.items():
        if node["class_type"] in ("SaveImage", "LossGraphNode"):
            node["inputs"]["filename_prefix"] = f"installed/{key}"
    entry = server.run(workflow, timeout=600)
    assert entry["status"]["status_str"] == "success", _errors(entry)
    assert (models_root / "loras" / "flash" / "installed_student.safetensors").is_file()
    student = [path for path in server.output_images(entry) if path.name.startswith("12")]
    assert student and np.asarray(Image.open(student[0])).std() > 0
