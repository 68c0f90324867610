"""Packaging: the pack passes the Comfy Registry's own validator and declares the ComfyUI we test on."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import flash_core
from training.fixtures.comfy_env import comfyui_path

REPO_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_comfy_node_validate_passes():
    comfy = Path(sys.executable).parent / "comfy"
    result = subprocess.run([str(comfy), "--skip-prompt", "node", "validate"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Security warnings" not in result.stdout + result.stderr


def test_registry_metadata_and_tested_comfyui_version():
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    prefix = "https://raw.githubusercontent.com/flash-comfyui/ComfyUI-Flash/main/"
    assert comfy["Icon"].startswith(prefix) and (REPO_ROOT / comfy["Icon"].removeprefix(prefix)).is_file()
    import re

    # `make test` runs on the Makefile's COMFYUI_VERSION and its FLOOR_VERSION: the floor is the requirement
    makefile = (REPO_ROOT / "Makefile").read_text()
    floor = re.search(r"^FLOOR_VERSION := (\S+)$", makefile, re.M).group(1)
    default = re.search(r"^COMFYUI_VERSION \?= (\S+)$", makefile, re.M).group(1)
    assert comfy["requires-comfyui"] == f">={floor}", "requires-comfyui must name the oldest ComfyUI the suite runs on"
    assert f"ComfyUI {floor}" in (REPO_ROOT / "README.md").read_text()
    assert f"ComfyUI {default}" in (REPO_ROOT / "README.md").read_text()
    tested = re.search(r'__version__ = "([^"]+)"', (comfyui_path() / "comfyui_version.py").read_text()).group(1)
    assert tested in (floor, default), f"this suite runs on ComfyUI {tested}, which `make test` does not install"
    assert PYPROJECT["project"]["version"] == flash_core.__version__
    assert "GPL-3.0" in PYPROJECT["project"]["license"]["text"]


def test_import_pack_outside_comfyui_is_harmless():
    code = "import runpy; g = runpy.run_path('__init__.py'); assert g['comfy_entrypoint'] is None"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_suite_runs_in_a_clone_whose_folder_name_has_a_dot(tmp_path):
    """A clone in `mktemp -d` (tmp.XXXX) or `ComfyUI-Flash.v2`: pytest must not import the root __init__.py (a
    custom-node package with a relative import) as a test package. Our pyproject.toml's plugin sees to it."""
    clone = tmp_path / "ComfyUI-Flash.v2"
    (clone / "sub").mkdir(parents=True)
    (clone / "tests").mkdir()
    (clone / "pyproject.toml").write_text((REPO_ROOT / "pyproject.toml").read_text())
    (clone / "__init__.py").write_text("from .sub import VALUE  # like our `from .nodes import comfy_entrypoint`\n")
    (clone / "sub" / "__init__.py").write_text("VALUE = 1\n")
    (clone / "tests" / "__init__.py").write_text("")
    (clone / "tests" / "test_one.py").write_text("def test_one():\n    assert True\n")
    command = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_one.py"]
    result = subprocess.run(command, cwd=clone, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr
    without_plugin = subprocess.run([*command, "-o", "addopts=--import-mode=importlib"], cwd=clone,
                                    capture_output=True, text=True, timeout=300)
    assert without_plugin.returncode != 0, "the check no longer reproduces the failure it guards against"
