"""FlashDiffusersLoader: MODEL, CLIP and VAE from a diffusers-format SD-family pipeline folder of any size.

ComfyUI's own loaders recognise a model by the shapes of its weights and only know the full-size
architectures, so a small or unusually shaped Stable Diffusion pipeline (like the digits teacher of this
repository: 32/64-channel UNet, 2-layer CLIP, 2-level VAE) cannot be loaded by them. This node reads the
folder's own configs instead and builds the objects `comfy.sd.load_checkpoint_guess_config` builds for an
SD1.x/SD2.x checkpoint:

* MODEL: a ModelPatcher over a `comfy.model_base.BaseModel` built from a ComfyUI unet_config derived from
  unet/config.json. The model config is a subclass of ComfyUI's SD15 (SD20 for v-prediction or
  linear-projection UNets) whose latent format scales by the VAE's own scaling_factor and whose noise
  schedule comes from scheduler/scheduler_config.json. The weights get ComfyUI's standard LDM names
  (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`, ...), so LoRAs, model patches and every node that
  takes a MODEL work as on a checkpoint.
* CLIP: a `comfy.sd.CLIP` around `comfy.sd1_clip.SDClipModel` configured by text_encoder/config.json, with
  the folder's tokenizer (or ComfyUI's SD1 tokenizer) and the last layer after the final layer norm, which
  is what StableDiffusionPipeline feeds the UNet.
* VAE: a `comfy.sd.VAE` with a ddconfig derived from vae/config.json (any number of levels).

Only .safetensors weights are read. Every weight must map onto the built model and every model weight must
be present; anything else stops the node with a ValueError naming the folder, the file or key, and the fix.
SDXL-style pipelines (two text encoders, text_time embeddings) and transformer (DiT / MMDiT) pipelines are
refused with a pointer to ComfyUI's own loaders.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import comfy.latent_formats
import comfy.ldm.models.autoencoder
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from flash_core import file_formats
from flash_core.file_formats import PICKLE_SUFFIXES

LOG = logging.getLogger(__name__)

NODE = "Flash Diffusers Pipeline Loader"
FOLDER_NAME = "diffusers"  # ComfyUI's models/diffusers folder(s), where the stock DiffusersLoader looks too
CATEGORY = "Flash Diffusion"

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


def check_state_dict(expected: dict[str, torch.Size], state: dict[str, torch.Tensor], folder: Path, component: str,
                     source_name=lambda key: key) -> None:
    """Every key of `state` is a weight of the built model with its shape, and every model weight is present."""
    built = f"the model built from {component}/config.json"
    fix = f"re-save the {component} with save_pretrained"
    unexpected = sorted(k for k in state if k not in expected)
    if unexpected:
        raise _fail(f"'{folder}' {component} weights have {len(unexpected)} keys that {built} does not have "
                    f"(e.g. {', '.join(map(source_name, unexpected[:3]))}). The weights and config do not match: "
                    f"{fix}.")
    missing = sorted(k for k in expected if k not in state)
    if missing:
        raise _fail(f"'{folder}' {component} weights lack {len(missing)} keys that {built} needs (e.g. "
                    f"{', '.join(map(source_name, missing[:3]))}). The file is incomplete or from another model: "
                    f"{fix}.")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key]):
            raise _fail(f"'{folder}' {component} weight {source_name(key)} has shape {tuple(tensor.shape)}, but "
                        f"{built} needs {tuple(expected[key])}. The weights and config do not match: {fix}.")


def _group_norm_operations(base, groups: int):
    """ComfyUI operations whose GroupNorm layers have `groups` groups (ComfyUI's UNet always asks for 32)."""

    class GroupNormOps(base):
        class GroupNorm(base.GroupNorm):
            def __init__(self, num_groups, num_channels, *args, **kwargs):  # 32, by position or by name
                super().__init__(groups, num_channels, *args, **kwargs)

    return GroupNormOps


# --------------------------------------------------------------------------------------------------
# Model config: SD15 / SD20 with the pipeline's latent scale, noise schedule and prediction type
# --------------------------------------------------------------------------------------------------


class PipelineLatentFormat(comfy.latent_formats.SD15):
    """SD latents scaled by the pipeline VAE's own scaling_factor (not SD's 0.18215)."""

    def __init__(self, scale_factor: float, latent_channels: int = 4, sd_vae: bool = True):
        super().__init__(scale_factor=float(scale_factor))
        self.latent_channels = latent_channels
        if not sd_vae:  # SD's latent->RGB preview factors and TAESD describe the full-size SD VAE only
            self.latent_rgb_factors = None
            self.latent_rgb_factors_bias = None
            self.taesd_decoder_name = None


class _FromPipeline:
    """Mixin over a ComfyUI model config: the unet_config exactly as given (no family head defaults), and the
    pipeline's latent format, noise schedule and prediction type."""

    unet_extra_config: ClassVar[dict] = {}

    def __init__(self, unet_config: dict, latent_format: comfy.latent_formats.LatentFormat, sampling_settings: dict,
                 model_type: comfy.model_base.ModelType):
        super().__init__(unet_config)
        self.latent_format = latent_format
        self.sampling_settings = {**self.sampling_settings, **sampling_settings}
        self.pipeline_model_type = model_type

    def model_type(self, state_dict, prefix=""):
        return self.pipeline_model_type


class SD15Pipeline(_FromPipeline, comfy.supported_models.SD15):
    """An SD1.x-family UNet of any size from a diffusers pipeline folder."""


class SD20Pipeline(_FromPipeline, comfy.supported_models.SD20):
    """An SD2.x-family UNet (v-prediction or linear transformer projections) from a diffusers pipeline folder."""


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
# Text encoder and tokenizer
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


def tokenizer_folder(folder: Path) -> Path:
    """The pipeline's tokenizer/ folder, or ComfyUI's copy of the SD1 CLIP tokenizer when it has none."""
    own = folder / "tokenizer"
    if own.is_dir():
        missing = [f for f in ("vocab.json", "merges.txt") if not (own / f).is_file()]
        if missing:
            raise _fail(f"'{folder}' tokenizer/ lacks {', '.join(missing)} (a CLIP BPE tokenizer); re-save it with "
                        "CLIPTokenizer.save_pretrained, or remove the folder to use SD1's tokenizer.")
        return own
    LOG.info("%s: '%s' has no tokenizer/, using ComfyUI's SD1 CLIP tokenizer.", NODE, folder)
    return Path(comfy.sd1_clip.__file__).resolve().parent / "sd1_tokenizer"


class PipelineTokenizer(comfy.sd1_clip.SD1Tokenizer):
    """ComfyUI's SD1 tokenizer wrapper ('l': clip_l keys) over the pipeline's own CLIP tokenizer files."""

    def __init__(self, embedding_directory=None, tokenizer_data=None, *, tokenizer_path: str, max_length: int,
                 embedding_size: int, pad_token: int):
        tokenizer = functools.partial(comfy.sd1_clip.SDTokenizer, tokenizer_path=tokenizer_path, max_length=max_length,
                                      embedding_size=embedding_size, pad_token=pad_token)
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data or {}, clip_name="l",
                         tokenizer=tokenizer)


