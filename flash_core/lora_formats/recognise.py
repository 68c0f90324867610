"""Key formats: which LoRA naming a key uses (kohya, ComfyUI, diffusers, PEFT, bare) and where its module lives.

A LoRA key is ``<prefix><pair suffix>``; the suffix says which half of the pair (down = A, up = B) or the alpha it
is, the prefix says the component (denoiser or text encoder) and the module path.
"""

from __future__ import annotations

from collections.abc import Iterable

from flash_core.lora_formats.modules import (
    BARE,
    COMFYUI,
    DIFFUSERS,
    KOHYA,
    PEFT,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
)

# Key suffixes of a plain LoRA pair (and its alpha), every naming we know. Order: longest first.
_PAIR_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"),  # old diffusers attention processors: ...processor.to_q_lora.down.weight
    ("_lora.up.weight", "up"),
    (".alpha", "alpha"),
)
# Parts of LoRA variants this loader does not apply (ComfyUI's own LoraLoader handles several of them).
_UNSUPPORTED_SUFFIXES = (
    ".dora_scale", ".lora_magnitude_vector", ".lora_magnitude_vector.weight", ".lora_mid.weight", ".diff",
    ".diff_b", ".w_norm", ".b_norm", ".set_weight", ".lora_B.bias", ".reshape_weight",
)
_UNSUPPORTED_PARTS = (".hada_", ".lokr_", ".oft_", ".glora_")


def _split_suffix(key: str) -> tuple[str, str] | None:
    """('prefix', 'down'|'up'|'alpha') for a LoRA key, None for anything else."""
    for suffix, part in _PAIR_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], part
    return None


def _locate(prefix: str) -> tuple[str, str, bool, str]:
    """(component, path, flat, format) of a LoRA key prefix."""
    for kohya_prefix, component in (
        ("lora_unet_", UNET),
        ("lora_transformer_", UNET),
        ("lora_te1_", TEXT_ENCODER),
        ("lora_te2_", TEXT_ENCODER_2),
        ("lora_te_", TEXT_ENCODER),
    ):
        if prefix.startswith(kohya_prefix):
            return component, prefix[len(kohya_prefix):], True, KOHYA
    if prefix.startswith("diffusion_model."):
        return UNET, prefix[len("diffusion_model."):], False, COMFYUI
    for peft_prefix in ("unet.base_model.model.", "base_model.model."):
        if prefix.startswith(peft_prefix):
            path = prefix[len(peft_prefix):]
            component = TEXT_ENCODER if path.startswith("text_model.") else UNET
            return component, path, False, PEFT
    for diffusers_prefix, component in (
        ("unet.", UNET),
        ("transformer.", UNET),
        ("text_encoder_2.", TEXT_ENCODER_2),
        ("text_encoder.", TEXT_ENCODER),
    ):
        if prefix.startswith(diffusers_prefix):
            return component, prefix[len(diffusers_prefix):], False, DIFFUSERS
    return UNET, prefix, False, BARE


def _normalise_processor_path(path: str) -> str:
    """Old diffusers attention-processor names -> module paths (``attn1.processor.to_out`` -> ``attn1.to_out.0``)."""
    if ".processor." not in path:
        return path
    path = path.replace(".processor.", ".")
    return path + ".0" if path.endswith(".to_out") else path


def detect_format(keys: Iterable[str]) -> tuple[str, ...]:
    """The key formats (KOHYA, COMFYUI, DIFFUSERS, PEFT, BARE) used by a LoRA state dict's keys, sorted."""
    found = set()
    for key in keys:
        split = _split_suffix(key)
        if split is not None:
            found.add(_locate(split[0])[3])
    return tuple(sorted(found))


def flatten(path: str) -> str:
    """kohya flattening of a module path: dots become underscores."""
    return path.replace(".", "_")
