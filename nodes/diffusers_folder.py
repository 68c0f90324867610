"""A diffusers pipeline folder as files: finding the pipeline folders in ComfyUI's models/diffusers folders,
reading their configs and .safetensors weights (never a pickle), refusing pipelines that are not SD-family UNet
pipelines, and the loader's error (PipelineError: the folder, the file or key, and the fix).

The rest of FlashDiffusersLoader: diffusers_convert.py translates the configs and weight names into ComfyUI's,
diffusers_build.py builds MODEL, CLIP and VAE from them (load_pipeline), pipelines.py is the node.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import folder_paths
import torch

from flash_core import file_formats
from flash_core.file_formats import PICKLE_SUFFIXES

NODE = "Flash Diffusers Pipeline Loader"  # the node's display name: every error starts with it
FOLDER_NAME = "diffusers"  # ComfyUI's models/diffusers folder(s), where the stock DiffusersLoader looks too

RESAVE = "re-save it with save_pretrained(..., safe_serialization=True)"
OTHER_LOADERS = (
    "use ComfyUI's own loaders for those (Load Checkpoint for a single-file checkpoint, or Load Diffusion "
    "Model + Load CLIP + Load VAE for separate files)"
)


class PipelineError(ValueError):
    """A pipeline folder this node cannot load; the message names the folder, the file or key, and the fix."""


def _fail(message: str) -> PipelineError:
    return PipelineError(f"{NODE}: {message}")


# --------------------------------------------------------------------------------------------------
# Finding pipeline folders
# --------------------------------------------------------------------------------------------------


def pipeline_roots() -> list[Path]:
    return [Path(p) for p in folder_paths.get_folder_paths(FOLDER_NAME)]


def list_pipelines() -> list[str]:
    """Relative names ('/'-separated) of the folders under the diffusers folders that hold a model_index.json."""
    names: set[str] = set()
    for root in pipeline_roots():
        if not root.is_dir():
            continue
        for current, subdirs, files in os.walk(root, followlinks=True):
            if "model_index.json" in files:
                relative = Path(current).relative_to(root)
                if relative.parts:  # the diffusers folder itself has no name to pick
                    names.add(relative.as_posix())
                subdirs[:] = []  # a pipeline's component folders hold no further pipelines
            else:
                subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    return sorted(names)


def resolve_pipeline(name: str) -> Path:
    """The folder of pipeline `name` inside one of the diffusers folders; never a path outside them."""
    roots = ", ".join(map(str, pipeline_roots()))
    if not isinstance(name, str) or not name.strip():
        raise _fail(f"no pipeline selected. Put a diffusers pipeline folder (with model_index.json) in {roots} "
                    "and pick it in the list.")
    relative = PurePosixPath(name.replace("\\", "/"))
    if not relative.parts or relative.is_absolute() or ".." in relative.parts or ":" in relative.parts[0]:
        raise _fail(f"'{name}' is not a pipeline folder name inside the diffusers folders (absolute paths and "
                    "'..' are refused). Pick a pipeline from the list.")
    for root in pipeline_roots():
        base = Path(os.path.normpath(root))
        candidate = Path(os.path.normpath(base.joinpath(*relative.parts)))
        if base in candidate.parents and candidate.is_dir():
            return candidate
    raise _fail(f"pipeline folder '{name}' was not found in the diffusers folders ({roots}). Copy the folder "
                "there and refresh the node list.")


# --------------------------------------------------------------------------------------------------
# Reading configs and weights (safetensors only)
# --------------------------------------------------------------------------------------------------


def read_json(path: Path, folder: Path, what: str) -> dict:
    if not path.is_file():
        raise _fail(f"'{folder}' has no {path.relative_to(folder).as_posix()} ({what}). A diffusers pipeline "
                    "folder is what StableDiffusionPipeline.save_pretrained writes; re-save the pipeline.")
    try:
        return file_formats.read_json(path, what=what, fix="re-save the pipeline with save_pretrained")
    except file_formats.FileFormatError as err:
        raise _fail(str(err)) from err


def load_weights(folder: Path, component: str, stem: str) -> dict[str, torch.Tensor]:
    """A component's state dict from stem.safetensors, its fp16 variant or a sharded index; never a pickle."""
    directory = folder / component
    for filename in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (directory / filename).is_file():
            return _read_safetensors(directory / filename)
    indexes = sorted(directory.glob(f"{stem}.safetensors.index*.json"))
    if indexes:
        weight_map = read_json(indexes[0], folder, f"the {component} shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise _fail(f"{indexes[0]} has no weight_map; {RESAVE}.")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            plain_name = isinstance(shard, str) and shard == Path(shard).name and shard not in (".", "..")
            if not plain_name or not shard.endswith(".safetensors"):
                raise _fail(f"{indexes[0]} names the shard '{shard}', which is not a .safetensors file in "
                            f"{directory}; {RESAVE}.")
            state.update(_read_safetensors(directory / shard))
        return state
    pickles = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES)) \
        if directory.is_dir() else []
    if pickles:
        raise _fail(
            f"'{folder}' has only pickle weights for {component} ({', '.join(pickles)}); this node reads .safetensors "
            "only (loading a pickle can run code). Convert the pipeline once in Python with "
            "StableDiffusionPipeline.from_pretrained(path).save_pretrained(path, safe_serialization=True)."
        )
    raise _fail(f"'{folder}' has no weights file {component}/{stem}.safetensors; {RESAVE}.")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise _fail(f"the weights file {path} is missing; {RESAVE}.")
    try:
        return file_formats.read_safetensors(path, fix=RESAVE)[0]
    except file_formats.FileFormatError as err:  # a pickle or zip under a .safetensors name, truncated, corrupt
        raise _fail(str(err)) from err


# --------------------------------------------------------------------------------------------------
# Pipeline kind
# --------------------------------------------------------------------------------------------------

SD_COMPONENTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}


def check_pipeline_kind(folder: Path, index: dict) -> None:
    """Refuse pipelines that are not single-text-encoder SD UNet pipelines, naming what to use instead."""
    class_name = str(index.get("_class_name", "?"))
    if any(index.get(k) for k in ("transformer", "prior", "decoder")) or (folder / "transformer").is_dir():
        raise _fail(f"'{folder}' is a {class_name} with a transformer (DiT / MMDiT) denoiser, not an SD-family "
                    f"UNet pipeline; {OTHER_LOADERS}.")
    if "XL" in class_name.upper() or index.get("text_encoder_2") or (folder / "text_encoder_2").is_dir():
        raise _fail(f"'{folder}' is an SDXL-style {class_name} (two text encoders, size/crop conditioning), which "
                    f"this loader does not build; {OTHER_LOADERS} (full-size SDXL is detected there).")
    for component, cls in SD_COMPONENTS.items():
        entry = index.get(component)
        if not entry or not (folder / component).is_dir():
            raise _fail(f"'{folder}' ({class_name}) has no {component}/ component. An SD-family pipeline has unet/, "
                        "vae/, text_encoder/ and tokenizer/, as StableDiffusionPipeline.save_pretrained writes them; "
                        f"re-save it that way. For other pipelines {OTHER_LOADERS}.")
        found = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else entry
        if found not in (cls, cls + "WithProjection"):
            raise _fail(f"'{folder}' ({class_name}) has a {found} as {component}; this loader builds SD-family "
                        f"pipelines ({cls}). For other pipelines {OTHER_LOADERS}.")