def convert_text_encoder_state_dict(state: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys are ComfyUI's CLIPTextModel keys (text_model.*). position_ids is a buffer
    ComfyUI does not have; an SD1 text encoder has no text_projection (identity, as ComfyUI has for SD1)."""
    out = {k: v for k, v in state.items() if k != "text_model.embeddings.position_ids"}
    out.setdefault("text_projection.weight", torch.eye(hidden))
    return out


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_pipeline(folder: str | os.PathLike, embedding_directory=None, model_options: dict | None = None,
                  te_model_options: dict | None = None, model_only: bool = False, disable_dynamic: bool = False):
    """(MODEL, CLIP, VAE) of a diffusers SD1.x/SD2.x-family pipeline folder: a ModelPatcher, a comfy.sd.CLIP and
    a comfy.sd.VAE. model_options / te_model_options are ComfyUI's (dtype, custom_operations ...), as for
    comfy.sd.load_checkpoint_guess_config. model_only: (MODEL, None, None), the UNet's weights only.
    disable_dynamic: a plain ModelPatcher even where ComfyUI's core patcher is the dynamic-VRAM one (0.18+)."""
    from transformers import CLIPTokenizer

    model_options = dict(model_options or {})
    te_model_options = dict(te_model_options or {})
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise _fail(f"'{folder}' is not a diffusers pipeline folder: it has no model_index.json. Save the pipeline "
                    "with StableDiffusionPipeline.save_pretrained(folder, safe_serialization=True) into ComfyUI's "
                    "models/diffusers folder.")
    check_pipeline_kind(folder, read_json(folder / "model_index.json", folder, "the pipeline index"))

    # ---- every config is checked before any weights are read
    unet_cfg = read_json(folder / "unet" / "config.json", folder, "the UNet config")
    vae_cfg = read_json(folder / "vae" / "config.json", folder, "the VAE config")
    te_cfg = read_json(folder / "text_encoder" / "config.json", folder, "the text encoder config")
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    if scheduler_path.is_file():
        scheduler_cfg = read_json(scheduler_path, folder, "the scheduler config")
    else:
        LOG.warning("%s: '%s' has no scheduler config; using SD's scaled_linear 0.00085..0.012 epsilon schedule.",
                    NODE, folder)
        scheduler_cfg = {}
    unet_config = unet_config_from_diffusers(unet_cfg, folder)
    ddconfig = vae_ddconfig(vae_cfg, folder)
    model_type, sampling_settings = sampling_from_scheduler(scheduler_cfg, folder)
    tokenizer_path = tokenizer_folder(folder)
    hf_tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_path))
    clip_config = text_model_config(te_cfg, folder, hf_tokenizer.eos_token_id)
    if clip_config["hidden_size"] != unet_config["context_dim"]:
        raise _fail(f"'{folder}' the text encoder's hidden_size ({clip_config['hidden_size']}) differs from the "
                    f"UNet's cross_attention_dim ({unet_config['context_dim']}): text_encoder/ and unet/ come from "
                    "different models. Re-save the pipeline from one model.")
    latent_channels = ddconfig["z_channels"]
    if unet_config["out_channels"] != latent_channels:
        raise _fail(f"'{folder}' the UNet has {unet_config['out_channels']} output channels but the VAE "
                    f"{latent_channels} latent channels: unet/ and vae/ come from different models. Re-save the "
                    "pipeline from one model.")
    if "scaling_factor" not in vae_cfg:
        LOG.warning("%s: '%s' vae/config.json has no scaling_factor; using SD's 0.18215.", NODE, folder)
    scaling_factor = float(vae_cfg.get("scaling_factor", 0.18215))
    sd_vae = [ddconfig["ch"] * m for m in ddconfig["ch_mult"]] == SD_VAE_CHANNELS and latent_channels == 4
    latent_format = PipelineLatentFormat(scaling_factor, latent_channels, sd_vae=sd_vae)
    sd2 = model_type == comfy.model_base.ModelType.V_PREDICTION or unet_config["use_linear_in_transformer"]
    model_config = (SD20Pipeline if sd2 else SD15Pipeline)(unet_config, latent_format, sampling_settings, model_type)

    # ---- weights
    unet_sd = convert_unet_state_dict(load_weights(folder, "unet", "diffusion_pytorch_model"), unet_config, folder)
    model = _build_model(model_config, unet_sd, unet_cfg.get("norm_num_groups", 32), model_options, folder,
                         disable_dynamic)
    # What ComfyUI's own loaders register (0.30+): how to load this MODEL again, for nodes that rebuild a model
    # (clone(force_deepcopy=True): core Train LoRA, TorchCompileModel) or need a non-dynamic twin
    # (clone(disable_dynamic=True)). The factory is called with disable_dynamic=True.
    model.cached_patcher_init = (reload_pipeline_model, (str(folder), model_options))
    if model_only:
        return model, None, None
    vae_sd, vae_names = convert_vae_state_dict(load_weights(folder, "vae", "diffusion_pytorch_model"), ddconfig,
                                               folder)
    vae = _build_vae(vae_sd, vae_names, ddconfig, vae_cfg.get("norm_num_groups", 32), folder)
    clip = _build_clip(load_weights(folder, "text_encoder", "model"), clip_config, tokenizer_path, hf_tokenizer,
                       embedding_directory, te_model_options, folder)
    LOG.info("%s: loaded '%s' as %s (%s, latent scale %.5f, %d-channel UNet, VAE x%d).", NODE, folder,
             type(model_config).__name__, model_type.name, scaling_factor, unet_config["model_channels"],
             2 ** (len(ddconfig["ch_mult"]) - 1))
    return model, clip, vae


