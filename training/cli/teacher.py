"""The teacher of a flash-distill run: a diffusers pipeline folder (or the tiny random one of the tests)
loaded as a flash_core Denoiser, its VAE and its prompt encoding."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from flash_core.backbones import get_backbone
from flash_core.files import FileWriteError, make_staging_folder, move_folder_into_place
from training.cli.config import TrainConfig
from training.cli.errors import ConfigError

if TYPE_CHECKING:  # heavy imports happen inside functions: `flash-distill --help` stays instant
    import torch

# --------------------------------------------------------------------------------------------------
# The tiny random model (tests / CI): a diffusers SD1.5-family pipeline folder built from a seed
# --------------------------------------------------------------------------------------------------

# A UNet whose LDM twin is {model_channels 32, channel_mult [1, 2], num_res_blocks [1, 1],
# transformer_depth [1, 0], transformer_depth_output [1, 1, 0, 0], transformer_depth_middle 1, context_dim 32}.
TINY_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64),
    "layers_per_block": 1, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32, "attention_head_dim": 4,
    "norm_num_groups": 8,
}
TINY_VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3, "block_out_channels": (8, 16, 16), "latent_channels": 4,
    "norm_num_groups": 4, "sample_size": 32, "layers_per_block": 1,
}
TINY_TEXT_ENCODER = {
    "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 77, "projection_dim": 32,
}


def tiny_tokenizer_folder() -> Path:
    """The real CLIP BPE files ComfyUI ships (no download possible): in $COMFYUI_PATH, else in the ComfyUI this pack
    sits in (custom_nodes/<pack>/), else in the development checkout's .comfyui/ (`make setup`)."""
    pack_root = Path(__file__).resolve().parents[2]
    roots = [Path(os.environ["COMFYUI_PATH"])] if os.environ.get("COMFYUI_PATH") else []
    roots += [pack_root.parent.parent, pack_root / ".comfyui"]
    for root in roots:
        folder = root / "comfy" / "sd1_tokenizer"
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return folder
    raise ConfigError(
        "model.random_tiny needs the CLIP tokenizer files ComfyUI ships (comfy/sd1_tokenizer), looked in "
        f"{', '.join(str(r) for r in roots)}: set COMFYUI_PATH to your ComfyUI, or run `make setup` in a clone")


