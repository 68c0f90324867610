"""Export and saving: LoraModules written as kohya / ComfyUI, diffusers or PEFT files, atomically (flash_core.files),
and the one entry point trainers call to export a student per backbone and format (:func:`build_lora_export`)."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flash_core.backbones import BACKBONES
from flash_core.files import write_atomic, write_text_atomic
from flash_core.lora_formats.alpha import ADAPTER_CONFIG_NAME, DIFFUSERS_METADATA_KEY
from flash_core.lora_formats.modules import (
    COMFYUI,
    COMPONENTS,
    DIFFUSERS,
    PEFT,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    LoraModule,
)
from flash_core.lora_formats.read import refuse_non_finite
from flash_core.lora_formats.recognise import flatten


def _kohya_prefix(component: str, has_te2: bool) -> str:
    if component == UNET:
        return "lora_unet_"
    if component == TEXT_ENCODER_2:
        return "lora_te2_"
    return "lora_te1_" if has_te2 else "lora_te_"


def rename_modules(modules: Sequence[LoraModule], path_map: Mapping[str, str]) -> list[LoraModule]:
    """The same modules with dotted paths renamed through `path_map` (e.g. LDM -> diffusers UNet paths).

    path_map maps module paths (no ``.weight``); build it from a weight-key map such as ComfyUI's
    ``comfy.utils.unet_to_diffusers(unet_config)`` (diffusers weight -> LDM weight) with :func:`module_path_map`.
    Raises ValueError naming the modules it cannot rename.
    """
    missing = [m.path for m in modules if m.flat or m.path not in path_map]
    if missing:
        raise ValueError(f"{len(missing)} LoRA modules have no entry in the path map, e.g. {', '.join(missing[:3])}.")
    return [
        LoraModule(m.component, path_map[m.path], False, m.down, m.up, m.alpha, m.source_keys, m.source_prefix)
        for m in modules
    ]


def module_path_map(weight_map: Mapping[str, str], invert: bool = False) -> dict[str, str]:
    """Module-path map from a weight-key map (``a.b.weight`` -> ``c.d.weight`` gives ``a.b`` -> ``c.d``).

    invert=True swaps direction (e.g. ComfyUI's diffusers->LDM map into LDM->diffusers).
    """
    pairs = [(k[: -len(".weight")], v[: -len(".weight")]) for k, v in weight_map.items()
             if k.endswith(".weight") and isinstance(v, str) and v.endswith(".weight")]
    return {v: k for k, v in pairs} if invert else dict(pairs)


def to_kohya_state_dict(modules: Sequence[LoraModule], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """kohya / ComfyUI-native tensors: ``lora_unet_<path>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.

    Stock ComfyUI's LoraLoader maps these for UNet modules named by diffusers or LDM paths.
    """
    has_te2 = any(m.component == TEXT_ENCODER_2 for m in modules)
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        name = _kohya_prefix(m.component, has_te2) + (m.path if m.flat else flatten(m.path))
        out[f"{name}.lora_down.weight"] = m.down if dtype is None else m.down.to(dtype)
        out[f"{name}.lora_up.weight"] = m.up if dtype is None else m.up.to(dtype)
        out[f"{name}.alpha"] = torch.tensor(float(m.alpha))
    return out


def _dotted(module: LoraModule, target_format: str) -> str:
    if module.flat:
        raise ValueError(
            f"cannot export module '{module.source_prefix or module.path}' to {target_format}: its path is kohya-"
            "flattened; export from modules with dotted paths (as the trainer produces) instead."
        )
    return module.path


def _lora_config_fields(modules: Sequence[LoraModule]) -> dict[str, Any]:
    """r / lora_alpha for the most common values, rank_pattern / alpha_pattern for the exceptions (PEFT)."""
    r = Counter(m.rank for m in modules).most_common(1)[0][0]
    lora_alpha = Counter(m.alpha for m in modules).most_common(1)[0][0]
    rank_pattern = {f"^{re.escape(m.path)}$": m.rank for m in modules if m.rank != r}
    alpha_pattern = {f"^{re.escape(m.path)}$": m.alpha for m in modules if m.alpha != lora_alpha}
    return {"r": r, "lora_alpha": lora_alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "target_modules": sorted({m.path for m in modules})}


def to_diffusers_state_dict(
    modules: Sequence[LoraModule], dtype: torch.dtype | None = None, denoiser_prefix: str = "unet"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers tensors (``unet.<path>.lora_A.weight`` / ``lora_B``) and metadata carrying the alphas.

    denoiser_prefix: the pipeline's name for the denoiser, ``unet`` (SD1.5, SDXL) or ``transformer`` (PixArt,
    SD3: diffusers' loaders for those pipelines read ``transformer.`` keys only).
    The metadata is diffusers' ``lora_adapter_metadata`` (what ``save_lora_weights`` writes), so diffusers and
    this module read the same alphas back.
    """
    prefixes = {UNET: denoiser_prefix, TEXT_ENCODER: "text_encoder", TEXT_ENCODER_2: "text_encoder_2"}
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, Any] = {}
    for component in COMPONENTS:
        group = [m for m in modules if m.component == component]
        if not group:
            continue
        for m in group:
            base = f"{prefixes[component]}.{_dotted(m, 'diffusers')}"
            tensors[f"{base}.lora_A.weight"] = m.down if dtype is None else m.down.to(dtype)
            tensors[f"{base}.lora_B.weight"] = m.up if dtype is None else m.up.to(dtype)
        for key, value in _lora_config_fields(group).items():
            packed[f"{prefixes[component]}.{key}"] = value
    metadata = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    return tensors, metadata