def reload_pipeline_model(folder: str, model_options: dict | None = None, disable_dynamic: bool = False):
    """The MODEL of a pipeline folder alone, loaded again (ModelPatcher.cached_patcher_init's factory)."""
    return load_pipeline(folder, model_options=model_options, model_only=True, disable_dynamic=disable_dynamic)[0]


def _pick_operations(unet_dtype, manual_cast_dtype, load_device, model_config):
    """The comfy.ops classes BaseModel would pick (its call differs across ComfyUI versions: `scaled_fp8` went
    away in 0.4.0, `load_device` came)."""
    kwargs = {"fp8_optimizations": model_config.optimizations.get("fp8", False), "model_config": model_config}
    accepted = inspect.signature(comfy.ops.pick_operations).parameters
    if "scaled_fp8" in accepted:
        kwargs["scaled_fp8"] = getattr(model_config, "scaled_fp8", None)
    if "load_device" in accepted:
        kwargs["load_device"] = load_device
    return comfy.ops.pick_operations(unet_dtype, manual_cast_dtype, **kwargs)


def _build_model(model_config, unet_sd: dict, norm_groups: int, model_options: dict, folder: Path,
                 disable_dynamic: bool = False):
    """BaseModel + ModelPatcher, with the dtype, device and patcher choices of comfy.sd.load_checkpoint_guess_config
    (ComfyUI's core patcher: the dynamic-VRAM one where ComfyUI enabled it, unless disable_dynamic)."""
    mm = comfy.model_management
    parameters = comfy.utils.calculate_parameters(unet_sd)
    load_device = mm.get_torch_device()
    unet_dtype = model_options.get("dtype", model_options.get("weight_dtype", None))
    if unet_dtype is None:
        unet_dtype = mm.unet_dtype(model_params=parameters,
                                   supported_dtypes=list(model_config.supported_inference_dtypes),
                                   weight_dtype=comfy.utils.weight_dtype(unet_sd))
    manual_cast_dtype = mm.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast_dtype)
    operations = model_options.get("custom_operations", None)
    if norm_groups != 32:
        if operations is None:  # what BaseModel would pick, with our GroupNorm on top
            operations = _pick_operations(unet_dtype, manual_cast_dtype, load_device, model_config)
        operations = _group_norm_operations(operations, norm_groups)
    model_config.custom_operations = operations

    initial_device = mm.unet_inital_load_device(parameters, unet_dtype)
    model = model_config.get_model({}, "", device=initial_device)
    expected = {k: v.shape for k, v in model.diffusion_model.state_dict().items()}
    to_diffusers = {ldm: name for name, ldm in comfy.utils.unet_to_diffusers(model_config.unet_config).items()}
    check_state_dict(expected, unet_sd, folder, "unet", lambda k: f"{to_diffusers.get(k, k)} (ComfyUI {k})")
    patcher_class = comfy.model_patcher.ModelPatcher
    if not disable_dynamic:  # main.py makes CoreModelPatcher ModelPatcherDynamic under dynamic VRAM (0.18+)
        patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", patcher_class)
    patcher = patcher_class(model, load_device=load_device, offload_device=mm.unet_offload_device())
    dynamic = getattr(patcher, "is_dynamic", lambda: False)()
    model.diffusion_model.load_state_dict(unet_sd, strict=True, assign=dynamic)  # as load_model_weights does
    if initial_device != torch.device("cpu") and not dynamic:
        mm.load_models_gpu([patcher], force_full_load=True)
    return patcher