def build_tiny_pipeline(folder: Path, seed: int) -> Path:
    """Write a tiny random SD1.5-family diffusers pipeline (UNet, VAE, CLIP text encoder, tokenizer) to `folder`.

    Deterministic for a seed; built once (an existing complete folder is reused). Written to a ".tmp-" folder
    next to it and moved in whole (flash_core.files.move_folder_into_place), so a crash never leaves a
    half-written model; when two processes build it at once, the first one's folder is kept.
    """
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER))
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_tokenizer_folder()))
    tokenizer.model_max_length = TINY_TEXT_ENCODER["max_position_embeddings"]
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing", clip_sample=False
    )
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    tmp = make_staging_folder(folder)  # unique (two processes may build it at once), mode from the umask
    try:
        pipeline.save_pretrained(str(tmp), safe_serialization=True)
        if not move_folder_into_place(tmp, folder) and not (folder / "model_index.json").is_file():
            raise FileWriteError(
                errno.EEXIST, f"could not write the tiny model to '{folder}': a folder without model_index.json "
                "is in the way; remove it, then run again"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def tiny_model_folder(config: TrainConfig) -> Path:
    digest = hashlib.sha256(json.dumps([TINY_UNET, TINY_VAE, TINY_TEXT_ENCODER, config.tiny_seed], sort_keys=True, default=str).encode())
    return config.cache_dir / f"tiny-sd15-{digest.hexdigest()[:12]}"


def model_identity(folder: Path) -> str:
    """What the latent cache depends on: the model folder and the size+mtime of its weight files."""
    parts = [str(folder.resolve())]
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.suffix in (".safetensors", ".bin", ".json"):
            stat = file.stat()
            parts.append(f"{file.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()



# --------------------------------------------------------------------------------------------------
# The teacher model: network (as a flash_core Denoiser), VAE and text encoders of a diffusers folder
# --------------------------------------------------------------------------------------------------

COND_FIELDS = ("encoder_hidden_states", "pooled", "time_ids", "attention_mask")
EXTRA_PREFIX = "extra."
T5_OFFSET_SD3 = 77  # SD3 prompt embeddings: 77 CLIP tokens, then the T5 tokens


def conditioning_to_tensors(cond) -> dict[str, torch.Tensor]:
    """flash_core Conditioning -> flat dict of batch-first tensors (what the caches store)."""
    tensors = {name: getattr(cond, name) for name in COND_FIELDS if getattr(cond, name) is not None}
    tensors.update({EXTRA_PREFIX + name: value for name, value in cond.extra.items()})
    return tensors


def tensors_to_conditioning(tensors: dict[str, torch.Tensor]):
    from flash_core.denoiser import Conditioning

    return Conditioning(
        **{name: tensors.get(name) for name in COND_FIELDS},
        extra={k[len(EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)},
    )


PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
# The noise schedule flash-distill distils SD1.5 / SDXL teachers on (flash_core.schedules.scaled_linear_alphas_cumprod).
UNET_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
UNET_PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_scheduler_config(folder: Path, backbone: str, where: str) -> dict | None:
    """The teacher folder's scheduler/scheduler_config.json, checked (None when the folder has none: epsilon).

    ConfigError, naming the file, the key and the value, for: a file that is not a JSON object; a `_class_name`
    diffusers does not have (the pipeline load would fail on it); and, for the UNet backbones, a prediction type
    the trainer does not model or a noise schedule other than the one it distils on (scaled_linear 0.00085-0.012
    over 1000 steps, no zero-terminal-SNR rescale): used, those would train the student on a wrong teacher.
    """
    from flash_core.file_formats import FileFormatError, read_json
    from flash_core.model_folders import _library_class

    path = Path(folder) / SCHEDULER_CONFIG
    if not path.is_file():
        return None
    fix = "re-save the pipeline with save_pretrained, or copy the scheduler folder of its base model"
    try:
        config = read_json(path, "the teacher's scheduler config", fix)
    except FileFormatError as error:
        raise ConfigError(f"{where}: {error}") from None

    def refuse(key: str, why: str):
        raise ConfigError(f"{where}: {path} key '{key}' is {config.get(key)!r}: {why}; {fix}")

    name = config.get("_class_name")
    if name is not None and not (isinstance(name, str) and name.endswith("Scheduler") and _library_class("diffusers", name)):
        refuse("_class_name", "not a scheduler class of the installed diffusers")
    if get_backbone(backbone).is_dit:
        return config
    if config.get("prediction_type", "epsilon") not in UNET_PREDICTION_TYPES:
        refuse("prediction_type", f"flash-distill trains {backbone} teachers that predict {' or '.join(UNET_PREDICTION_TYPES)}")
    for key, wanted in UNET_SCHEDULE.items():
        value = config.get(key)
        same = value == wanted if isinstance(wanted, str) else isinstance(value, (int, float)) and abs(value - wanted) <= 1e-9 * max(1, abs(wanted))
        if not same:
            refuse(key, f"flash-distill distils {backbone} teachers on the SD noise schedule ({key} {wanted})")
    if config.get("rescale_betas_zero_snr") or config.get("trained_betas") is not None:
        key = "rescale_betas_zero_snr" if config.get("rescale_betas_zero_snr") else "trained_betas"
        refuse(key, "flash-distill distils on the SD noise schedule, without a rescaled or custom one")
    return config


# Layer types peft can wrap with a LoRA (what a `lora_targets` name must match).
def _lora_layer_types():
    from torch import nn

    return (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Embedding)


def unknown_lora_targets(targets, backbone: str, folder: Path | None) -> tuple[list[str], list[str]]:
    """(targets that match no LoRA-wrappable layer of the network, a few names that do), peft's rule: a name
    matches a layer whose path is the name or ends with "." + name. The network is built from its config on
    the meta device (no weights load): `folder`'s, or the tiny random one's when folder is None."""
    import torch

    network_class = get_backbone(backbone).network()
    subfolder = get_backbone(backbone).subfolder
    try:
        with torch.device("meta"):
            if folder is None:
                network = network_class(**TINY_UNET)
            else:
                network = network_class.from_config(network_class.load_config(str(folder), subfolder=subfolder))
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(f"model folder {folder}: cannot read the {backbone} {subfolder} config ({error}); "
                          "re-save the pipeline with save_pretrained") from None
    paths = [name for name, module in network.named_modules() if isinstance(module, _lora_layer_types())]
    unknown = [t for t in targets if not any(p == t or p.endswith("." + t) for p in paths)]
    if not targets:
        unknown = ["(an empty list)"]

    def short(path: str) -> str:  # "…attn1.to_out.0" -> "to_out.0", "…ff.net.0.proj" -> "proj"
        parts = path.split(".")
        return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]

    known = sorted({short(p) for p in paths})
    return unknown, known[:24]


def refuse_pickle_weights(folder: Path) -> None:
    """flash-distill never unpickles: a component folder whose weights exist only as pickle files (.bin ...) stops
    the run before any loading, naming the file and the fix (as FlashDiffusersLoader does)."""
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        pickled = sorted(f for f in component.iterdir() if f.suffix in PICKLE_WEIGHT_SUFFIXES)
        if pickled and not any(component.glob("*.safetensors")):
            raise ConfigError(f"model folder {folder}: {pickled[0]} is a pickle file, which flash-distill never loads "
                              "(it can run code). Convert the folder to safetensors, e.g. "
                              "pipe.save_pretrained(folder, safe_serialization=True) in a trusted environment.")


class TeacherModel:
    """The diffusers pieces flash-distill needs: the network (wrapped as a Denoiser), VAE, prompt encoding.

    Text encoders are only loaded when something has to be encoded (a cache miss) and freed afterwards.
    """

    def __init__(self, folder: Path, backbone: str, resolution: int, device, weight_dtype):
        import torch
        from diffusers import AutoencoderKL

        from flash_core.backends.diffusers import make_diffusers_denoiser

        self.folder, self.backbone, self.resolution = folder, backbone, resolution
        self.device, self.weight_dtype = device, weight_dtype
        subfolder = get_backbone(backbone).subfolder
        network_class = get_backbone(backbone).network()
        refuse_pickle_weights(folder)
        try:  # use_safetensors: diffusers never falls back to a pickle (.bin) file
            self.network = network_class.from_pretrained(str(folder), subfolder=subfolder, torch_dtype=weight_dtype,
                                                         use_safetensors=True)
            self.vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", torch_dtype=torch.float32,
                                                     use_safetensors=True)
        except (OSError, ValueError) as error:
            raise ConfigError(f"model folder {folder}: cannot load the {backbone} {subfolder} / vae ({error})") from None
        self.network.to(device)
        self.vae.to(device).requires_grad_(False).eval()
        kwargs = {}
        if not get_backbone(backbone).is_dit:  # a UNet folder's scheduler may declare v_prediction
            kwargs["prediction_type"] = self._scheduler_prediction_type()
        self.denoiser = make_diffusers_denoiser(backbone, self.network, **kwargs)
        self._pipeline = None
        self.sample_latent_shape: tuple[int, ...] | None = None  # [C, h, w] of the dataset latents

    def _scheduler_prediction_type(self) -> str:
        config = check_scheduler_config(self.folder, self.backbone, f"model folder {self.folder}")
        return (config or {}).get("prediction_type", "epsilon")

    # ---- pixels <-> latents ----
    def encode_images(self, pixels):
        """[B, 3, R, R] in [-1, 1] -> model latents ((mean - shift) * scaling, the diffusers convention)."""
        import torch

        config = self.vae.config
        with torch.no_grad():
            mean = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist.mode()  # deterministic: the posterior mean
        shift = getattr(config, "shift_factor", None) or 0.0
        return (mean - shift) * config.scaling_factor  # z = (E(x) - shift) * scaling_factor

    def decode_latents(self, latents):
        import torch

        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        with torch.no_grad():
            return self.vae.decode(latents.to(self.device, torch.float32) / config.scaling_factor + shift).sample  # x = D(z / s + shift)

    # ---- prompts ----
    def _load_pipeline(self):
        if self._pipeline is None:
            from diffusers import DiffusionPipeline

            components = {get_backbone(self.backbone).subfolder: self.network, "vae": self.vae}
            if self.backbone == "sd15":
                components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            self._pipeline = DiffusionPipeline.from_pretrained(str(self.folder), torch_dtype=self.weight_dtype,
                                                               use_safetensors=True, **components)
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
                module = getattr(self._pipeline, name, None)
                if module is not None:
                    module.to(self.device).requires_grad_(False).eval()
        return self._pipeline

    def release_text_encoders(self) -> None:
        self._pipeline = None

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Captions -> flat conditioning tensors for this backbone (diffusers' own encode_prompt)."""
        import torch

        pipe = self._load_pipeline()
        device, size, res = self.device, len(prompts), self.resolution
        with torch.no_grad():
            if self.backbone == "sd15":
                embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
                return {"encoder_hidden_states": embeds}
            if self.backbone == "sdxl":
                embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
                time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32).expand(size, -1)  # size, crop, target
                return {"encoder_hidden_states": embeds, "pooled": pooled, "time_ids": time_ids.clone()}
            if self.backbone == "pixart":
                embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device, clean_caption=False)
                tensors = {"encoder_hidden_states": embeds, "attention_mask": mask}
                if getattr(self.network.config, "sample_size", 0) == 128:  # PixArt-alpha 1024: size conditioning
                    tensors["extra.resolution"] = torch.tensor([[res, res]], dtype=torch.float32).expand(size, -1).clone()
                    tensors["extra.aspect_ratio"] = torch.ones(size, 1)
                return tensors
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=False)
            return {"encoder_hidden_states": embeds, "pooled": pooled}

    def unconditional(self, recipe_uncond: str, encode: Callable[[list[str]], dict]) -> dict[str, torch.Tensor]:
        """The teacher's unconditional input per the recipe: empty prompt, zeros (built per batch) or the
        SD3 negative prompt without T5 (T5 tokens zeroed)."""
        if recipe_uncond == "zeros":
            return {}
        tensors = dict(encode([""]))
        if recipe_uncond == "negative_prompt":
            embeds = tensors["encoder_hidden_states"].clone()
            embeds[:, T5_OFFSET_SD3:] = 0  # "without T5": only the CLIP part of the negative prompt
            tensors["encoder_hidden_states"] = embeds
        return tensors


def weight_dtype_for(mixed_precision: str):
    import torch

    return torch.bfloat16 if mixed_precision == "bf16" else torch.float32
