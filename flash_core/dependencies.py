"""Packages the pack needs beyond ComfyUI's own, imported where they are used, with a clear message when missing.

ComfyUI users install the pack into the ComfyUI they already have (ComfyUI-Manager, `comfy node install`, or
`pip install -r requirements.txt` with ComfyUI's Python). Should that install have failed or been skipped, the
pack still loads and registers every node: peft and diffusers are imported only inside the functions that use
them, and where a node reaches one (Flash Distill Train, Flash LoRA Loader on a PEFT alpha_pattern) `require`
comes first: it names the package, the version and the pip command on the node that needs it.

FLOORS is requirements.txt in code: tests/test_packaging.py keeps the two in line.
"""

from __future__ import annotations

import importlib
import re
import sys
from types import ModuleType

# package -> oldest release the pack works with (the lower bounds of requirements.txt)
FLOORS: dict[str, str] = {
    "peft": "0.15",  # peft.utils.other.get_pattern_key as the LoRA alpha_pattern tests expect (0.14's differs)
    "diffusers": "0.32",  # FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=[...]) of the flow teacher
}


class MissingDependencyError(ImportError):
    """A package the pack needs is not installed (or too old) in the Python that runs it."""


def _version_tuple(version: str) -> tuple[int, ...]:
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def _python() -> str:
    return f'"{sys.executable}"' if " " in sys.executable else sys.executable


def require(package: str, needed_for: str) -> ModuleType:
    """Import `package` (a key of FLOORS), or MissingDependencyError (see require_all)."""
    return require_all([package], needed_for)[0]


def require_all(packages: list[str] | tuple[str, ...], needed_for: str) -> list[ModuleType]:
    """Import each of `packages` (keys of FLOORS). When any is not installed or older than its floor, one
    MissingDependencyError names `needed_for`, every such package and the pip command that installs them all."""
    modules, problems = [], []
    for package in packages:
        spec = f"{package}>={FLOORS[package]}"
        try:
            module = importlib.import_module(package)
        except ImportError as err:
            problems.append((spec, f"not installed: {err}"))
            continue
        version = str(getattr(module, "__version__", ""))
        if version and _version_tuple(version) < _version_tuple(FLOORS[package]):
            problems.append((spec, f"this Python has {package} {version}"))
        modules.append(module)
    if problems:
        listed = " and ".join(f"{spec} ({why})" for spec, why in problems)
        specs = " ".join(f'"{spec}"' for spec, _ in problems)
        noun = "package" if len(problems) == 1 else "packages"
        raise MissingDependencyError(
            f"{needed_for} needs the Python {noun} {listed}. Install {'it' if len(problems) == 1 else 'them'} into "
            f"the Python that runs ComfyUI, then restart ComfyUI: {_python()} -m pip install {specs} (or: pip "
            "install -r custom_nodes/ComfyUI-Flash/requirements.txt with that Python; it never changes torch)."
        )
    return modules