def _build_vae(vae_sd: dict, diffusers_names: dict, ddconfig: dict, norm_groups: int, folder: Path):
    params = {"embed_dim": ddconfig["z_channels"], "ddconfig": ddconfig}
    with torch.device("meta"):  # the key names and shapes ComfyUI's AutoencoderKL has, without memory
        reference = comfy.ldm.models.autoencoder.AutoencoderKL(**params)
    expected = {k: v.shape for k, v in reference.state_dict().items()}
    check_state_dict(expected, vae_sd, folder, "vae", lambda k: diffusers_names.get(k, k))
    vae = comfy.sd.VAE(sd=vae_sd, config={"params": params})
    for module in vae.first_stage_model.modules():
        if isinstance(module, torch.nn.GroupNorm):  # ComfyUI builds 32 groups; the VAE was trained with its own
            module.num_groups = norm_groups
    vae.downscale_ratio = vae.upscale_ratio = 2 ** (len(ddconfig["ch_mult"]) - 1)
    vae.latent_channels = ddconfig["z_channels"]
    vae.output_channels = ddconfig["out_ch"]
    return vae


def _build_clip(te_sd: dict, clip_config: dict, tokenizer_path: Path, hf_tokenizer, embedding_directory,
                te_model_options: dict, folder: Path):
    hidden, length = clip_config["hidden_size"], clip_config["max_position_embeddings"]
    pad = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else hf_tokenizer.eos_token_id
    special = {"start": int(hf_tokenizer.bos_token_id), "end": int(hf_tokenizer.eos_token_id), "pad": int(pad)}
    target = comfy.supported_models_base.ClipTarget(
        functools.partial(PipelineTokenizer, tokenizer_path=str(tokenizer_path), max_length=length,
                          embedding_size=hidden, pad_token=special["pad"]),
        comfy.sd1_clip.SD1ClipModel,
    )
    target.params = {  # SD1ClipModel(clip_name="l") -> SDClipModel: ComfyUI's clip_l.transformer.text_model.* keys
        "clip_name": "l", "clip_model": comfy.sd1_clip.SDClipModel, "textmodel_json_config": dict(clip_config),
        "layer": "last", "return_projected_pooled": False, "special_tokens": special, "max_length": length,
    }
    te_sd = convert_text_encoder_state_dict(te_sd, hidden)
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory,
                         parameters=comfy.utils.calculate_parameters(te_sd), model_options=te_model_options)
    expected = {k: v.shape for k, v in clip.cond_stage_model.clip_l.transformer.state_dict().items()}
    check_state_dict(expected, te_sd, folder, "text_encoder")
    missing, unexpected = clip.load_sd(te_sd)
    if missing or unexpected:  # unreachable after check_state_dict; a guard against ComfyUI changes
        raise _fail(f"'{folder}' text encoder weights did not load (missing {missing[:3]}, unexpected "
                    f"{unexpected[:3]}); re-save the text encoder with save_pretrained.")
    return clip


