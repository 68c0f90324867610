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
