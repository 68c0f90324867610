"""Diffusers pipeline folders, checked before anything loads them: no code from a model folder ever runs.

diffusers' `DiffusionPipeline.from_pretrained(folder)` imports Python files that a folder names: a
`model_index.json` whose `_class_name` is ``["my_pipeline", "MyPipeline"]`` next to `my_pipeline.py`, or a
component ``["my_lib", "MyUNet"]`` with `<component>/my_lib.py`, or a `<component>/diffusers.py` that shadows
the library. A model downloaded from the internet could so run arbitrary code on the user's machine.
`check_pipeline_folder` accepts only folders whose pipeline and components are classes of the installed
diffusers / transformers libraries and that carry no .py file where diffusers would look for one, and
explains everything else in one line (which file, which key, what to do).
"""

from __future__ import annotations

import os
from pathlib import Path

LIBRARIES = ("diffusers", "transformers")  # where a component's class may come from


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded safely or at all; the message names the file and key."""


def read_model_index(folder: str | os.PathLike) -> dict:
    """model_index.json of a diffusers pipeline folder as a dict, or a ModelFolderError naming the file."""
    from flash_core.file_formats import FileFormatError, read_json

    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise ModelFolderError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    try:
        return read_json(path, "the pipeline's model_index.json", "re-download or re-save the pipeline")
    except FileFormatError as err:
        raise ModelFolderError(str(err)) from None


def _library_class(library: str, name: str) -> bool:
    """Whether `name` is a class of the installed diffusers / transformers (or of a diffusers pipeline
    sub-module such as "stable_diffusion", which model_index.json files also name)."""
    import importlib

    if library in LIBRARIES:
        module = importlib.import_module(library)
    else:
        import diffusers.pipelines

        module = getattr(diffusers.pipelines, library, None)
    return module is not None and isinstance(getattr(module, name, None), type)


def check_pipeline_folder(folder: str | os.PathLike) -> dict:
    """Refuse custom pipelines and custom components; returns the parsed model_index.json.

    Raises ModelFolderError naming model_index.json's key or the .py file, with what to do.
    """
    folder = Path(folder)
    index = read_model_index(folder)
    where = folder / "model_index.json"
    refuse = "this pack never runs code from a model folder; use a standard diffusers pipeline (save it with " \
             "save_pretrained from the stock diffusers class)"
    class_name = index.get("_class_name")
    if not isinstance(class_name, str):
        raise ModelFolderError(f"{where}: '_class_name' is {class_name!r}, a custom pipeline; {refuse}")
    if not _library_class("diffusers", class_name):
        raise ModelFolderError(
            f"{where}: '_class_name' {class_name!r} is not a pipeline of the installed diffusers (a custom or newer "
            f"pipeline); {refuse}"
        )
    scripts = sorted(p.name for p in folder.glob("*.py"))
    if scripts:
        raise ModelFolderError(f"{folder} contains Python code ({', '.join(scripts)}); {refuse}")
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list):
            continue
        if len(spec) != 2:
            raise ModelFolderError(f"{where}: '{component}' must be [library, class], got {spec!r}")
        library, name = spec
        if library is None and name is None:
            continue  # an absent optional component (e.g. safety_checker)
        if not isinstance(library, str) or not isinstance(name, str) or not _library_class(library, name):
            raise ModelFolderError(
                f"{where}: component '{component}' is {spec!r}, not a class of the installed diffusers / "
                f"transformers (custom code); {refuse}"
            )
        scripts = sorted(p.name for p in (folder / component).glob("*.py")) if (folder / component).is_dir() else []
        if scripts:
            raise ModelFolderError(f"{folder / component} contains Python code ({', '.join(scripts)}); {refuse}")
    return index
