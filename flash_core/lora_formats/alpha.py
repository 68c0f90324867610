"""Alpha rules: where a LoRA module's alpha (its scale alpha / rank) comes from when the file has no alpha tensor.

Sources, checked by :func:`validate_lora_config`: a PEFT ``adapter_config.json``, diffusers'
``lora_adapter_metadata`` and other LoraConfig-like entries in the safetensors metadata. PEFT's own rules apply
(``alpha_pattern``, rsLoRA).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from flash_core.dependencies import require
from flash_core.lora_formats.modules import (
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    LoraFormatError,
    LoraModule,
)

ADAPTER_CONFIG_NAME = "adapter_config.json"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights writes the LoraConfig here


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_lora_config(config: Any, source: str, required: Sequence[str] = ()) -> dict[str, Any]:
    """Check the fields of a PEFT LoraConfig-like dict that set scales; raise LoraFormatError naming the key.

    Checked: ``peft_type`` (LORA), ``r`` (a positive integer), ``lora_alpha`` (a finite number), ``use_rslora``
    (true/false), ``rank_pattern`` / ``alpha_pattern`` (objects of numbers). `required` keys must be present.
    source: the file (and where in it) the config came from, for messages.
    """
    fix = (f"Fix it (PEFT's save_pretrained writes r and lora_alpha as numbers) or replace it with the "
           f"{ADAPTER_CONFIG_NAME} published with this LoRA.")
    if not isinstance(config, Mapping):
        raise LoraFormatError(f"{source} must be a JSON object (a PEFT LoraConfig), got {type(config).__name__}. {fix}")
    for key in required:
        if key not in config:
            raise LoraFormatError(f"{source} has no '{key}' key, so the LoRA's scale (lora_alpha / r) is unknown. {fix}")
    peft_type = config.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        raise LoraFormatError(
            f"{source}: 'peft_type' is {peft_type!r}; Flash LoRA Loader applies LoRA adapters only (peft_type LORA)."
        )
    if "r" in config:
        r = config["r"]
        if not _is_number(r) or r != int(r) or r < 1:
            raise LoraFormatError(f"{source}: key 'r' must be a positive integer (the LoRA rank), got {r!r}. {fix}")
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        raise LoraFormatError(f"{source}: key 'lora_alpha' must be a number, got {config['lora_alpha']!r}. {fix}")
    if "use_rslora" in config and config["use_rslora"] is not None and not isinstance(config["use_rslora"], bool):
        raise LoraFormatError(f"{source}: key 'use_rslora' must be true or false, got {config['use_rslora']!r}. {fix}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, Mapping) or not all(isinstance(k, str) and _is_number(v) for k, v in pattern.items()):
            raise LoraFormatError(
                f"{source}: key '{key}' must be an object of module pattern -> number, got {pattern!r}. {fix}"
            )
    return dict(config)


def _json_dict(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def alpha_configs_from_metadata(metadata: Mapping[str, str]) -> dict[str, dict]:
    """LoraConfig-like dicts (``lora_alpha``, ``r``, patterns) found in safetensors metadata, per component.

    Understands diffusers' ``lora_adapter_metadata`` (keys ``unet.lora_alpha``, ``text_encoder.r``, ...),
    any metadata entry holding a JSON object with ``lora_alpha`` (an embedded adapter config, for all
    components, key ``"*"``), and plain ``lora_alpha`` / ``r`` entries.
    """
    configs: dict[str, dict] = {}
    packed = _json_dict(metadata.get(DIFFUSERS_METADATA_KEY, ""))
    if packed:
        for key, value in packed.items():
            component, _, field_name = key.partition(".")
            if field_name:
                configs.setdefault(component, {})[field_name] = value
    for key, value in metadata.items():
        if key == DIFFUSERS_METADATA_KEY:
            continue
        embedded = _json_dict(value)
        if embedded and "lora_alpha" in embedded:
            configs.setdefault("*", {}).update(embedded)
    if "lora_alpha" in metadata:
        plain = {"lora_alpha": _metadata_number(metadata, "lora_alpha")}
        if "r" in metadata:
            plain["r"] = _metadata_number(metadata, "r")
        configs.setdefault("*", {}).update(plain)
    return configs


def _metadata_number(metadata: Mapping[str, str], key: str) -> float | int:
    """A number from a metadata string (``"8"``, ``"8.0"``), or LoraFormatError naming the metadata key."""
    try:
        value = float(metadata[key])
    except (TypeError, ValueError):
        raise LoraFormatError(
            f"metadata key '{key}' must be a number, got {metadata[key]!r}: re-export the LoRA, or remove the key."
        ) from None
    return int(value) if value.is_integer() else value


def _config_for(component: str, configs: Mapping[str, dict]) -> dict | None:
    names = {UNET: ("unet", "transformer"), TEXT_ENCODER: ("text_encoder",), TEXT_ENCODER_2: ("text_encoder_2",)}
    for name in names[component]:
        if name in configs:
            return configs[name]
    return configs.get("*")


def peft_alpha(config: Mapping[str, Any], module_path: str, rank: int) -> float:
    """The alpha that gives PEFT's scale for one module: alpha_pattern/lora_alpha, rsLoRA aware.

    PEFT scales by lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; returned as an alpha for the
    plain alpha / rank rule.
    """
    alpha = float(config.get("lora_alpha", rank))
    alpha_pattern = config.get("alpha_pattern") or {}
    if alpha_pattern:
        # PEFT's own pattern matching, not a re-implementation
        require("peft", "Reading a PEFT LoRA whose adapter_config.json has an alpha_pattern")
        from peft.utils.other import get_pattern_key

        pattern = get_pattern_key(list(alpha_pattern), module_path)
        alpha = float(alpha_pattern.get(pattern, alpha))
    if config.get("use_rslora"):
        return alpha * math.sqrt(rank)  # rsLoRA scale alpha / sqrt(r) = (alpha·sqrt(r)) / r
    return alpha


def _config_rank_mismatch(config: Mapping[str, Any], modules: Sequence[LoraModule]) -> bool:
    """True when the config's r (and rank_pattern) matches none of the tensors' ranks."""
    ranks = {m.rank for m in modules}
    config_ranks = {int(config["r"])} if "r" in config else set()
    config_ranks |= {int(r) for r in (config.get("rank_pattern") or {}).values()}
    return bool(config_ranks) and not (config_ranks & ranks)
