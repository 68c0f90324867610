"""Mapping a normalised LoRA onto a model's key map, with diagnostics: which keys did not map, and the likely
cause (a LoRA for another base model, told apart by its layers and cross-attention width)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from flash_core.lora_formats.modules import (
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    LoraFile,
    LoraMappingError,
    LoraModule,
    LoraPlan,
    MappedModule,
)
from flash_core.lora_formats.recognise import flatten


def candidate_lora_keys(module: LoraModule) -> list[str]:
    """Key-map prefixes under which a model's key map may list this module, most specific first.

    Covers the names ComfyUI's key maps use: kohya (``lora_unet_`` + LDM or diffusers path, ``lora_te*_``),
    ``diffusion_model.<ldm path>``, diffusers ``transformer.`` / ``text_encoder.`` and PEFT ``base_model.model.``.
    """
    p = module.path
    if module.component == UNET:
        if module.flat:
            keys = ["lora_unet_" + p, "lora_transformer_" + p]
        else:
            keys = [
                "diffusion_model." + p,
                "lora_unet_" + flatten(p),
                "transformer." + p,
                "base_model.model." + p,
                "lora_transformer_" + flatten(p),
            ]
    elif module.component == TEXT_ENCODER:
        keys = ["lora_te_" + p, "lora_te1_" + p] if module.flat else [
            "text_encoder." + p, "lora_te_" + flatten(p), "lora_te1_" + flatten(p)]
    else:
        keys = ["lora_te2_" + p] if module.flat else ["text_encoder_2." + p, "lora_te2_" + flatten(p)]
    if module.source_prefix and module.source_prefix not in keys:
        keys.insert(0, module.source_prefix)
    return keys


def _target_shape_ok(module: LoraModule, shape: Sequence[int]) -> bool:
    """Does up @ down produce a tensor of the weight's shape (linear, or conv with flattened kernel)?"""
    if len(shape) < 2:
        return False
    return int(module.up.shape[0]) == int(shape[0]) and module.down[0].numel() == math.prod(shape[1:])


def _cross_attention_width(modules: Iterable[LoraModule]) -> int | None:
    for m in modules:
        if m.component == UNET and re.search(r"attn2[._]to_[kv]$", m.path):
            return int(m.down.shape[1])
    return None


def lora_base_evidence(modules: Sequence[LoraModule]) -> tuple[str | None, list[str]]:
    """Guess which base model family a LoRA was trained for: ('SDXL' | 'SD1.x' | 'SD2.x' | None, reasons)."""
    reasons: list[str] = []
    if any(m.component == TEXT_ENCODER_2 for m in modules):
        reasons.append("it has keys for SDXL's second text encoder (text_encoder_2 / lora_te2)")
    unet_paths = [m.path for m in modules if m.component == UNET]
    sdxl_patterns = (
        (r"transformer_blocks[._][1-9]", "transformer depth > 1 (transformer_blocks.1 and up)"),
        (r"(^|[._])(add_embedding|label_emb)([._]|$)", "SDXL's add_embedding / label_emb"),
        (r"(^|[._])up_blocks[._]0[._]attentions", "attentions in up_blocks.0"),
        (r"(^|[._])output_blocks[._][012][._]1[._]", "attentions in output_blocks.0-2"),
    )
    for pattern, reason in sdxl_patterns:
        if any(re.search(pattern, p) for p in unet_paths):
            reasons.append(reason)
    width = _cross_attention_width(modules)
    if width == 2048:
        reasons.append("2048-wide cross-attention (SDXL's text embedding)")
    if reasons:
        return "SDXL", reasons
    if width == 768:
        return "SD1.x", ["768-wide cross-attention (SD1.x's CLIP-L embedding)"]
    if width == 1024:
        return "SD2.x", ["1024-wide cross-attention (SD2.x's OpenCLIP-H embedding)"]
    return None, []


def _model_base(model_family: str | None) -> str | None:
    """'SDXL' / 'SD1.x' / 'SD2.x' for ComfyUI model-config names (SD15, SD20, SDXL, SSD1B, ...), else None."""
    if not model_family:
        return None
    name = model_family.upper()
    if "XL" in name or name in ("SSD1B", "SEGMIND_VEGA", "KOALA_700M", "KOALA_1B"):
        return "SDXL"
    if name.startswith(("SD15", "SD1")):
        return "SD1.x"
    if name.startswith(("SD20", "SD21", "SD2")):
        return "SD2.x"
    return None


