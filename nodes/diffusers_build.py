"""load_pipeline, the body of FlashDiffusersLoader: MODEL, CLIP and VAE from a diffusers-format SD-family
pipeline folder of any size.

ComfyUI's own loaders recognise a model by the shapes of its weights and only know the full-size
architectures, so a small or unusually shaped Stable Diffusion pipeline (like the digits teacher of this
repository: 32/64-channel UNet, 2-layer CLIP, 2-level VAE) cannot be loaded by them. load_pipeline reads
the folder's own configs instead and builds the objects `comfy.sd.load_checkpoint_guess_config` builds for an
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

Finding and reading the folder is diffusers_folder.py, translating its configs and weight names is
diffusers_convert.py; this module builds ComfyUI's objects from them.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from pathlib import Path
from typing import ClassVar

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
import torch

from .diffusers_convert import (
    SD_VAE_CHANNELS,
    convert_text_encoder_state_dict,
    convert_unet_state_dict,
    convert_vae_state_dict,
    sampling_from_scheduler,
    text_model_config,
    unet_config_from_diffusers,
    vae_ddconfig,
)
from .diffusers_folder import NODE, _fail, check_pipeline_kind, load_weights, read_json

LOG = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def tokenizer_folder(folder: Path) -> Path:
    """The pipeline's tokenizer/ folder, or ComfyUI's copy of the SD1 CLIP tokenizer when it has none. A CLIP BPE
    tokenizer is vocab.json + merges.txt (transformers 4 saves them) or tokenizer.json (transformers 5 saves only
    that)."""
    own = folder / "tokenizer"
    if own.is_dir():
        missing = [f for f in ("vocab.json", "merges.txt") if not (own / f).is_file()]
        if missing and not (own / "tokenizer.json").is_file():
            raise _fail(f"'{folder}' tokenizer/ lacks {', '.join(missing)} and tokenizer.json (a CLIP BPE tokenizer); "
                        "re-save it with CLIPTokenizer.save_pretrained, or remove the folder to use SD1's tokenizer.")
        return own
    LOG.info("%s: '%s' has no tokenizer/, using ComfyUI's SD1 CLIP tokenizer.", NODE, folder)
    return Path(comfy.sd1_clip.__file__).resolve().parent / "sd1_tokenizer"


def tokenizer_class(path: Path):
    """transformers' class that reads the CLIP tokenizer files in `path`: CLIPTokenizer (what ComfyUI uses) for
    vocab.json + merges.txt, CLIPTokenizerFast for a tokenizer.json alone (under transformers 5 the same class)."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return CLIPTokenizer
    return CLIPTokenizerFast


class PipelineTokenizer(comfy.sd1_clip.SD1Tokenizer):
    """ComfyUI's SD1 tokenizer wrapper ('l': clip_l keys) over the pipeline's own CLIP tokenizer files."""

    def __init__(self, embedding_directory=None, tokenizer_data=None, *, tokenizer_path: str, max_length: int,
                 embedding_size: int, pad_token: int):
        tokenizer = functools.partial(comfy.sd1_clip.SDTokenizer, tokenizer_path=tokenizer_path, max_length=max_length,
                                      embedding_size=embedding_size, pad_token=pad_token,
                                      tokenizer_class=tokenizer_class(Path(tokenizer_path)))
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data or {}, clip_name="l",
                         tokenizer=tokenizer)


# --------------------------------------------------------------------------------------------------
# Weights against the built model
# --------------------------------------------------------------------------------------------------


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
# Loading
# --------------------------------------------------------------------------------------------------


def load_pipeline(folder: str | os.PathLike, embedding_directory=None, model_options: dict | None = None,
                  te_model_options: dict | None = None, model_only: bool = False, disable_dynamic: bool = False):
    """(MODEL, CLIP, VAE) of a diffusers SD1.x/SD2.x-family pipeline folder: a ModelPatcher, a comfy.sd.CLIP and
    a comfy.sd.VAE. model_options / te_model_options are ComfyUI's (dtype, custom_operations ...), as for
    comfy.sd.load_checkpoint_guess_config. model_only: (MODEL, None, None), the UNet's weights only.
    disable_dynamic: a plain ModelPatcher even where ComfyUI's core patcher is the dynamic-VRAM one (0.18+)."""
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
    hf_tokenizer = tokenizer_class(tokenizer_path).from_pretrained(str(tokenizer_path))
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
