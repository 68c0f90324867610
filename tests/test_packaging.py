"""Packaging: the pack passes the Comfy Registry's own validator and declares the ComfyUI we test on."""

from __future__ import annotations

import re
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


# ---- requirements.txt: what a ComfyUI user's pip installs -----------------------------------------------------

TORCH_TRIO = {"torch", "torchvision", "torchaudio"}
TEST_TOOLS = {"pytest", "pytest-timeout", "playwright", "comfy-cli", "websocket-client"}
IMPORT_TO_DIST = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn"}  # import name -> pip name


def _dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(path: Path) -> dict[str, str]:
    """pip name -> the rest of the line (version specifiers), for every requirement line of a requirements file."""
    found = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        assert not line.startswith("-"), f"{path.name}: pip options ({line!r}) are not requirements"
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)", line)
        found[_dist(match.group(1))] = match.group(2).strip()
    return found


def _requirements_loose(path: Path) -> dict[str, str]:
    """Like _requirements, for a file we do not own (ComfyUI's: it may carry pip options)."""
    found = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)", line) if line and not line.startswith("-") else None
        if match:
            found[_dist(match.group(1))] = match.group(2)
    return found


def _floor(spec: str) -> tuple[int, ...]:
    match = re.search(r">=\s*([0-9][0-9.]*)", spec)
    assert match, f"{spec!r} has no >= lower bound"
    return tuple(int(part) for part in match.group(1).rstrip(".").split("."))


def test_root_requirements_are_lower_bounds_that_never_touch_torch():
    """requirements.txt is what ComfyUI-Manager / `comfy node install` / a git clone install into a user's own
    ComfyUI: nothing that replaces their torch, downgrades a shared package or fights another pack's pins."""
    text = (REPO_ROOT / "requirements.txt").read_text()
    assert text.startswith("#"), "requirements.txt starts with a comment saying what it is for"
    requirements = _requirements(REPO_ROOT / "requirements.txt")
    assert requirements, "requirements.txt lists the nodes' own dependencies"
    assert not TORCH_TRIO & set(requirements), "never torch / torchvision / torchaudio: the user's build stays"
    assert not TEST_TOOLS & set(requirements), "test tools belong to requirements-dev.txt"
    for name, spec in requirements.items():
        assert not re.search(r"==|~=|!=|<", spec), f"{name}{spec}: lower bounds only, no pins or caps"
        assert spec.startswith(">="), f"{name}{spec}: a lower bound (>=) it was tested at"


def test_root_requirements_list_every_package_the_nodes_import_beyond_comfyui():
    """Every import of nodes/, flash_core/ and the root __init__.py (module level and lazy ones alike) is the
    standard library, ComfyUI itself, one of ComfyUI's requirements, or listed in requirements.txt at the floor
    flash_core.dependencies checks."""
    from flash_core.dependencies import FLOORS
    from tests.test_layering import COMFYUI_MODULES, imported_modules

    ours = _requirements(REPO_ROOT / "requirements.txt")
    # what every supported ComfyUI requires: the tested one, and the floor version's checkout where `make` made one
    floor = re.search(r"^FLOOR_VERSION := (\S+)$", (REPO_ROOT / "Makefile").read_text(), re.M).group(1)
    comfyui = set(_requirements_loose(comfyui_path() / "requirements.txt"))
    if (REPO_ROOT / f".comfyui-{floor}" / "requirements.txt").is_file():
        comfyui &= set(_requirements_loose(REPO_ROOT / f".comfyui-{floor}" / "requirements.txt"))
    files = [REPO_ROOT / "__init__.py", *sorted((REPO_ROOT / "nodes").rglob("*.py")),
             *sorted((REPO_ROOT / "flash_core").rglob("*.py"))]
    missing = set()
    for path in files:
        for _, module in imported_modules(path):
            root = module.split(".")[0]
            if root in sys.stdlib_module_names or root in COMFYUI_MODULES or root in ("flash_core", "nodes"):
                continue
            dist = _dist(IMPORT_TO_DIST.get(root, root))
            if dist not in comfyui and dist not in ours:
                missing.add(f"{dist} ({path.relative_to(REPO_ROOT)})")
    assert not missing, f"imported by the pack, required neither by ComfyUI nor by requirements.txt: {sorted(missing)}"
    # the floors of requirements.txt are the ones the nodes check at run time (flash_core/dependencies.py)
    assert {name: _floor(spec) for name, spec in ours.items()} == {
        name: tuple(int(p) for p in floor.split(".")) for name, floor in FLOORS.items()}