def _a(word: str) -> str:
    """'an SDXL', 'a Flux': the article as the name is spoken (letters S, F, H, ... start with a vowel sound)."""
    return f"{'an' if word[:1].upper() in 'AEFHILMNORSX' else 'a'} {word}"


def _likely_cause(lora: LoraFile, model_family: str | None) -> str:
    base, reasons = lora_base_evidence(lora.modules)
    model_base = _model_base(model_family)
    if base is not None and model_base is not None and base != model_base:
        return (f"this looks like {_a(base)} LoRA ({'; '.join(reasons)}) on {_a(model_family)} model: "
                f"load it with {_a(base)} checkpoint, or pick the LoRA made for your base model.")
    return "wrong base model, or the LoRA targets layers this model does not have."


def map_lora(
    lora: LoraFile,
    unet_keys: Mapping[str, Any],
    text_encoder_keys: Mapping[str, Any] | None = None,
    weight_shapes: Mapping[str, Sequence[int]] | None = None,
    model_family: str | None = None,
) -> LoraPlan:
    """Map every module of a LoRA onto a model, or raise LoraMappingError.

    unet_keys / text_encoder_keys: the model's key maps, LoRA key prefix -> model weight key (as built by
        ``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip``); text_encoder_keys None means no
        text encoder was given.
    weight_shapes: model weight key -> shape, to refuse modules whose names match but whose shapes do not.
    model_family: a name for the model in messages (e.g. ComfyUI's model config class, "SD15").
    """
    family = f"{model_family} " if model_family else ""
    te_modules = [m for m in lora.modules if m.component != UNET]
    if te_modules and text_encoder_keys is None:
        raise LoraMappingError(
            f"'{lora.name}' has {len(te_modules)} text-encoder LoRA modules (e.g. {te_modules[0].source_keys[0]}) "
            "but no CLIP was given: connect the CLIP input of Flash LoRA Loader."
        )
    mapped: list[MappedModule] = []
    unmapped: list[LoraModule] = []
    misshaped: list[tuple[LoraModule, Any]] = []
    for module in lora.modules:
        key_map = unet_keys if module.component == UNET else text_encoder_keys
        hit = next((k for k in candidate_lora_keys(module) if k in key_map), None)
        if hit is None:
            unmapped.append(module)
            continue
        target = key_map[hit]
        shape = weight_shapes.get(target) if weight_shapes is not None and isinstance(target, str) else None
        if shape is not None and not _target_shape_ok(module, shape):
            misshaped.append((module, shape))
            continue
        mapped.append(MappedModule(module, hit, target))

    total_keys = lora.num_keys
    if not mapped and not misshaped:
        raise LoraMappingError(
            f"None of the {total_keys} keys of '{lora.name}' match this {family}model: wrong base model or not "
            f"a LoRA for it. Likely cause: {_likely_cause(lora, model_family)}"
        )
    if unmapped:
        bad_keys = [k for m in unmapped for k in m.source_keys]
        raise LoraMappingError(
            f"{len(bad_keys)} of the {total_keys} keys of '{lora.name}' ({len(unmapped)} of {len(lora.modules)} "
            f"LoRA modules) do not map onto this {family}model, e.g. {', '.join(bad_keys[:5])}. "
            f"Likely cause: {_likely_cause(lora, model_family)}"
        )
    if misshaped:
        module, shape = misshaped[0]
        raise LoraMappingError(
            f"{len(misshaped)} LoRA modules of '{lora.name}' match this {family}model by name but not by shape, "
            f"e.g. {module.source_keys[0]}: LoRA update {int(module.up.shape[0])}x{module.down[0].numel()} vs "
            f"model weight {tuple(shape)}. Likely cause: {_likely_cause(lora, model_family)}"
        )
    return LoraPlan(
        unet=[m for m in mapped if m.module.component == UNET],
        text_encoder=[m for m in mapped if m.module.component != UNET],
    )


def comfy_lora_inputs(mapped: Sequence[MappedModule]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, to_load) in the kohya form ComfyUI's ``comfy.lora.load_lora`` reads, one entry per module.

    The alpha tensor carries the trained alpha, so load_lora applies alpha / rank exactly.
    """
    tensors: dict[str, torch.Tensor] = {}
    to_load: dict[str, Any] = {}
    for m in mapped:
        tensors[f"{m.lora_key}.lora_up.weight"] = m.module.up
        tensors[f"{m.lora_key}.lora_down.weight"] = m.module.down
        tensors[f"{m.lora_key}.alpha"] = torch.tensor(float(m.module.alpha))
        to_load[m.lora_key] = m.target
    return tensors, to_load
