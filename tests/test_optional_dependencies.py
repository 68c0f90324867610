"""A ComfyUI without the pack's requirements.txt installed: the pack still loads and registers every node, and the
node that needs a missing package says which one and the pip command (flash_core/dependencies.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from flash_core import dependencies
from flash_core.dependencies import FLOORS, MissingDependencyError, require
from tests.test_layering import imported_modules

REPO_ROOT = Path(__file__).resolve().parents[1]
NODE_IDS = ["FlashDiffusersLoader", "FlashDistillTrain", "FlashLoRALoader", "FlashSampler", "FlashSamplerSelect",
            "FlashScheduler"]

# Run in a fresh interpreter: a None in sys.modules makes `import peft` raise ImportError, as when it is not installed.
WITHOUT_PACKAGES = r"""
import asyncio, json, sys
for name in ("peft", "diffusers"):
    sys.modules[name] = None
from training.fixtures.comfy_env import load_pack

pack = load_pack()


async def node_list():
    return await (await pack.comfy_entrypoint()).get_node_list()


nodes = {node.define_schema().node_id: node for node in asyncio.run(node_list())}
report = {"nodes": sorted(nodes)}
try:
    nodes["FlashDistillTrain"].execute(
        model=[None], latents=[None], positive=[None], negative=[None], lora_name=["student"], steps=[8], nfe=[4],
        rank=[0], learning_rate=[0.0], guidance_min=[0.0], guidance_max=[0.0], teacher_steps=[0],
        distill_weights=[""], adversarial_weights=[""], dmd_weights=[""], seed=[0], batch_size=[0], resume=[True],
        overwrite=[False], preview_every=[0], gradient_checkpointing=[False], mixed_precision=["fp32"])
except Exception as err:
    report["train"] = [type(err).__name__, str(err)]
from flash_core.lora_formats.alpha import peft_alpha  # Flash LoRA Loader on a PEFT LoRA with an alpha_pattern
try:
    peft_alpha({"lora_alpha": 8, "alpha_pattern": {"to_q": 16}}, "down_blocks.0.attn.to_q", 8)
except Exception as err:
    report["alpha_pattern"] = [type(err).__name__, str(err)]
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def without_packages() -> dict:
    result = subprocess.run([sys.executable, "-P", "-c", WITHOUT_PACKAGES], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


def test_the_pack_loads_and_registers_every_node_without_peft_and_diffusers(without_packages):
    assert without_packages["nodes"] == NODE_IDS


def test_flash_distill_train_names_the_missing_package_and_the_pip_command(without_packages):
    kind, message = without_packages["train"]
    peft, diffusers = (f"{package}>={FLOORS[package]}" for package in ("peft", "diffusers"))
    assert kind == "MissingDependencyError"
    assert message.startswith(f"Flash Distill Train needs the Python packages {peft} (not installed: "), message
    assert f" and {diffusers} (not installed: " in message
    assert f'{sys.executable} -m pip install "{peft}" "{diffusers}"' in message
    assert "restart ComfyUI" in message and "requirements.txt" in message


def test_a_peft_lora_with_an_alpha_pattern_names_peft(without_packages):
    kind, message = without_packages["alpha_pattern"]
    assert kind == "MissingDependencyError" and f'pip install "peft>={FLOORS["peft"]}"' in message, message


def test_an_installed_package_older_than_its_floor_is_named_with_its_version(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", types.SimpleNamespace(__version__="0.12.0"))
    expected = r'^Flash Distill Train needs the Python package peft>=0\.15 \(this Python has peft 0\.12\.0\)\. ' \
               r'.*-m pip install "peft>=0\.15"'
    with pytest.raises(MissingDependencyError, match=expected):
        require("peft", "Flash Distill Train")
    monkeypatch.setitem(sys.modules, "peft", types.SimpleNamespace(__version__="0.15.0.dev0"))
    assert require("peft", "x").__version__ == "0.15.0.dev0"
    assert issubclass(MissingDependencyError, ImportError)


def test_installed_packages_pass():
    for package in FLOORS:
        assert require(package, "the test") is sys.modules[package]


def test_version_parsing():
    assert dependencies._version_tuple("0.35.2") == (0, 35, 2)
    assert dependencies._version_tuple("0.36.0.dev0") == (0, 36, 0)
    assert dependencies._version_tuple("1.0rc1") == (1, 0)


def _pack_modules_reached_from(path: Path) -> set[Path]:
    """The pack's own files (nodes/, flash_core/) that `path` imports, transitively (imports read with ast)."""
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for _, module in imported_modules(current):
            if module.split(".")[0] not in ("flash_core", "nodes"):
                continue
            parts = REPO_ROOT.joinpath(*module.split("."))
            for candidate in (parts.with_suffix(".py"), parts / "__init__.py", parts.parent.with_suffix(".py")):
                if candidate.is_file():
                    todo.append(candidate)
                    break
    return seen


def test_flash_diffusers_loader_needs_neither_diffusers_nor_peft():
    """FlashDiffusersLoader reads a diffusers folder itself (configs, safetensors): it never imports diffusers."""
    reached = _pack_modules_reached_from(REPO_ROOT / "nodes" / "pipelines.py")
    assert REPO_ROOT / "flash_core" / "file_formats.py" in reached
    offenders = [f"{path.relative_to(REPO_ROOT)}:{line} imports {module}" for path in sorted(reached)
                 for line, module in imported_modules(path) if module.split(".")[0] in FLOORS]
    assert offenders == []
