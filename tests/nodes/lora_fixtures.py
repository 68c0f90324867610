"""Builders for LoRA test files: real module names from diffusers / transformers models on the meta device,
tiny ComfyUI models with the same naming, and writers for every LoRA key format Flash LoRAs ship in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the Flash recipe's LoRA targets (SD1.5 / SDXL)

SD15_DIFFUSERS = dict(
    sample_size=64, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
    layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL_DIFFUSERS = dict(
    sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
    layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# A tiny SD1.5-family UNet: SD1.5's naming and block layout, 32 channels, one res block per level.
TINY_SD15_DIFFUSERS = dict(
    sample_size=8, cross_attention_dim=768, block_out_channels=(32, 64), attention_head_dim=8, layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32,
)
SD15_COMFY = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL_COMFY = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
TINY_SD15_COMFY = {
    **SD15_COMFY, "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1], "num_heads": 8, "dtype": torch.float32,
}
# SD3-medium: ComfyUI's MMDiT config (as model_detection reads it from the checkpoint) and diffusers' config.
SD3_COMFY = {
    "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 24, "input_size": None, "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
    "num_patches": 36864, "pos_embed_max_size": 192, "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
}
SD3_DIFFUSERS = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
}
TINY_CLIP_CONFIG = {
    "hidden_act": "quick_gelu", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
    "num_hidden_layers": 2, "max_position_embeddings": 77, "vocab_size": 49408, "layer_norm_eps": 1e-5,
    "projection_dim": 32, "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1,
}


@dataclass
class Lora:
    """One reference LoRA module: dotted path in its component, A (down), B (up), alpha."""

    component: str  # "unet" | "text_encoder" | "text_encoder_2"
    path: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, weight_shape) -> torch.Tensor:
        """W' - W at strength 1: (alpha / rank) B @ A, reshaped like the weight."""
        return (self.alpha / self.rank) * (self.up.flatten(1) @ self.down.flatten(1)).reshape(weight_shape)