# --------------------------------------------------------------------------------------------------
# Node
# --------------------------------------------------------------------------------------------------


class FlashDiffusersLoader(io.ComfyNode):
    """MODEL, CLIP and VAE from a diffusers SD-family pipeline folder of any size."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashDiffusersLoader",
            display_name=NODE,
            category=CATEGORY,
            description=(
                "Loads a diffusers-format Stable Diffusion pipeline folder (the layout of "
                "StableDiffusionPipeline.save_pretrained, .safetensors weights) of any size from the models/diffusers "
                "folders, building the UNet, CLIP text encoder and VAE from the folder's own configs. Small or "
                "custom-sized SD1.x/SD2.x models that Load Checkpoint does not recognise load here; SDXL and "
                "transformer pipelines are refused with a pointer to ComfyUI's own loaders."
            ),
            inputs=[
                io.Combo.Input("pipeline", options=list_pipelines(),
                               tooltip="A folder with a model_index.json under models/diffusers."),
            ],
            outputs=[
                io.Model.Output(tooltip="The UNet, with SD's standard weight names (LoRAs and model patches apply)."),
                io.Clip.Output(tooltip="The CLIP text encoder with the pipeline's tokenizer."),
                io.Vae.Output(tooltip="The VAE; it scales images by 2^(levels - 1) (8 for SD's VAE)."),
            ],
        )

    @classmethod
    def execute(cls, pipeline: str) -> io.NodeOutput:
        folder = resolve_pipeline(pipeline)
        model, clip, vae = load_pipeline(folder, embedding_directory=folder_paths.get_folder_paths("embeddings"))
        return io.NodeOutput(model, clip, vae)


NODES = [FlashDiffusersLoader]
