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


def _imports_of(relative: str) -> list[str]:
    return [module for _, module in imported_modules(REPO_ROOT / relative)]


def _module_imports(prefix: str) -> dict[str, list[str]]:
    """{file: its imported modules} for the files of a dotted package prefix ("flash_core", "training.cli")."""
    folder = REPO_ROOT.joinpath(*prefix.split("."))
    files = [folder.with_suffix(".py")] if folder.with_suffix(".py").is_file() else sorted(folder.rglob("*.py"))
    return {str(f.relative_to(REPO_ROOT)): [m for _, m in imported_modules(f)] for f in files}


def test_the_product_imports_no_test_fixtures():
    """flash_core, nodes/ and the flash-distill CLI (training/cli, training/data.py) run where a pip install put
    them: they import nothing from training.fixtures (developer fixtures: tiny models, servers, the browser)."""
    offenders = [f"{f} imports {m}" for prefix in ("flash_core", "nodes", "training.cli", "training.data")
                 for f, modules in _module_imports(prefix).items() for m in modules if m.startswith("training.fixtures")]
    assert not offenders, offenders


def test_the_lora_loader_imports_no_training_code_and_the_cache_does_not_import_the_loop():
    """Reading a LoRA needs no trainer (nodes/loaders.py reads its metadata through lora_formats), and the target
    cache sits below the loop (flash_core.run imports target_cache's users, never the reverse: no cycle)."""
    training_modules = ("flash_core.run", "flash_core.distill", "flash_core.target_cache", "training")
    assert not [m for m in _imports_of("nodes/loaders.py") if m.startswith(training_modules)]
    assert not [m for m in _imports_of("flash_core/target_cache.py") if m.startswith("flash_core.run")]
    for low in ("flash_core/batches.py", "flash_core/fingerprints.py", "flash_core/lora_formats/metadata.py"):
        assert not [m for m in _imports_of(low) if m.startswith(("flash_core.run", "flash_core.target_cache"))], low


def flash_core_import_graph() -> dict[str, set[str]]:
    """flash_core module -> the flash_core modules it imports (module level and inside functions alike; a package's
    import of `flash_core.x.y` counts as an import of the module that defines it)."""
    modules = {}
    for path in sorted((REPO_ROOT / "flash_core").rglob("*.py")):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        targets = set()
        imported = [module for _, module in imported_modules(path)]
        for node in ast.walk(ast.parse(path.read_text())):  # `from flash_core import run`: the module run, too
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported += [f"{node.module}.{alias.name}" for alias in node.names]
        for module in imported:
            while module and module not in modules:
                module = module.rpartition(".")[0]
            if module and module != name:
                targets.add(module)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target):], target] if target in path else [node, target]
            if target not in state and (cycle := visit(target, [*path, target])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_flash_core_has_no_import_cycle():
    """Lower modules never import higher ones (late imports inside functions included), so flash_core reads bottom
    up: e.g. the target cache below the loop, the loop below the session, lora_formats below everything training."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]  # the finder works
    graph = flash_core_import_graph()
    assert {"flash_core.run", "flash_core.target_cache", "flash_core.checkpoints"} <= graph["flash_core.session"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


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


# Calls that write a file in place: p.write_text / p.write_bytes, safetensors' save_file, torch.save, json.dump,
# open(..., "w" / "x"), and PIL's Image.fromarray(...).save(path). They are fine as the `write` callback of
# flash_core.files.write_atomic (a function or lambda with a `tmp` parameter) or into a staging folder that
# replace_folder_atomic moves in whole (a target named `tmp` or `staging`). Appending ("a") is a log, not a file
# write. Receivers of .save() other than a call (a store, an export) are the pack's own savers, not PIL's.
WRITING_FUNCTIONS = {("torch", "save"), ("json", "dump")}


def in_place_writes(path: Path, root: Path = REPO_ROOT) -> list[str]:
    """'file:line what' for every call in `path` that writes a file without flash_core.files."""
    found, where = [], path.relative_to(root)

    def target_of(node: ast.Call) -> ast.AST | None:
        func, args = node.func, node.args
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if isinstance(func, ast.Attribute) and name in ("write_text", "write_bytes"):
            return func.value
        if name == "save_file" or (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                                   and (func.value.id, name) in WRITING_FUNCTIONS):
            return args[1] if len(args) > 1 else ast.Constant("?")
        if name == "open":
            mode = next((k.value for k in node.keywords if k.arg == "mode"),
                        args[1] if isinstance(func, ast.Name) and len(args) > 1 else
                        args[0] if isinstance(func, ast.Attribute) and args else None)
            if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and set(mode.value) & set("wx"):
                return args[0] if isinstance(func, ast.Name) else func.value
        if name == "save" and isinstance(func, ast.Attribute) and isinstance(func.value, ast.Call) and args:
            return args[0]
        return None

    def visit(node: ast.AST, callback: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            callback = callback or any(a.arg == "tmp" for a in node.args.args + node.args.kwonlyargs)
        if isinstance(node, ast.Call) and (target := target_of(node)) is not None:
            names = {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
            if not (callback and "tmp" in names) and not names & {"tmp", "staging"}:
                found.append(f"{where}:{node.lineno} writes in place ({ast.unparse(node.func)})")
        for child in ast.iter_child_nodes(node):
            visit(child, callback)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


def test_the_write_reader_sees_every_kind_of_in_place_write(tmp_path):
    source = ("import json, torch\nfrom pathlib import Path\nfrom PIL import Image\np = Path('a')\n"
              "p.write_text('x')\np.write_bytes(b'x')\nsave_file({}, 'a')\ntorch.save({}, p)\n"
              "json.dump({}, open('a', 'w'))\nImage.fromarray(x).save(p)\nopen(p, mode='x')\n"
              # fine: write_atomic callbacks, staging folders, appending logs, reading, the pack's savers
              "write_atomic(p, lambda tmp: save_file({}, tmp))\ndef write(tmp):\n    Path(tmp).write_text('x')\n"
              "staging = Path('s')\n(staging / 'a.txt').write_text('x')\nopen(p, 'a')\nopen(p)\nstore.save(run)\n")
    (tmp_path / "x.py").write_text(source)
    lines = [int(found.split(":")[1].split()[0]) for found in in_place_writes(tmp_path / "x.py", tmp_path)]
    assert sorted(lines) == [5, 6, 7, 8, 9, 9, 10, 11]


def test_files_are_written_only_through_flash_core_files():
    offenders = []
    home = REPO_ROOT / "flash_core" / "files.py"
    for path in _python_files():
        if _package_of(path)[:1] in (["flash_core"], ["nodes"], ["training"], ["workflows"], ["bench"]) and path != home:
            offenders += in_place_writes(path)
    assert not offenders, "write files with flash_core.files (write_atomic, write_text_atomic, save_image_atomic, " \
        "replace_folder_atomic for folders):\n" + "\n".join(offenders)