def to_peft_state_dict(
    modules: Sequence[LoraModule], dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT tensors (``base_model.model.<path>.lora_A.weight``) and the adapter_config.json dict for them.

    Only one component per PEFT adapter (PEFT wraps one model).
    """
    components = {m.component for m in modules}
    if len(components) != 1:
        raise ValueError(f"a PEFT adapter wraps one model; got modules of {sorted(components)}: export them apart.")
    tensors: dict[str, torch.Tensor] = {}
    for m in modules:
        base = f"base_model.model.{_dotted(m, 'PEFT')}"
        tensors[f"{base}.lora_A.weight"] = m.down if dtype is None else m.down.to(dtype)
        tensors[f"{base}.lora_B.weight"] = m.up if dtype is None else m.up.to(dtype)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        **_lora_config_fields(modules),
    }
    return tensors, config


def save_lora(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
              metadata: Mapping[str, str] | None = None) -> None:
    """Write a .safetensors file atomically (flash_core.files.write_atomic)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        raise ValueError(f"LoRA files are written as .safetensors; got '{path}'.")
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    write_atomic(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata))


def save_peft_adapter(directory: str | os.PathLike, modules: Sequence[LoraModule],
                      dtype: torch.dtype | None = None) -> tuple[str, str]:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT layout) atomically; return both paths."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors, config = to_peft_state_dict(modules, dtype)
    weights_path = os.path.join(directory, "adapter_model.safetensors")
    config_path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    save_lora(weights_path, tensors, {"format": "pt"})
    write_text_atomic(config_path, json.dumps(config, indent=2, sort_keys=True))
    return weights_path, config_path


# ----------------------------------------------------------------------------------------------------------
# Export of a trained student, per backbone and format (the one entry point trainers call)
# ----------------------------------------------------------------------------------------------------------

EXPORT_FORMATS = (COMFYUI, DIFFUSERS, PEFT)
# Top-level module names that exist only in ComfyUI's (LDM / original-repo) models, never in diffusers ones
_COMFY_ONLY_ROOTS = ("input_blocks", "middle_block", "output_blocks", "joint_blocks", "x_embedder", "t_embedder",
                     "y_embedder", "t_block", "final_layer", "blocks")


@dataclass(frozen=True)
class LoraExport:
    """One exported LoRA: the .safetensors tensors and metadata, where they go, and the files beside them.

    relative_path: the .safetensors file's path inside an export folder.
    sidecars: relative path -> text of files written with it (PEFT's ``adapter_config.json``).
    """

    format: str
    relative_path: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    sidecars: dict[str, str] = field(default_factory=dict)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write every file atomically under `folder` (sidecars first: a config without weights is harmless,
        weights without their config would load at the wrong scale); returns the .safetensors path."""
        folder = Path(folder)
        for relative, text in self.sidecars.items():
            write_text_atomic(folder / relative, text)
        path = folder / self.relative_path
        save_lora(path, self.tensors, self.metadata)
        return path


# Formats a backbone's student cannot be written in, and why (the CLI's config refuses them with this reason).
UNAVAILABLE_EXPORTS = {
    ("pixart", DIFFUSERS): (
        "diffusers has no LoRA loader for PixArt (PixArtTransformer2DModel has no load_lora_adapter and the PixArt "
        "pipelines no load_lora_weights, diffusers 0.35); export peft instead, which diffusers users load with "
        "peft.PeftModel.from_pretrained(pipe.transformer, '<output_dir>/export/peft')"
    ),
}


def export_formats(backbone: str) -> tuple[str, ...]:
    """The LoRA export formats a backbone's student can be written in (ComfyUI and PEFT for all; diffusers for
    every backbone diffusers can load a LoRA into: not PixArt)."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}: LoRA exports know {', '.join(BACKBONES)}")
    return tuple(f for f in EXPORT_FORMATS if (backbone, f) not in UNAVAILABLE_EXPORTS)


def check_export_format(backbone: str, export_format: str) -> None:
    """Raise ValueError saying why `export_format` cannot be written for `backbone` (unknown, or unavailable)."""
    formats = export_formats(backbone)
    if export_format in formats:
        return
    reason = UNAVAILABLE_EXPORTS.get((backbone, export_format))
    if reason:
        raise ValueError(f"LoRA export format {export_format!r} is not available for {backbone}: {reason}")
    raise ValueError(f"unknown LoRA export format {export_format!r}: use one of {', '.join(formats)}")