def diffusers_unet(config: dict):
    """A diffusers UNet2DConditionModel on the meta device (names and shapes, no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def target_layers(module: torch.nn.Module, targets=ATTENTION_TARGETS) -> dict[str, torch.nn.Module]:
    """Module path -> layer for every layer whose name ends with one of `targets`."""
    return {
        name: layer for name, layer in module.named_modules()
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and any(name.endswith("." + t) for t in targets)
    }


def make_loras(layers: dict[str, torch.nn.Module], rank: int, alpha: float, component: str = "unet",
               seed: int = 0) -> list[Lora]:
    """Random A/B for each layer (shapes from the layer: conv layers get 1x1 kernels like kohya LoCon)."""
    generator = torch.Generator().manual_seed(seed)
    loras = []
    for path, layer in sorted(layers.items()):
        if isinstance(layer, torch.nn.Conv2d):
            down_shape = (rank, layer.in_channels, *layer.kernel_size)
            up_shape = (layer.out_channels, rank, 1, 1)
        else:
            down_shape = (rank, layer.in_features)
            up_shape = (layer.out_features, rank)
        down = torch.randn(down_shape, generator=generator) * 0.1
        up = torch.randn(up_shape, generator=generator) * 0.1
        loras.append(Lora(component, path, down, up, alpha))
    return loras


def _flat(path: str) -> str:
    return path.replace(".", "_")


KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
DIFFUSERS_PREFIX = {"unet": "unet.", "text_encoder": "text_encoder.", "text_encoder_2": "text_encoder_2."}


def kohya_state_dict(loras: list[Lora], rename=None, with_alpha=True) -> dict[str, torch.Tensor]:
    """kohya keys; `rename` maps a dotted path to the path to flatten (e.g. diffusers -> LDM)."""
    out = {}
    for lora in loras:
        path = rename(lora.path) if rename else lora.path
        name = KOHYA_PREFIX[lora.component] + _flat(path)
        out[f"{name}.lora_down.weight"] = lora.down
        out[f"{name}.lora_up.weight"] = lora.up
        if with_alpha:
            out[f"{name}.alpha"] = torch.tensor(float(lora.alpha))
    return out


def comfy_native_state_dict(loras: list[Lora], to_ldm) -> dict[str, torch.Tensor]:
    """ComfyUI generic keys: diffusion_model.<ldm path>.lora_down.weight / lora_up.weight / alpha."""
    out = {}
    for lora in loras:
        name = "diffusion_model." + to_ldm(lora.path)
        out[f"{name}.lora_down.weight"] = lora.down
        out[f"{name}.lora_up.weight"] = lora.up
        out[f"{name}.alpha"] = torch.tensor(float(lora.alpha))
    return out


def diffusers_state_dict(loras: list[Lora], style: str = "lora_A") -> dict[str, torch.Tensor]:
    """Modern diffusers keys (flash-sd / flash-sdxl): unet.<path>.lora_A.weight, or .lora.down.weight."""
    down_suffix, up_suffix = {"lora_A": (".lora_A.weight", ".lora_B.weight"),
                              "lora.down": (".lora.down.weight", ".lora.up.weight")}[style]
    out = {}
    for lora in loras:
        name = DIFFUSERS_PREFIX[lora.component] + lora.path
        out[name + down_suffix] = lora.down
        out[name + up_suffix] = lora.up
    return out


def processor_state_dict(loras: list[Lora]) -> dict[str, torch.Tensor]:
    """Old diffusers attention-processor keys: unet.<attn>.processor.to_q_lora.down.weight."""
    out = {}
    for lora in loras:
        attn, _, target = lora.path.rpartition(".")
        if target == "0":  # to_out.0
            attn, _, target = attn.rpartition(".")
        name = f"unet.{attn}.processor.{target}_lora"
        out[f"{name}.down.weight"] = lora.down
        out[f"{name}.up.weight"] = lora.up
    return out


def peft_state_dict(loras: list[Lora]) -> dict[str, torch.Tensor]:
    """PEFT keys (flash-pixart / flash-sd3): base_model.model.<path>.lora_A.weight / lora_B.weight."""
    out = {}
    for lora in loras:
        out[f"base_model.model.{lora.path}.lora_A.weight"] = lora.down
        out[f"base_model.model.{lora.path}.lora_B.weight"] = lora.up
    return out


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None,
          adapter_config: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    if adapter_config is not None:
        (path.parent / "adapter_config.json").write_text(json.dumps(adapter_config))
    return path


# ---------------------------------------------------------------------------------------------------------
# ComfyUI models (need tests/conftest.import_comfy() first)
# ---------------------------------------------------------------------------------------------------------


def comfy_unet(unet_config: dict, meta: bool = False, seed: int = 0):
    """A ComfyUI SD1.5/SDXL BaseModel from an explicit unet config; random weights unless on meta."""
    import comfy.supported_models

    family = comfy.supported_models.SDXL if unet_config.get("adm_in_channels") == 2816 else comfy.supported_models.SD15
    if meta:
        with torch.device("meta"):
            return family(dict(unet_config)).get_model({})
    model = family(dict(unet_config)).get_model({}, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def model_patcher(model):
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def tiny_clip(seed: int = 0):
    """A comfy.sd.CLIP around an SD1 CLIP-L-named text encoder with tiny widths (random weights)."""
    import comfy.sd
    import comfy.sd1_clip

    class Target:  # what comfy.sd.CLIP reads from a supported model's clip_target()
        params = {"textmodel_json_config": dict(TINY_CLIP_CONFIG), "clip_model": comfy.sd1_clip.SDClipModel}
        clip = comfy.sd1_clip.SD1ClipModel
        tokenizer = comfy.sd1_clip.SD1Tokenizer

    clip = comfy.sd.CLIP(Target(), model_options={"load_device": torch.device("cpu"),
                                                  "offload_device": torch.device("cpu"), "dtype": torch.float32})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in clip.cond_stage_model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return clip


def patched_state_dict(patcher) -> dict[str, torch.Tensor]:
    """The weights a ModelPatcher's model has with its patches merged (then unpatched again)."""
    patcher.patch_model(device_to=torch.device("cpu"), force_patch_weights=True)
    try:
        return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}
    finally:
        patcher.unpatch_model(device_to=torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------
# Tiny DiT students (SD3, PixArt): diffusers transformers, trained-looking LoRAs on the recipe's targets
# ---------------------------------------------------------------------------------------------------------

# SD3: ComfyUI derives depth = hidden / 64 and heads = depth, so 2 heads of 64 = hidden 128, 2 blocks.
TINY_SD3_DIFFUSERS = {
    "sample_size": 16, "patch_size": 2, "in_channels": 16, "num_layers": 2, "attention_head_dim": 64,
    "num_attention_heads": 2, "joint_attention_dim": 64, "caption_projection_dim": 128, "pooled_projection_dim": 64,
    "out_channels": 16, "pos_embed_max_size": 16,
}
# PixArt-alpha, micro-conditions on (hidden divisible by 3): hidden 96, 2 blocks; ComfyUI's config of the same.
TINY_PIXART_DIFFUSERS = {
    "sample_size": 8, "num_layers": 2, "attention_head_dim": 48, "num_attention_heads": 2, "in_channels": 4,
    "out_channels": 8, "cross_attention_dim": 96, "caption_channels": 32, "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single", "use_additional_conditions": True,
}
TINY_PIXART_COMFY = {
    "image_model": "pixart_alpha", "hidden_size": 96, "num_heads": 2, "depth": 2, "patch_size": 2, "in_channels": 4,
    "caption_channels": 32, "input_size": 8, "micro_condition": True, "model_max_length": 120, "pe_interpolation": 1,
}
# PixArt-alpha 512 (the flash-pixart base): diffusers' and ComfyUI's configs.
PIXART_DIFFUSERS = {
    "sample_size": 64, "num_layers": 28, "attention_head_dim": 72, "num_attention_heads": 16, "in_channels": 4,
    "out_channels": 8, "cross_attention_dim": 1152, "caption_channels": 4096, "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single", "use_additional_conditions": False,
}
PIXART_COMFY = {
    "image_model": "pixart_alpha", "hidden_size": 1152, "num_heads": 16, "depth": 28, "patch_size": 2,
    "in_channels": 4, "caption_channels": 4096, "input_size": 64, "micro_condition": False, "model_max_length": 120,
    "pe_interpolation": 1,
}
# Module counts of the recipe's DiT targets on these tiny models (every Linear/Conv the targets name).
TINY_SD3_LORA_MODULES = 24
TINY_PIXART_LORA_MODULES = 31


def dit_transformer(backbone: str, seed: int = 0) -> torch.nn.Module:
    """A tiny diffusers SD3Transformer2DModel / PixArtTransformer2DModel with seeded random weights."""
    from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if backbone == "sd3":
            model = SD3Transformer2DModel(**TINY_SD3_DIFFUSERS)
        else:
            model = PixArtTransformer2DModel(**TINY_PIXART_DIFFUSERS)
        with torch.no_grad():  # diffusers zero-initialises some output layers; a trained model has none
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.02)
    return model.eval()


