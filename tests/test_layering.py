"""The layers of the pack, read from the import statements of every Python file in the repository.

flash_core/ is the engine: it imports no ComfyUI module and nothing of the pack above it (nodes/, training/).
nodes/ is the ComfyUI glue over flash_core: it imports nothing from training/ (the headless trainer, fixtures,
demo). tests/ is imported by nobody outside tests/. Imports are read with `ast` (module level and inside
functions alike; relative imports resolved against the file's package), so nothing is imported to check them.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Top-level modules and packages of a ComfyUI checkout (0.3.x): none of them may appear in flash_core.
COMFYUI_MODULES = frozenset({
    "alembic_db", "api_server", "app", "comfy", "comfy_api", "comfy_api_nodes", "comfy_config",
    "comfy_execution", "comfy_extras", "comfyui_version", "cuda_malloc", "execution", "folder_paths",
    "hook_breaker_ac10a0", "latent_preview", "main", "middleware", "node_helpers", "nodes", "protocol",
    "server", "utils",
})
# The pack's own layers above flash_core (`nodes` is also ComfyUI's nodes.py: forbidden in flash_core either way).
PACK_LAYERS_ABOVE_CORE = frozenset({"nodes", "training", "bench", "workflows", "tests"})


def _python_files() -> list[Path]:
    """Every .py file of the repository, without virtual environments, ComfyUI checkouts, caches and runs."""
    files = []
    for folder, subfolders, names in os.walk(REPO_ROOT):
        # pruned, not filtered: .venv/ and the ComfyUI checkouts hold tens of thousands of files
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d not in {"__pycache__", "runs"})
        files += [Path(folder) / name for name in names if name.endswith(".py")]
    return sorted(files)


def _package_of(path: Path, root: Path = REPO_ROOT) -> list[str]:
    """Dotted package of a file, relative to the repository root (`nodes/sampling.py` -> ["nodes"])."""
    return list(path.relative_to(root).parts[:-1])


def imported_modules(path: Path, root: Path = REPO_ROOT) -> list[tuple[int, str]]:
    """(line, absolute dotted module) for every import statement in `path`, relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                package = _package_of(path, root)
                anchor = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                base = ".".join(anchor + ([node.module] if node.module else []))
            if node.module is None:  # `from . import a, b`: each name may be a module
                found += [(node.lineno, f"{base}.{alias.name}" if base else alias.name) for alias in node.names]
            else:
                found.append((node.lineno, base))
    return found


def _offenders(layer: str, forbidden_roots: frozenset[str]) -> list[str]:
    offenders = []
    for path in _python_files():
        if _package_of(path)[:1] != [layer]:
            continue
        for line, module in imported_modules(path):
            if module.split(".")[0] in forbidden_roots:
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {module}")
    return offenders


def test_the_import_reader_sees_every_kind_of_import(tmp_path):
    # a file that does each kind of import the rules below look for, placed as nodes/x.py of a fake repository
    source = ("import comfy.sd\nfrom training.data import load\nfrom . import sampling\nfrom ..tests import helper\n"
              "def later():\n    import folder_paths\n")
    (tmp_path / "nodes").mkdir()
    (tmp_path / "nodes" / "x.py").write_text(source)
    modules = [module for _, module in imported_modules(tmp_path / "nodes" / "x.py", root=tmp_path)]
    assert modules == ["comfy.sd", "training.data", "nodes.sampling", "tests", "folder_paths"]


def test_flash_core_imports_no_comfyui_and_nothing_above_it():
    offenders = _offenders("flash_core", COMFYUI_MODULES | PACK_LAYERS_ABOVE_CORE)
    assert not offenders, "flash_core must stand alone (no ComfyUI, no nodes/ or training/):\n" + "\n".join(offenders)


def test_nodes_import_nothing_from_training():
    offenders = _offenders("nodes", frozenset({"training", "bench", "workflows", "tests"}))
    assert not offenders, "nodes/ is the ComfyUI glue over flash_core; move what it needs into flash_core:\n" + \
        "\n".join(offenders)


def test_nothing_outside_tests_imports_tests():
    offenders = []
    for path in _python_files():
        if _package_of(path)[:1] == ["tests"]:
            continue
        offenders += [f"{path.relative_to(REPO_ROOT)}:{line} imports {module}"
                      for line, module in imported_modules(path) if module.split(".")[0] == "tests"]
    assert not offenders, "tests/ is imported by nobody outside it; move shared code to the layer that owns it:\n" + \
        "\n".join(offenders)


def test_the_files_checked_include_every_layer():
    layers = {(_package_of(path) or ["."])[0] for path in _python_files()}
    assert {"flash_core", "nodes", "training", "tests", "bench", "workflows"} <= layers, layers


# Ways to move a file onto another name: os.replace / os.rename / os.renames / shutil.move, `from os import replace`,
# and pathlib's p.replace(target) / p.rename(target) (one argument: str.replace always takes two).
MOVE_FUNCTIONS = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("shutil", "move")}


def file_moves(path: Path, root: Path = REPO_ROOT) -> list[str]:
    """'file:line does what' for every call in `path` that moves a file onto another name."""
    found = []
    where = path.relative_to(root)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module in ("os", "shutil"):
            found += [f"{where}:{node.lineno} imports {node.module}.{alias.name}" for alias in node.names
                      if (node.module, alias.name) in MOVE_FUNCTIONS]
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        func = node.func
        if isinstance(func.value, ast.Name) and (func.value.id, func.attr) in MOVE_FUNCTIONS:
            found.append(f"{where}:{node.lineno} calls {func.value.id}.{func.attr}")
        elif func.attr in ("replace", "rename") and len(node.args) == 1 and not node.keywords \
                and not (isinstance(func.value, ast.Name) and func.value.id == "dataclasses"):
            found.append(f"{where}:{node.lineno} calls .{func.attr}(target) (a pathlib move)")
    return found


def test_the_move_reader_sees_every_kind_of_move(tmp_path):
    source = ("import os, shutil\nfrom os import rename\nfrom pathlib import Path\nos.replace('a', 'b')\n"
              "os.rename('a', 'b')\nshutil.move('a', 'b')\nPath('a').replace('b')\ntmp = Path('a')\n"
              "tmp.rename(Path('b'))\n"
              # not moves: string and datetime replace
              "'ab'.replace('a', 'b')\nimport datetime\ndatetime.datetime.now().replace(year=2000)\n")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "x.py").write_text(source)
    lines = [int(found.split(":")[1].split()[0]) for found in file_moves(tmp_path / "training" / "x.py", tmp_path)]
    assert sorted(lines) == [2, 4, 5, 6, 7, 9]


def test_files_are_moved_into_place_only_by_flash_core_files():
    # every write is atomic through flash_core/files.py (write_atomic, write_json_atomic, replace_folder_atomic,
    # move_folder_into_place ...); a hand-rolled temporary file + os.replace elsewhere is a second home for it.
    # tests/ may write files any way they like (e.g. deliberately broken ones).
    offenders = []
    home = REPO_ROOT / "flash_core" / "files.py"
    for path in _python_files():
        if _package_of(path)[:1] not in (["flash_core"], ["nodes"], ["training"], ["workflows"], ["bench"]) \
                or path == home:
            continue
        offenders += file_moves(path)
    assert not offenders, "write files with flash_core.files (write_atomic, write_json_atomic, ...):\n" + \
        "\n".join(offenders)