def test_dev_stack_pins_the_runtime_requirements_and_make_setup_installs_it():
    """requirements-dev.txt is the pinned stack `make setup` installs: it pins every package of requirements.txt at
    a version its floor admits, and it (not requirements.txt) is what the Makefile installs and constrains with."""
    ours = _requirements(REPO_ROOT / "requirements.txt")
    dev = _requirements(REPO_ROOT / "requirements-dev.txt")
    assert TORCH_TRIO <= set(dev) and {"pytest", "playwright", "comfy-cli"} <= set(dev)
    for name, spec in ours.items():
        assert dev.get(name, "").startswith("=="), f"requirements-dev.txt pins {name}"
        pinned = tuple(int(p) for p in dev[name].removeprefix("==").split("."))
        assert pinned >= _floor(spec), f"requirements-dev.txt pins {name}{dev[name]}, below requirements.txt's {spec}"
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "pip install -q -r requirements-dev.txt" in makefile and "-c requirements-dev.txt" in makefile
    assert "$(VENV)/.installed: requirements-dev.txt" in makefile
    assert "-r requirements.txt" not in makefile and "-c requirements.txt" not in makefile


def test_the_newest_lane_installs_unpinned_what_ComfyUI_Manager_would_then_the_extras():
    """`make newest` (.venv-newest/, the newest lane of `make test`): ComfyUI's own requirements.txt, then the pack's
    requirements.txt through tests/install/manager_install.py (the ComfyUI-Manager step, recorded before anything
    else is installed), then requirements-newest.txt: the training extras of pyproject and the test tools, with no
    pin or cap, so pip takes the newest releases."""
    newest = _requirements(REPO_ROOT / "requirements-newest.txt")
    for name, spec in newest.items():
        assert not re.search(r"==|~=|!=|<", spec), f"requirements-newest.txt: {name}{spec}: no pins or caps"
    assert not TORCH_TRIO & set(newest), "torch comes from ComfyUI's requirements.txt"
    assert not set(_requirements(REPO_ROOT / "requirements.txt")) & set(newest), \
        "the pack's own packages come from requirements.txt, installed as ComfyUI-Manager does"
    train = {_dist(d.split(">=")[0]): d.split(">=")[1] for d in PYPROJECT["project"]["optional-dependencies"]["train"]}
    assert {name: newest.get(name, "").removeprefix(">=") for name in train} == train
    assert {"pytest", "pytest-xdist", "pytest-timeout"} <= set(newest)
    recipe = (REPO_ROOT / "Makefile").read_text().split("$(NEWEST)/.installed:", 1)[1].split("\n\n", 1)[0]
    recipe = recipe.split("rm -rf $(NEWEST)", 1)[1]  # a fresh venv each build, then the steps in this order
    steps = ["-r $(COMFYUI_PATH)/requirements.txt", "tests/install/manager_install.py", "-r requirements-newest.txt",
             "--no-deps -e ."]
    assert all(step in recipe for step in steps) and [recipe.index(step) for step in steps] == sorted(
        recipe.index(step) for step in steps), recipe


def test_pyproject_dependencies_are_lower_bounds_with_the_training_extras():
    """The flash-distill package (and the Registry's declared dependencies): lower bounds that admit transformers
    5.x; the training-only packages are the `train` extra."""
    project = PYPROJECT["project"]
    dependencies = {_dist(d.split(">=")[0].split("<")[0].split("=")[0].strip()): d for d in project["dependencies"]}
    for spec in project["dependencies"]:
        assert "<" not in spec and "==" not in spec, f"{spec}: lower bounds only"
    assert "transformers" in dependencies
    ours = _requirements(REPO_ROOT / "requirements.txt")
    for name, spec in ours.items():
        assert _floor(dependencies[name]) == _floor(spec), f"pyproject {dependencies[name]} vs {name}{spec}"
    train = {_dist(d.split(">=")[0]) for d in project["optional-dependencies"]["train"]}
    assert {"accelerate", "datasets", "scikit-learn"} <= train
    assert not TORCH_TRIO & train and not TEST_TOOLS & train


def test_the_registry_package_ships_the_nodes_and_no_development_files(tmp_path):
    """What `comfy node pack` / `publish` build (comfy-cli's own zip_files: git-tracked files less .comfyignore):
    the nodes and what they load, no tests, benchmarks, fixtures, gallery images or the demo's shipped teacher."""
    import zipfile

    archive = tmp_path / "node.zip"
    code = "import sys; from comfy_cli.file_utils import zip_files; zip_files(sys.argv[1])"
    result = subprocess.run([sys.executable, "-c", code, str(archive)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    names = zipfile.ZipFile(archive).namelist()
    for needed in ("__init__.py", "requirements.txt", "pyproject.toml", "nodes/sampling.py", "flash_core/run.py",
                   "workflows/flash_sd15_txt2img.json"):
        assert needed in names, needed
    for left_out in ("tests/", "bench/", ".ci/", "training/digits/shipped_teacher/", "training/fixtures/", "docs/gallery/"):
        assert not [n for n in names if n.startswith(left_out)], left_out
    assert sum(info.file_size for info in zipfile.ZipFile(archive).infolist()) < 5 * 2**20  # a lean package
