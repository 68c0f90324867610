"""Where ComfyUI lives for the headless tools (demo, benchmarks, tests) and how to import it in-process.

ComfyUI is not a pip package: `make setup` unpacks it into `.comfyui/`, or COMFYUI_PATH points at a
user's own checkout.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def comfyui_path() -> Path:
    path = Path(os.environ.get("COMFYUI_PATH", REPO_ROOT / ".comfyui")).resolve()
    if not (path / "main.py").is_file():
        raise RuntimeError(f"ComfyUI not found at {path}: run `make setup` or set COMFYUI_PATH to a ComfyUI checkout.")
    return path


def comfyui_version() -> tuple[int, ...]:
    """The version of the ComfyUI at comfyui_path(), from its comfyui_version.py (e.g. (0, 30, 0))."""
    path = comfyui_path() / "comfyui_version.py"
    match = re.search(r"__version__\s*=\s*[\"']([0-9.]+)", path.read_text()) if path.is_file() else None
    if match is None:
        raise RuntimeError(f"{path} does not name a ComfyUI version: is {path.parent} a ComfyUI checkout?")
    return tuple(int(part) for part in match.group(1).split("."))


def cache_dir() -> Path:
    """Models the project builds or trains itself (never in git): FLASH_CACHE_DIR or .cache/ in the repo."""
    path = Path(os.environ.get("FLASH_CACHE_DIR", REPO_ROOT / ".cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def import_comfy(cpu: bool = True) -> Path:
    """Put ComfyUI on sys.path (after this repo) and configure it before comfy.model_management loads."""
    path = comfyui_path()
    if str(path) not in sys.path:
        sys.path.append(str(path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    import comfy.model_management  # noqa: F401  (reads args.cpu at import time)

    return path


def import_comfy_nodes():
    """ComfyUI's own nodes.py (KSampler, LoraLoader, ...), loaded from its file and registered as `nodes` as
    ComfyUI's main.py has it. A plain `import nodes` could find this pack's nodes/ package instead when the
    repository root is on sys.path (it is under pytest)."""
    import importlib.util

    comfy_root = import_comfy()
    loaded = sys.modules.get("nodes")
    if loaded is not None and Path(loaded.__file__).resolve() == (comfy_root / "nodes.py").resolve():
        return loaded
    spec = importlib.util.spec_from_file_location("nodes", comfy_root / "nodes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["nodes"] = module
    spec.loader.exec_module(module)
    return module


PACK_MODULE = "comfyui_flash"


def load_pack():
    """Import this repository the way ComfyUI imports a custom node: a package made from its folder.

    (The repository root is never put on sys.path: our `nodes/` would shadow ComfyUI's `nodes` module.)
    """
    import_comfy()
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module
