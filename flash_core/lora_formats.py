"""LoRA files: read them safely, recognise their key format, apply the alpha rules, export them.

The one home of LoRA key mapping in this project. Flash LoRAs are published in several formats:

  * kohya / ComfyUI native: ``lora_unet_<path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
    (``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for text encoders). ``<path>`` is either an LDM path
    (``input_blocks_1_1_...``) or a diffusers path (``down_blocks_0_attentions_0_...``, the converted
    ``comfy/FlashSDXL.safetensors``).
  * ComfyUI generic: ``diffusion_model.<ldm path>.lora_down.weight`` ...
  * diffusers (flash-sd, flash-sdxl ``pytorch_lora_weights.safetensors``): ``unet.<diffusers path>.lora_A.weight``
    / ``.lora_B.weight`` or ``.lora.down.weight`` / ``.lora.up.weight``; ``text_encoder.`` / ``text_encoder_2.``;
    alpha = rank unless the file's ``lora_adapter_metadata`` says otherwise.
  * PEFT (flash-pixart, flash-sd3 ``adapter_model.safetensors``): ``base_model.model.<module>.lora_A.weight``;
    alpha comes from ``adapter_config.json`` (``lora_alpha``, ``r``, ``alpha_pattern``, ``use_rslora``) or from
    the file's metadata. The files carry no alpha tensors: without the config they would be applied at
    alpha/rank = 1 instead of 8/64.

Everything is normalised to :class:`LoraModule` (down = A, up = B, alpha, and where the module lives).
Mapping onto a concrete model needs that model's key map (LoRA key prefix -> model weight key). The caller
builds it (the ComfyUI node uses ``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip``, which
already contain the diffusers -> LDM UNet mapping for SD1.x/SDXL via ``comfy.utils.unet_to_diffusers``);
this module never imports ComfyUI. :func:`map_lora` then maps every module or raises
:class:`LoraMappingError` saying which keys did not map and the likely reason.

Files are only read as safetensors, recognised by their structure (flash_core.file_formats); pickle-based files
(.ckpt/.pt/.pth/.bin, torch zip checkpoints) are refused, never unpickled. LoRAs holding NaN / Inf are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flash_core import file_formats
from flash_core.file_formats import PICKLE_SUFFIXES  # noqa: F401  (re-exported: names that say "pickle")
from flash_core.files import write_atomic, write_text_atomic

UNET = "unet"  # the denoiser (UNet or DiT transformer)
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
COMPONENTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)

ADAPTER_CONFIG_NAME = "adapter_config.json"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights writes the LoraConfig here

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

# File-format labels.
KOHYA = "kohya"
COMFYUI = "comfyui"
DIFFUSERS = "diffusers"
PEFT = "peft"
BARE = "bare"


class LoraFormatError(file_formats.FileFormatError):
    """The file cannot be read as a LoRA (wrong container, corrupt, non-finite, unknown keys, bad config)."""


class LoraMappingError(ValueError):
    """The LoRA is readable but (some of) its modules do not fit the model it is applied to."""


@dataclass(frozen=True)
class LoraModule:
    """One low-rank update W <- W + (alpha / rank) * up @ down of one weight.

    component: UNET (the denoiser, UNet or DiT), TEXT_ENCODER or TEXT_ENCODER_2.
    path: the module path inside the component. Dotted (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``
        for diffusers/PEFT files, an LDM path for ``diffusion_model.*`` files) unless ``flat`` is set; kohya files
        flatten dots to ``_``, which cannot be undone without the model, so their path stays flat.
    down: A, shape (rank, in_features[, kh, kw]).  up: B, shape (out_features, rank[, 1, 1]).
    alpha: the trained alpha; the trained scale is alpha / rank.
    source_keys: the file keys this module was read from (for error messages).
    source_prefix: the key prefix in the file (``unet.down_blocks...``, ``lora_unet_...``).
    """

    component: str
    path: str
    flat: bool
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    source_keys: tuple[str, ...] = ()
    source_prefix: str = ""

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank  # LoRA scale alpha / r (Hu et al. 2021, Sec. 4.1)

    def delta(self) -> torch.Tensor:
        """The weight update this module adds at strength 1, shaped like the down/up product (float32)."""
        up = self.up.float().flatten(start_dim=1)
        down = self.down.float().flatten(start_dim=1)
        return self.scale * (up @ down)  # ΔW = (alpha / r) · B A


@dataclass
class LoraFile:
    """A LoRA file normalised: its modules, which formats its keys used, and warnings for the user."""

    name: str
    modules: list[LoraModule]
    formats: tuple[str, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_keys(self) -> int:
        return sum(len(m.source_keys) for m in self.modules)


@dataclass(frozen=True)
class MappedModule:
    """A module matched to one model weight: `lora_key` is the key-map prefix that matched, `target` its value."""

    module: LoraModule
    lora_key: str
    target: Any  # a model weight key, or whatever the key map holds (ComfyUI: (key, offset) tuples too)


@dataclass
class LoraPlan:
    """Every module of a LoRA file mapped: the ones for the denoiser and the ones for the text encoder(s)."""

    unet: list[MappedModule]
    text_encoder: list[MappedModule]


# ----------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Key formats
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Alpha rules
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Normalising a state dict
# ----------------------------------------------------------------------------------------------------------


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
            alpha = float(alpha_tensor.float().reshape(-1)[0])  # stored alpha (kohya convention)
        else:
            # a PEFT adapter_config.json describes the whole file; otherwise the metadata's config per component
            config = adapter_config if adapter_config is not None else _config_for(component, metadata_configs)
            if config is not None and "lora_alpha" in config:
                alpha = peft_alpha(config, path, rank)
            else:
                alpha = float(rank)  # diffusers convention: no alpha means alpha = rank (scale 1)
                peft_without_alpha += fmt == PEFT
        modules.append(
            LoraModule(component, path, flat, down, up, alpha, tuple(source_keys), prefix)
        )

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


# ----------------------------------------------------------------------------------------------------------
# Mapping onto a model
# ----------------------------------------------------------------------------------------------------------


def flatten(path: str) -> str:
    """kohya flattening of a module path: dots become underscores."""
    return path.replace(".", "_")


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


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------


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
    """Write a .safetensors file atomically (temporary file in the same folder, then os.replace)."""
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


# ----------------------------------------------------------------------------------------------------------
# Export of a trained student, per backbone and format (the one entry point trainers call)
# ----------------------------------------------------------------------------------------------------------

EXPORT_FORMATS = (COMFYUI, DIFFUSERS, PEFT)
# diffusers' name of the denoiser in each backbone's pipeline (and the key prefix its LoRA loaders read)
DENOISER_NAMES = {"sd15": "unet", "sdxl": "unet", "pixart": "transformer", "sd3": "transformer"}
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
    if backbone not in DENOISER_NAMES:
        raise ValueError(f"unknown backbone {backbone!r}: LoRA exports know {', '.join(DENOISER_NAMES)}")
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
    denoiser = DENOISER_NAMES[backbone]
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
