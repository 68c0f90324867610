"""diffusers SD-family component configs and weight names translated into ComfyUI's: the UNet config into a
ComfyUI unet_config and its weights into LDM names, the scheduler config into discrete model sampling settings,
the VAE config into an AutoencoderKL ddconfig and its weights into ComfyUI's names, the CLIP text encoder config
into comfy.sd1_clip's. A value ComfyUI's SD models cannot build stops with a PipelineError naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import comfy.model_base
import comfy.utils
import torch

from .diffusers_folder import OTHER_LOADERS, _fail


# --------------------------------------------------------------------------------------------------
# UNet: diffusers config -> ComfyUI unet_config; weights -> LDM names
# --------------------------------------------------------------------------------------------------

# diffusers UNet2DConditionModel options that ComfyUI's UNetModel implements only at these values.
UNET_FIXED = {
    "act_fn": "silu", "center_input_sample": False, "class_embed_type": None, "num_class_embeds": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_norm": None,
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_scale_factor": 1, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_type": "positional", "timestep_post_act": None,
    "attention_type": "default", "norm_eps": 1e-5, "num_attention_heads": None,
}
DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # block type -> has transformers
UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def _same(got, want) -> bool:
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return abs(got - want) <= 1e-12
    return got == want


def _per_level(value, levels: int, what: str, where: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise _fail(f"{where} {what} has {len(value)} entries for {levels} blocks; re-save the UNet.")
        return list(value)
    return [value] * levels


def _per_layer(value, layers: int, what: str, where: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * layers
    if len(values) != layers or not all(isinstance(v, int) for v in values):
        raise _fail(f"{where} {what} does not give one transformer depth per layer; re-save the UNet.")
    return values


def unet_config_from_diffusers(config: dict, folder: Path) -> dict[str, Any]:
    """ComfyUI's UNetModel arguments (a comfy.supported_models unet_config) for a diffusers UNet config."""
    where = f"'{folder}' unet/config.json:"
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise _fail(f"{where} is a {config.get('_class_name')}, not a UNet2DConditionModel; {OTHER_LOADERS}.")
    if config.get("addition_embed_type") is not None:
        raise _fail(f"{where} addition_embed_type is '{config['addition_embed_type']}' (SDXL-style "
                    f"micro-conditioning), which this loader does not build; {OTHER_LOADERS}.")
    for key, value in UNET_FIXED.items():
        if not _same(config.get(key, value), value):
            raise _fail(f"{where} {key} = {config.get(key)!r}, but ComfyUI's SD UNet only implements {key} = "
                        f"{value!r}: this is not an SD1.x/SD2.x-family UNet; {OTHER_LOADERS}.")
    only_cross = config.get("only_cross_attention", False)
    if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
        raise _fail(f"{where} only_cross_attention is set; ComfyUI's SD UNet always has self-attention.")
    if config.get("mid_block_only_cross_attention"):
        raise _fail(f"{where} mid_block_only_cross_attention is set; ComfyUI's SD UNet always has self-attention.")

    channels = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    down_types = list(config.get("down_block_types", ()))
    up_types = list(config.get("up_block_types", ()))
    levels = len(channels)
    if levels == 0 or len(down_types) != levels or len(up_types) != levels:
        raise _fail(f"{where} needs one down_block_type and one up_block_type per block_out_channels entry.")
    for types, table in ((down_types, DOWN_BLOCKS), (up_types, UP_BLOCKS)):
        unknown = [t for t in types if t not in table]
        if unknown:
            raise _fail(f"{where} block type {unknown[0]} is not an SD UNet block (supported: "
                        f"{', '.join(table)}); {OTHER_LOADERS}.")
    model_channels = channels[0]
    if any(c % model_channels for c in channels):
        raise _fail(f"{where} block_out_channels {channels} are not multiples of the first one; ComfyUI's UNet "
                    "needs integer channel multipliers.")

    layers = _per_level(config.get("layers_per_block", 2), levels, "layers_per_block", where)
    if len(set(layers)) != 1 or not isinstance(layers[0], int):
        raise _fail(f"{where} layers_per_block {layers} differs per block; ComfyUI's diffusers <-> LDM key map "
                    "(comfy.utils.unet_to_diffusers, also used to apply LoRAs) needs one value for every block.")
    cross_dim = config.get("cross_attention_dim", 1280)
    if isinstance(cross_dim, (list, tuple)):
        if len(set(cross_dim)) != 1:
            raise _fail(f"{where} cross_attention_dim differs per block ({cross_dim}); ComfyUI's UNet has one "
                        "context_dim.")
        cross_dim = cross_dim[0]
    time_dim = config.get("time_embedding_dim")
    if time_dim is not None and time_dim != 4 * model_channels:
        raise _fail(f"{where} time_embedding_dim {time_dim} is not 4 x {model_channels}; ComfyUI's UNet fixes it "
                    "at 4 x the first block's channels.")

    # diffusers' legacy `attention_head_dim` is the number of heads of each level.
    heads = _per_level(config.get("attention_head_dim", 8), levels, "attention_head_dim", where)
    depths_down = _per_level(config.get("transformer_layers_per_block", 1), levels,
                             "transformer_layers_per_block", where)
    depths_up = config.get("reverse_transformer_layers_per_block")
    depths_up = _per_level(list(reversed(depths_down)) if depths_up is None else depths_up, levels,
                           "reverse_transformer_layers_per_block", where)
    attention_levels: dict[int, int] = {}  # level -> heads, for levels with transformers (middle block included)

    def depths(value, count: int, cross: bool, level: int, block: str) -> list[int]:
        values = _per_layer(value, count, "transformer_layers_per_block", where)
        if not cross:
            return [0] * count
        if any(v < 1 for v in values):
            raise _fail(f"{where} {block} is a cross-attention block with 0 transformer layers; ComfyUI's UNet "
                        "has no such block.")
        attention_levels[level] = heads[level]
        return values

    transformer_depth: list[int] = []
    for level in range(levels):
        transformer_depth += depths(depths_down[level], layers[level], DOWN_BLOCKS[down_types[level]], level,
                                    f"down block {level}")
    output_depths: list[int] = []  # in output-block order (lowest resolution first)
    for block in range(levels):
        level = levels - 1 - block
        output_depths += depths(depths_up[block], layers[level] + 1, UP_BLOCKS[up_types[block]], level,
                                f"up block {block}")

    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type == "UNetMidBlock2DCrossAttn":
        mid_depth = depths_down[-1]  # diffusers' middle block takes the last level's depth
        transformer_depth_middle = int(mid_depth[0] if isinstance(mid_depth, (list, tuple)) else mid_depth)
        attention_levels[levels - 1] = heads[-1]
    elif mid_type is None:
        transformer_depth_middle = -2  # ComfyUI: no middle block
    else:
        raise _fail(f"{where} mid_block_type {mid_type} is not built by ComfyUI's SD UNet "
                    "(UNetMidBlock2DCrossAttn or none).")

    # ComfyUI has one head rule for the whole UNet: a fixed head count or a fixed head width.
    for level, h in attention_levels.items():
        if not isinstance(h, int) or h < 1 or channels[level] % h:
            raise _fail(f"{where} attention_head_dim {h} (heads) does not divide the {channels[level]} channels of "
                        f"block {level}.")
    num_heads, num_head_channels = -1, -1
    head_counts = set(attention_levels.values())
    head_widths = {channels[level] // h for level, h in attention_levels.items()}
    if len(head_counts) <= 1:
        num_heads = head_counts.pop() if head_counts else 1
    elif len(head_widths) == 1:
        num_head_channels = head_widths.pop()
    else:
        raise _fail(f"{where} attention_head_dim {heads} gives neither one head count nor one head width for all "
                    "blocks; ComfyUI's UNet supports one of the two.")

    in_channels = int(config.get("in_channels", 4))
    out_channels = int(config.get("out_channels", 4))
    if in_channels not in (out_channels, 2 * out_channels + 1):
        raise _fail(f"{where} in_channels {in_channels} is neither out_channels ({out_channels}) nor the inpainting "
                    f"layout ({2 * out_channels + 1}); ComfyUI cannot feed this UNet.")
    groups = config.get("norm_num_groups", 32)
    if not isinstance(groups, int) or groups < 1:
        raise _fail(f"{where} norm_num_groups {groups!r} is not supported (a number of groups is needed).")

    unet_config: dict[str, Any] = {
        "use_checkpoint": False, "image_size": 32, "in_channels": in_channels, "out_channels": out_channels,
        "model_channels": model_channels, "num_res_blocks": layers,
        "channel_mult": [c // model_channels for c in channels],
        "transformer_depth": transformer_depth, "transformer_depth_output": list(reversed(output_depths)),
        "transformer_depth_middle": transformer_depth_middle, "context_dim": int(cross_dim),
        "num_heads": num_heads, "num_head_channels": num_head_channels,
        "use_linear_in_transformer": bool(config.get("use_linear_projection", False)),
        "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    if config.get("upcast_attention"):
        unet_config["attn_precision"] = torch.float32
    return unet_config


def convert_unet_state_dict(state: dict[str, torch.Tensor], unet_config: dict, folder: Path) -> dict:
    """diffusers UNet keys -> ComfyUI LDM keys (comfy.utils.unet_to_diffusers maps diffusers names to LDM names)."""
    to_ldm = comfy.utils.unet_to_diffusers(unet_config)
    unmapped = sorted(k for k in state if k not in to_ldm)
    if unmapped:
        raise _fail(f"'{folder}' unet weights have {len(unmapped)} keys that the UNet described by unet/config.json "
                    f"does not have (e.g. {', '.join(unmapped[:3])}). The weights and config do not match: re-save "
                    "the UNet with save_pretrained.")
    return {to_ldm[k]: v for k, v in state.items()}


# --------------------------------------------------------------------------------------------------
# Scheduler: diffusers scheduler_config -> ComfyUI discrete model sampling
# --------------------------------------------------------------------------------------------------


# diffusers beta_schedule -> ComfyUI make_beta_schedule name ("linear" there is diffusers' scaled_linear)
BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"epsilon": comfy.model_base.ModelType.EPS,
                    "v_prediction": comfy.model_base.ModelType.V_PREDICTION}


def sampling_from_scheduler(config: dict, folder: Path) -> tuple[comfy.model_base.ModelType, dict]:
    """ComfyUI ModelSamplingDiscrete settings and model type from a diffusers scheduler_config.json."""
    where = f"'{folder}' scheduler/scheduler_config.json:"
    schedule = config.get("beta_schedule", "scaled_linear")
    if config.get("trained_betas") is not None or schedule not in BETA_SCHEDULES:
        raise _fail(f"{where} beta_schedule '{schedule}' (or trained_betas) is not one ComfyUI's discrete model "
                    f"sampling builds ({', '.join(BETA_SCHEDULES)}); save the scheduler with one of those.")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise _fail(f"{where} prediction_type '{prediction}' is not supported ({', '.join(PREDICTION_TYPES)}).")
    settings = {
        "beta_schedule": BETA_SCHEDULES[schedule],
        "linear_start": float(config.get("beta_start", 0.00085)),
        "linear_end": float(config.get("beta_end", 0.012)),
        "timesteps": int(config.get("num_train_timesteps", 1000)),
        "zsnr": bool(config.get("rescale_betas_zero_snr", False)),
    }
    return PREDICTION_TYPES[prediction], settings


# --------------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------------

VAE_FIXED = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
             "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}
SD_VAE_CHANNELS = [128, 256, 512, 512]
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                 "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # current and legacy names


def vae_ddconfig(config: dict, folder: Path) -> dict:
    """ComfyUI's AutoencoderKL ddconfig for a diffusers AutoencoderKL config (any number of levels)."""
    where = f"'{folder}' vae/config.json:"
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise _fail(f"{where} is a {config.get('_class_name')}, not an AutoencoderKL; {OTHER_LOADERS}.")
    for key, value in VAE_FIXED.items():
        if config.get(key, value) != value:
            raise _fail(f"{where} {key} = {config.get(key)!r}, but ComfyUI's SD VAE only builds {key} = {value!r}; "
                        f"{OTHER_LOADERS}.")
    channels = list(config.get("block_out_channels", (64,)))
    levels = len(channels)
    down = list(config.get("down_block_types", ["DownEncoderBlock2D"] * levels))
    up = list(config.get("up_block_types", ["UpDecoderBlock2D"] * levels))
    if levels == 0 or down != ["DownEncoderBlock2D"] * levels or up != ["UpDecoderBlock2D"] * levels:
        raise _fail(f"{where} needs one DownEncoderBlock2D and one UpDecoderBlock2D per block_out_channels entry "
                    "(the SD VAE layout).")
    ch = channels[0]
    if any(c % ch for c in channels):
        raise _fail(f"{where} block_out_channels {channels} are not multiples of the first one.")
    if any(c % 32 for c in channels):
        raise _fail(f"{where} block_out_channels {channels}: ComfyUI builds its VAE layers with 32 normalisation "
                    "groups, so every width must be a multiple of 32.")
    groups = config.get("norm_num_groups", 32)
    if not isinstance(groups, int) or groups < 1 or any(c % groups for c in channels):
        raise _fail(f"{where} norm_num_groups {groups!r} does not divide block_out_channels {channels}.")
    return {
        "double_z": True, "z_channels": int(config.get("latent_channels", 4)),
        "resolution": int(config.get("sample_size", 256)), "in_channels": int(config.get("in_channels", 3)),
        "out_ch": int(config.get("out_channels", 3)), "ch": ch, "ch_mult": [c // ch for c in channels],
        "num_res_blocks": int(config.get("layers_per_block", 1)), "attn_resolutions": [], "dropout": 0.0,
    }


def vae_key_map(levels: int, layers: int) -> dict[str, str]:
    """diffusers AutoencoderKL module path -> ComfyUI (LDM) module path, for any number of levels and layers.

    (comfy.diffusers_convert.convert_vae_state_dict assumes SD's 4 levels: on a 2-level VAE it would put the
    decoder's blocks at up.3 / up.2.)
    """
    paths: dict[str, str] = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        paths[f"{part}.conv_in"] = f"{part}.conv_in"
        paths[f"{part}.conv_out"] = f"{part}.conv_out"
        paths[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        for i in range(2):
            for src, dst in VAE_RESNET.items():
                paths[f"{part}.mid_block.resnets.{i}.{src}"] = f"{part}.mid.block_{i + 1}.{dst}"
        for src, dst in VAE_ATTENTION.items():
            paths[f"{part}.mid_block.attentions.0.{src}"] = f"{part}.mid.attn_1.{dst}"
    for i in range(levels):
        for j in range(layers):
            for src, dst in VAE_RESNET.items():
                paths[f"encoder.down_blocks.{i}.resnets.{j}.{src}"] = f"encoder.down.{i}.block.{j}.{dst}"
        paths[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        level = levels - 1 - i  # diffusers counts decoder blocks from the lowest resolution, LDM from the highest
        for j in range(layers + 1):
            for src, dst in VAE_RESNET.items():
                paths[f"decoder.up_blocks.{i}.resnets.{j}.{src}"] = f"decoder.up.{level}.block.{j}.{dst}"
        paths[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{level}.upsample.conv"
    return paths


def convert_vae_state_dict(state: dict[str, torch.Tensor], ddconfig: dict, folder: Path) -> tuple[dict, dict]:
    """(ComfyUI-keyed state dict, ComfyUI key -> diffusers key); linear attention weights become 1x1 convs."""
    paths = vae_key_map(len(ddconfig["ch_mult"]), ddconfig["num_res_blocks"])
    converted: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for key, tensor in state.items():
        path, _, leaf = key.rpartition(".")
        if path not in paths or leaf not in ("weight", "bias"):
            raise _fail(f"'{folder}' vae weight {key} does not belong to the AutoencoderKL described by "
                        "vae/config.json. The weights and config do not match: re-save the VAE with save_pretrained.")
        new_key = f"{paths[path]}.{leaf}"
        if ".mid.attn_1." in new_key and leaf == "weight" and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        if new_key in converted:
            raise _fail(f"'{folder}' vae weights hold both {source[new_key]} and {key} (legacy and current attention "
                        "names); re-save the VAE with save_pretrained.")
        converted[new_key], source[new_key] = tensor, key
    return converted, source


# --------------------------------------------------------------------------------------------------
# Text encoder
# --------------------------------------------------------------------------------------------------


CLIP_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")  # comfy.clip_model.ACTIVATIONS
COMFY_CLIP_VOCAB = 49408  # comfy.clip_model.CLIPEmbeddings is built with CLIP's vocabulary size


def text_model_config(config: dict, folder: Path, eos_token_id: int) -> dict:
    """The textmodel_json_config of comfy.sd1_clip.SDClipModel for a transformers CLIPTextConfig."""
    where = f"'{folder}' text_encoder/config.json:"
    if config.get("model_type", "clip_text_model") != "clip_text_model":
        raise _fail(f"{where} is a {config.get('model_type')} text encoder, not a CLIP text model; {OTHER_LOADERS}.")
    act = config.get("hidden_act", "quick_gelu")
    if act not in CLIP_ACTIVATIONS:
        raise _fail(f"{where} hidden_act '{act}' is not one ComfyUI's CLIP implements "
                    f"({', '.join(CLIP_ACTIVATIONS)}).")
    if not _same(float(config.get("layer_norm_eps", 1e-5)), 1e-5):
        raise _fail(f"{where} layer_norm_eps {config.get('layer_norm_eps')} differs from ComfyUI CLIP's 1e-5.")
    if int(config.get("vocab_size", COMFY_CLIP_VOCAB)) != COMFY_CLIP_VOCAB:
        raise _fail(f"{where} vocab_size {config.get('vocab_size')} is not CLIP's {COMFY_CLIP_VOCAB}, the size "
                    "ComfyUI's CLIP text model is built with.")
    # ComfyUI pads every prompt chunk to the text encoder's positions (77 for CLIP) and encodes longer prompts
    # chunk by chunk, whatever model_max_length the tokenizer files give.
    return {
        "num_hidden_layers": int(config.get("num_hidden_layers", 12)),
        "hidden_size": int(config.get("hidden_size", 512)),
        "num_attention_heads": int(config.get("num_attention_heads", 8)),
        "intermediate_size": int(config.get("intermediate_size", 2048)), "hidden_act": act,
        "max_position_embeddings": int(config.get("max_position_embeddings", 77)), "eos_token_id": int(eos_token_id),
        "vocab_size": COMFY_CLIP_VOCAB, "layer_norm_eps": 1e-5,
    }


def convert_text_encoder_state_dict(state: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys are ComfyUI's CLIPTextModel keys (text_model.*); transformers 5 saves them
    without the text_model. prefix (embeddings.*, encoder.*, final_layer_norm.*), which gets it back here.
    position_ids is a buffer ComfyUI does not have; an SD1 text encoder has no text_projection (identity, as
    ComfyUI has for SD1)."""
    state = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in state.items()}
    out = {k: v for k, v in state.items() if k != "text_model.embeddings.position_ids"}
    out.setdefault("text_projection.weight", torch.eye(hidden))
    return out
