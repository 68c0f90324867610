"""LoRA files: read them safely, recognise their key format, apply the alpha rules, map them, export them.

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

One job per file, in the order a file travels:

  * ``read``: the file (safetensors only) and its adapter config -> tensors, metadata, config.
  * ``recognise``: which key format each key uses, and where its module lives.
  * ``alpha``: the alpha rules (adapter config, metadata configs, PEFT patterns, rsLoRA).
  * ``normalise``: a state dict of any format -> :class:`LoraFile` of :class:`LoraModule`.
  * ``mapping``: modules -> a model's weights, with diagnostics; ComfyUI's ``load_lora`` input shape.
  * ``export``: modules -> kohya / ComfyUI, diffusers or PEFT files, written atomically.
  * ``metadata``: what a Flash LoRA's ``flash.*`` keys say about sampling it, checked as read.
  * ``modules``: the records and errors they all share.

Every name is importable from ``flash_core.lora_formats`` itself.
"""

from __future__ import annotations

from flash_core.file_formats import PICKLE_SUFFIXES
from flash_core.lora_formats.alpha import (
    ADAPTER_CONFIG_NAME,
    DIFFUSERS_METADATA_KEY,
    alpha_configs_from_metadata,
    peft_alpha,
    validate_lora_config,
)
from flash_core.lora_formats.export import (
    EXPORT_FORMATS,
    UNAVAILABLE_EXPORTS,
    LoraExport,
    build_lora_export,
    check_export_format,
    export_formats,
    module_path_map,
    rename_modules,
    save_lora,
    save_peft_adapter,
    to_diffusers_state_dict,
    to_kohya_state_dict,
    to_peft_state_dict,
)
from flash_core.lora_formats.mapping import (
    candidate_lora_keys,
    comfy_lora_inputs,
    lora_base_evidence,
    map_lora,
)
from flash_core.lora_formats.metadata import (
    EXPORT_DTYPE,
    RECOMMENDED_CFG,
    SamplingSettings,
    lora_metadata,
    sampling_settings,
    sampling_timesteps,
)
from flash_core.lora_formats.modules import (
    BARE,
    COMFYUI,
    COMPONENTS,
    DIFFUSERS,
    KOHYA,
    PEFT,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    LoraFile,
    LoraFormatError,
    LoraMappingError,
    LoraModule,
    LoraPlan,
    MappedModule,
)
from flash_core.lora_formats.normalise import modules_from_peft_state_dict, parse_lora_state_dict
from flash_core.lora_formats.read import find_adapter_config, load_safetensors, read_lora, refuse_non_finite
from flash_core.lora_formats.recognise import detect_format, flatten

__all__ = [
    "EXPORT_DTYPE", "RECOMMENDED_CFG", "SamplingSettings", "lora_metadata", "sampling_settings", "sampling_timesteps",
    "ADAPTER_CONFIG_NAME", "BARE", "COMFYUI", "COMPONENTS", "DIFFUSERS", "DIFFUSERS_METADATA_KEY",
    "EXPORT_FORMATS", "KOHYA", "PEFT", "PICKLE_SUFFIXES", "TEXT_ENCODER", "TEXT_ENCODER_2", "UNAVAILABLE_EXPORTS",
    "UNET", "LoraExport", "LoraFile", "LoraFormatError", "LoraMappingError", "LoraModule", "LoraPlan",
    "MappedModule", "alpha_configs_from_metadata", "build_lora_export", "candidate_lora_keys",
    "check_export_format", "comfy_lora_inputs", "detect_format", "export_formats", "find_adapter_config",
    "flatten", "load_safetensors", "lora_base_evidence", "map_lora", "module_path_map",
    "modules_from_peft_state_dict", "parse_lora_state_dict", "peft_alpha", "read_lora", "refuse_non_finite",
    "rename_modules", "save_lora", "save_peft_adapter", "to_diffusers_state_dict", "to_kohya_state_dict",
    "to_peft_state_dict", "validate_lora_config",
]