def dit_student(backbone: str, transformer: torch.nn.Module, rank: int = 4, alpha: float = 2.0, seed: int = 1):
    """What a Flash run on `transformer` produces: flash_core's Denoiser with the recipe's DiT LoRA targets on a
    copy, A and B random as after training. Returns (LoraModules with diffusers paths, the student transformer)."""
    import copy

    from flash_core import lora_formats
    from flash_core.backends.diffusers import make_diffusers_denoiser
    from flash_core.recipes import DIT_LORA_TARGETS

    denoiser = make_diffusers_denoiser(backbone, copy.deepcopy(transformer))
    denoiser.add_lora(rank, alpha, DIT_LORA_TARGETS, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in denoiser.lora_module.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    modules = lora_formats.modules_from_peft_state_dict(denoiser.lora_state_dict(), alpha)
    return modules, denoiser.lora_module.eval()


def merged_state_dict(model: torch.nn.Module, modules) -> dict[str, torch.Tensor]:
    """model's state dict with every LoRA module merged: W + (alpha / rank) B A at each module's weight."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for module in modules:
        key = module.path + ".weight"
        state[key] = state[key] + module.delta().reshape(state[key].shape)  # W + (alpha/r) B A
    return state


def safetensors_with_header_start(path: Path, tensors: dict[str, torch.Tensor], start: bytes) -> Path:
    """A valid safetensors file whose 8-byte header length begins with `start` (b"\\x80", b"PK"): metadata
    padding grows the JSON header until its length has those low bytes (what byte sniffers take for a
    pickle / zip signature)."""
    from safetensors.torch import save

    modulus = 256 ** len(start)
    residue = int.from_bytes(start, "little")  # the header length's low bytes, little-endian

    def header_length(padding: int) -> tuple[int, bytes]:
        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"padding": "x" * padding})
        return int.from_bytes(data[:8], "little"), data

    length, data = header_length(0)
    target = length + (residue - length) % modulus  # the next length with those low bytes (a multiple of 8)
    padding = 0
    for _ in range(100):
        if length == target:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            assert data.startswith(start)
            return path
        padding += target - length
        length, data = header_length(padding)
    raise AssertionError(f"could not reach header length {target}")


def comfy_dit(backbone: str, transformer: torch.nn.Module):
    """ComfyUI's own SD3 / PixArt model holding `transformer`'s weights, as a ModelPatcher.

    SD3 goes through ComfyUI's loader for diffusers transformers (comfy.sd.load_diffusion_model_state_dict,
    which detects the config from the weights). ComfyUI's PixArt detection fixes the width at 1152, so the
    tiny PixArt is built from TINY_PIXART_COMFY and its weights converted with ComfyUI's own key map.
    """
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    state = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    if backbone == "sd3":
        patcher = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float32})
        assert type(patcher.model).__name__ == "SD3", type(patcher.model)
        return patcher
    model = comfy.supported_models.PixArtAlpha(dict(TINY_PIXART_COMFY)).get_model({}, device=torch.device("cpu"))
    converted = comfy_weights_from_diffusers("pixart", state)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    # not in diffusers' PixArt: the caption-dropout embedding (training only) and ComfyUI's sampling buffers
    assert not unexpected and all(k == "diffusion_model.y_embedder.y_embedding" or k.startswith("model_sampling.")
                                  for k in missing), (missing, unexpected)
    return model_patcher(model)


def comfy_weights_from_diffusers(backbone: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI weights (``diffusion_model.*``) from a diffusers SD3 / PixArt state dict, through ComfyUI's maps:
    fused q/k/v rows at their offsets, the adaLN scale/shift swap of SD3's last layers."""
    import comfy.model_detection
    import comfy.utils

    if backbone == "sd3":
        return comfy.model_detection.convert_diffusers_mmdit(dict(state), "diffusion_model.")
    key_map = comfy.utils.pixart_to_diffusers(TINY_PIXART_COMFY, output_prefix="diffusion_model.")
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, target in key_map.items():
        if key not in state:
            continue
        if isinstance(target, str):
            out[target] = state[key]
        else:  # (fused weight, (dim 0, row offset, rows)): q / k / v stacked in ComfyUI's qkv / kv layers
            fused.setdefault(target[0], []).append((target[1][1], state[key]))
    for key, parts in fused.items():
        out[key] = torch.cat([tensor for _, tensor in sorted(parts, key=lambda part: part[0])])
    return out
