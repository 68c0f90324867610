"""Reading LoRA files: safetensors only (through flash_core.file_formats, the one reader), finite values only,
with the PEFT adapter config that belongs to the file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from flash_core import file_formats
from flash_core.lora_formats.alpha import ADAPTER_CONFIG_NAME, validate_lora_config
from flash_core.lora_formats.modules import PEFT, LoraFile, LoraFormatError
from flash_core.lora_formats.normalise import parse_lora_state_dict
from flash_core.lora_formats.recognise import detect_format


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a .safetensors file; refuse anything else.

    The file is recognised by its structure (flash_core.file_formats), not its name or first bytes.
    Raises LoraFormatError for missing files, pickles, zips and truncated / corrupt files.
    """
    try:
        return file_formats.read_safetensors(path, fix="re-download it")
    except file_formats.FileFormatError as error:
        raise LoraFormatError(str(error)) from error


def refuse_non_finite(tensors: Mapping[str, torch.Tensor], name: str) -> None:
    """Raise LoraFormatError naming the keys whose tensors hold NaN or Inf (a diverged training run)."""
    bad = sorted(k for k, t in tensors.items()
                 if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise LoraFormatError(
            f"'{name}' holds non-finite values (NaN or Inf) in {len(bad)} of its {len(tensors)} tensors, e.g. "
            f"{', '.join(bad[:5])}. Applying it would turn the model's outputs into NaN, so it is refused. The "
            "training run that wrote it diverged: use an export or checkpoint from before it diverged, or train "
            "again with a lower learning rate."
        )


def find_adapter_config(path: str | os.PathLike, include_shared: bool = True) -> dict | None:
    """The PEFT adapter config that belongs to a LoRA file, or None.

    Looked for next to the file: ``<stem>.adapter_config.json`` (several adapters in one folder), then, when
    include_shared, ``adapter_config.json`` (the layout PEFT's save_pretrained writes and the flash-pixart /
    flash-sd3 releases use). A malformed config (bad JSON, missing r / lora_alpha, wrong types) raises
    LoraFormatError naming the file and the key.
    """
    path = Path(path)
    candidates = [path.with_name(f"{path.stem}.{ADAPTER_CONFIG_NAME}")]
    if include_shared:
        candidates.append(path.with_name(ADAPTER_CONFIG_NAME))
    for candidate in candidates:
        if candidate.is_file():
            fix = f"fix it or replace it with the {ADAPTER_CONFIG_NAME} published with this LoRA"
            try:
                config = file_formats.read_json(candidate, what="the PEFT adapter config of this LoRA", fix=fix)
            except file_formats.FileFormatError as error:
                raise LoraFormatError(str(error)) from error
            return validate_lora_config(config, f"'{candidate}'", required=("r", "lora_alpha"))
    return None


def read_lora(path: str | os.PathLike, adapter_config: dict | None = None) -> LoraFile:
    """Read a LoRA .safetensors file (and its adapter config when there is one) into a LoraFile.

    A folder-wide ``adapter_config.json`` is only used for PEFT-format files (or ``adapter_model.safetensors``),
    so one left in a shared loras folder cannot rescale unrelated kohya / diffusers LoRAs.
    """
    tensors, metadata = load_safetensors(path)
    refuse_non_finite(tensors, os.fspath(path))
    if adapter_config is None:
        shared = PEFT in detect_format(tensors) or os.path.basename(os.fspath(path)) == "adapter_model.safetensors"
        adapter_config = find_adapter_config(path, include_shared=shared)
    return parse_lora_state_dict(tensors, metadata, adapter_config, name=os.path.basename(os.fspath(path)))