def build_lora_export(
    modules: Sequence[LoraModule],
    backbone: str,
    export_format: str,
    name: str = "flash-lora",
    metadata: Mapping[str, str] | None = None,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
) -> LoraExport:
    """A trained student's LoRA in one format, with the keys that format's loader maps for this backbone.

    modules: the student's LoRA modules, named by the diffusers model the trainer wraps (from
        :func:`modules_from_peft_state_dict`); component UNET is the denoiser (UNet or DiT transformer).
    backbone: "sd15" | "sdxl" | "pixart" | "sd3".
    export_format:
      * "comfyui": one file for ComfyUI's LoraLoader and FlashLoRALoader, alphas stored as tensors.
        UNets: kohya ``lora_unet_<diffusers path>`` (ComfyUI maps it onto its LDM UNet). DiTs: ComfyUI maps no
        kohya keys onto PixArt, so ``transformer.<diffusers path>.lora_down/lora_up.weight`` + ``.alpha``, the
        keys ComfyUI's SD3 and PixArt key maps share (fused q/k/v become offset patches there).
      * "diffusers": ``<unet|transformer>.<path>.lora_A/lora_B.weight`` + ``lora_adapter_metadata`` (alphas),
        read by ``pipe.load_lora_weights`` (SD1.5, SDXL, SD3). Not for PixArt (see UNAVAILABLE_EXPORTS).
      * "peft": ``base_model.model.<path>`` + ``adapter_config.json`` (the flash-pixart / flash-sd3 layout).
    name: the file-name stem of the ComfyUI file (``<name>_comfyui.safetensors``).
    metadata: extra safetensors metadata (training settings), merged into every format's own.
    base_model: written as the PEFT config's ``base_model_name_or_path``.
    dtype: cast the A/B tensors (alphas stay float32); None keeps theirs.
    Students trained on ComfyUI's own models (LDM / original-repo module names) export as "comfyui" only:
    kohya keys for UNets, ``diffusion_model.<path>`` keys for DiTs.
    Raises ValueError for an unknown or unavailable format / backbone, ComfyUI-named modules in the diffusers /
    peft formats,
    and LoraFormatError for NaN / Inf tensors (nothing is written for a diverged student).
    """
    check_export_format(backbone, export_format)
    refuse_non_finite({f"{m.path}.{part}": t for m in modules for part, t in (("lora_A", m.down), ("lora_B", m.up))},
                      f"the {backbone} student's LoRA")
    denoiser = BACKBONES[backbone].subfolder  # diffusers' name of the denoiser: the key prefix its loaders read
    comfy_named = sorted({m.path for m in modules if not m.flat and m.path.split(".")[0] in _COMFY_ONLY_ROOTS})
    extra = {str(k): str(v) for k, v in (metadata or {}).items()}
    if export_format == COMFYUI:
        if denoiser == "unet":  # kohya keys map onto ComfyUI's UNets from diffusers and from LDM paths alike
            tensors = to_kohya_state_dict(modules, dtype)
        else:
            prefix = "diffusion_model." if comfy_named else "transformer."
            tensors = _to_comfy_transformer_state_dict(modules, prefix, dtype)
        return LoraExport(COMFYUI, f"{name}_comfyui.safetensors", tensors, {"format": "pt", **extra})
    if comfy_named:
        raise ValueError(
            f"{len(comfy_named)} LoRA modules are named by a ComfyUI (LDM) model, e.g. {comfy_named[0]}: the "
            f"{export_format} export of a {backbone} student needs the diffusers model's module names. Export "
            "format comfyui instead, or rename the modules with rename_modules first."
        )
    if export_format == DIFFUSERS:
        tensors, own = to_diffusers_state_dict(modules, dtype, denoiser_prefix=denoiser)
        return LoraExport(DIFFUSERS, "diffusers/pytorch_lora_weights.safetensors", tensors, {**own, **extra})
    tensors, config = to_peft_state_dict(modules, dtype)
    config["base_model_name_or_path"] = base_model
    return LoraExport(PEFT, "peft/adapter_model.safetensors", tensors, {"format": "pt", **extra},
                      {f"peft/{ADAPTER_CONFIG_NAME}": json.dumps(config, indent=2, sort_keys=True)})


def _to_comfy_transformer_state_dict(
    modules: Sequence[LoraModule], prefix: str, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """``<prefix><path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` for ComfyUI's DiTs.

    prefix ``transformer.``: diffusers module paths (ComfyUI's SD3 / PixArt key maps list them);
    ``diffusion_model.``: ComfyUI's own module paths (its generic format, for students trained on ComfyUI models).
    """
    others = sorted({m.component for m in modules} - {UNET})
    if others:
        raise ValueError(f"the ComfyUI export of a DiT student holds the transformer only; got modules of {others}")
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        base = prefix + _dotted(m, "the ComfyUI transformer format")
        out[f"{base}.lora_down.weight"] = m.down if dtype is None else m.down.to(dtype)
        out[f"{base}.lora_up.weight"] = m.up if dtype is None else m.up.to(dtype)
        out[f"{base}.alpha"] = torch.tensor(float(m.alpha))
    return out
