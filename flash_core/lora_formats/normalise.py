"""Normalising: a LoRA state dict of any supported key format (or a trained PEFT model's) into LoraModules, with
the alpha rules applied and anything that is not a plain, complete LoRA refused."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from flash_core.lora_formats.alpha import (
    ADAPTER_CONFIG_NAME,
    _config_for,
    _config_rank_mismatch,
    alpha_configs_from_metadata,
    peft_alpha,
    validate_lora_config,
)
from flash_core.lora_formats.modules import (
    COMPONENTS,
    PEFT,
    UNET,
    LoraFile,
    LoraFormatError,
    LoraModule,
)
from flash_core.lora_formats.recognise import (
    _UNSUPPORTED_PARTS,
    _UNSUPPORTED_SUFFIXES,
    _locate,
    _normalise_processor_path,
    _split_suffix,
)


def parse_lora_state_dict(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    adapter_config: Mapping[str, Any] | None = None,
    name: str = "<state dict>",
) -> LoraFile:
    """Normalise a LoRA state dict of any supported format into LoraModules, applying the alpha rules.

    Alpha, per module: its ``.alpha`` tensor; else the adapter config (argument, e.g. adapter_config.json);
    else a config in the metadata; else alpha = rank (the diffusers convention), with a warning for PEFT
    files, whose published alphas differ from their ranks.
    Raises LoraFormatError for keys that are not plain LoRA keys or pairs missing a half.
    """
    metadata = dict(metadata or {})
    if not tensors:
        raise LoraFormatError(f"'{name}' holds no tensors: it is not a LoRA.")
    unsupported = sorted(
        k for k in tensors if k.endswith(_UNSUPPORTED_SUFFIXES) or any(part in k for part in _UNSUPPORTED_PARTS)
    )
    if unsupported:
        raise LoraFormatError(
            f"'{name}' is not a plain LoRA: it has {len(unsupported)} keys of another adapter type "
            f"(DoRA/LoHa/LoKr/LoCon-mid/diff), e.g. {', '.join(unsupported[:3])}. "
            "Flash LoRA Loader applies plain LoRAs only; use ComfyUI's LoraLoader for this file."
        )
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unknown = []
    for key, tensor in tensors.items():
        split = _split_suffix(key)
        if split is None:
            unknown.append(key)
            continue
        prefix, part = split
        parts.setdefault(prefix, {})[part] = (key, tensor)
    if unknown:
        raise LoraFormatError(
            f"'{name}' has {len(unknown)} keys that are not LoRA keys, e.g. {', '.join(sorted(unknown)[:3])}: "
            "it is not a LoRA file (a full checkpoint or another adapter type?)."
        )
    incomplete = sorted(p for p, found in parts.items() if "down" not in found or "up" not in found)
    if incomplete:
        raise LoraFormatError(
            f"'{name}' has {len(incomplete)} LoRA modules without both down (A) and up (B) weights, "
            f"e.g. {', '.join(incomplete[:3])}: the file is incomplete; re-download or re-export it."
        )

    try:
        metadata_configs = {
            component: validate_lora_config(
                config, "the LoRA config in its metadata" + ("" if component == "*" else f" for '{component}'"))
            for component, config in alpha_configs_from_metadata(metadata).items()
        }
        if adapter_config is not None:
            adapter_config = validate_lora_config(adapter_config, "the adapter config")
    except LoraFormatError as error:
        raise LoraFormatError(f"'{name}': {error}") from error
    modules: list[LoraModule] = []
    formats: set[str] = set()
    peft_without_alpha = 0
    for prefix in sorted(parts):
        found = parts[prefix]
        component, path, flat, fmt = _locate(prefix)
        formats.add(fmt)
        if not flat:
            path = _normalise_processor_path(path)
        down_key, down = found["down"]
        up_key, up = found["up"]
        if down.ndim < 2 or up.ndim < 2 or up.shape[1] != down.shape[0]:
            raise LoraFormatError(
                f"'{name}': LoRA pair '{prefix}' has inconsistent shapes down {tuple(down.shape)} / "
                f"up {tuple(up.shape)}: the file is damaged."
            )
        rank = int(down.shape[0])
        source_keys = [down_key, up_key]
        if "alpha" in found:
            alpha_key, alpha_tensor = found["alpha"]
            source_keys.append(alpha_key)
            if alpha_tensor.numel() == 0:
                raise LoraFormatError(
                    f"'{name}': '{alpha_key}' is an empty tensor, so the scale of LoRA module '{prefix}' is unknown "
                    "(a kohya alpha holds one number): the file is damaged; re-download or re-export it."
                )
            alpha = float(alpha_tensor.float().reshape(-1)[0])  # stored alpha (kohya convention)
        else:
            # a PEFT adapter_config.json describes the whole file; otherwise the metadata's config per component
            config = adapter_config if adapter_config is not None else _config_for(component, metadata_configs)
            if config is not None and "lora_alpha" in config:
                alpha = peft_alpha(config, path, rank)
            else:
                alpha = float(rank)  # diffusers convention: no alpha means alpha = rank (scale 1)
                peft_without_alpha += fmt == PEFT
        module = LoraModule(component, path, flat, down, up, alpha, tuple(source_keys), prefix)
        _refuse_overflowing_scale(module, name)
        modules.append(module)

    warnings: list[str] = []
    if peft_without_alpha:
        warnings.append(
            f"'{name}' is a PEFT LoRA ({peft_without_alpha} modules) without alpha: no adapter_config.json next "
            "to it and no lora_alpha in its metadata, so alpha = rank (scale 1.0) is used. Published PEFT Flash "
            "LoRAs (flash-pixart, flash-sd3: r 64, lora_alpha 8) need scale 0.125: put their adapter_config.json "
            f"next to the file (or name it '<file name without .safetensors>.{ADAPTER_CONFIG_NAME}')."
        )
    if adapter_config is not None and _config_rank_mismatch(adapter_config, modules):
        warnings.append(
            f"'{name}': the adapter config's r ({adapter_config.get('r')}) matches none of the file's ranks "
            f"({sorted({m.rank for m in modules})}); it may belong to another LoRA."
        )
    return LoraFile(name, modules, tuple(sorted(formats)), metadata, warnings)


# Largest weight update a LoRA may add: float16's largest number. A bigger one overflows half-precision weights to
# inf (and the outputs to NaN); in float32 it drowns the weight it is added to. No trained LoRA comes near it.
MAX_UPDATE = 65504.0


def _refuse_overflowing_scale(module: LoraModule, name: str) -> None:
    """LoraFormatError when the module's alpha is not finite, or its update (alpha / rank) * up @ down reaches
    MAX_UPDATE: a huge alpha (1e30 in an .alpha tensor or a config) would otherwise turn the image into NaN
    silently. The update is only computed when a cheap bound says it might be that large."""
    where = f"'{name}': LoRA module '{module.source_prefix or module.path}'"
    fix = "the file (or its adapter config) is damaged; re-download or re-export it"
    if module.down.numel() == 0 or module.up.numel() == 0:
        raise LoraFormatError(f"{where} has empty weights (down {tuple(module.down.shape)}, up "
                              f"{tuple(module.up.shape)}): {fix}.")
    if not math.isfinite(module.alpha):
        raise LoraFormatError(f"{where} has alpha {module.alpha}, not a finite number: {fix}.")
    bound = abs(module.scale) * module.rank * float(module.up.abs().max()) * float(module.down.abs().max())
    if bound < MAX_UPDATE:
        return
    largest = float(module.delta().abs().max())
    if not largest < MAX_UPDATE:  # also NaN / inf
        raise LoraFormatError(
            f"{where} has alpha {module.alpha:g} (scale alpha / rank = {module.scale:g}), which makes its weight "
            f"update reach {largest:g}, beyond any model weight (float16 holds at most {MAX_UPDATE:g}): applied, it "
            f"would turn the model's outputs into NaN; {fix}."
        )


def modules_from_peft_state_dict(
    state_dict: Mapping[str, torch.Tensor], lora_alpha: float | Mapping[str, Any], component: str = UNET
) -> list[LoraModule]:
    """LoraModules from a trained model's PEFT state dict (``peft.get_peft_model_state_dict`` keys).

    lora_alpha: one alpha for all modules, or a LoraConfig-like dict (``lora_alpha``, ``alpha_pattern``, ...).
    Keys may be bare module paths (``down_blocks.0....to_q.lora_A.weight``) or PEFT-prefixed.
    """
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    config = dict(lora_alpha) if isinstance(lora_alpha, Mapping) else {"lora_alpha": float(lora_alpha)}
    bare = {k.removeprefix("base_model.model."): v for k, v in state_dict.items()}
    parsed = parse_lora_state_dict(bare, adapter_config=config, name="<trained LoRA>")
    return [
        LoraModule(component, m.path, m.flat, m.down, m.up, m.alpha, m.source_keys, "")
        for m in parsed.modules
    ]
