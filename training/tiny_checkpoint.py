"""A tiny SD1.5-family checkpoint built with ComfyUI's own classes (random weights, no download).

ComfyUI detects SD1.5 from the state dict when model_channels = 320 and context_dim = 768; depth is
free, so one level with one res block and one transformer is enough (25.8M UNet parameters). The VAE is
ComfyUI's AutoencoderKL with ch 128 / ch_mult [1, 2, 4] (downscale 4) and the text encoder is the stock
SD1 CLIP-L. Saved in fp16 (~410 MB), it loads through the stock CheckpointLoaderSimple as SD1.5. It is the
embedded default model of `make demo` and the fixture of the test suite; it is built once and cached.

    python -m training.tiny_checkpoint [--out PATH]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from training.comfy_env import cache_dir, import_comfy

TINY_UNET_CONFIG = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    num_res_blocks=[1],
    channel_mult=[1],
    num_heads=8,
    transformer_depth=[1],
    transformer_depth_output=[1, 1],
    transformer_depth_middle=1,
    context_dim=768,
    use_spatial_transformer=True,
    use_linear_in_transformer=False,
    legacy=False,
)
TINY_VAE_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
    ch_mult=[1, 2, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0,
)
CHECKPOINT_NAME = "flash_tiny_sd15.safetensors"
LORA_NAME = "flash_tiny_sd15_lora.safetensors"
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def default_path() -> Path:
    return cache_dir() / "models" / "checkpoints" / CHECKPOINT_NAME


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """ComfyUI's ops skip weight init; give every tensor a small, seeded, well-conditioned value."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point() or tensor.ndim == 0:
                continue
            if name.endswith("bias"):
                tensor.zero_()
            elif tensor.ndim == 1:  # norm scales
                tensor.fill_(1.0)
            else:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in**0.5)


def build_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    import_comfy()
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    generator = torch.Generator().manual_seed(seed)
    unet = UNetModel(**TINY_UNET_CONFIG)
    vae = AutoencoderKL(ddconfig=TINY_VAE_DDCONFIG, embed_dim=4)
    clip = comfy.sd1_clip.SDClipModel()
    state = {}
    for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", vae), ("cond_stage_model.", clip)):
        _randomise(module, generator)
        for key, value in module.state_dict().items():
            state[prefix + key] = value.detach().to(torch.float16).contiguous()
    return state


def build(path: Path | None = None, seed: int = 0, force: bool = False) -> Path:
    """Build the checkpoint at `path` unless it is already there. Written atomically."""
    from safetensors.torch import save_file

    path = Path(path or default_path())
    if path.is_file() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(build_state_dict(seed), str(tmp), metadata={"flash_comfyui": "tiny random SD1.5-family fixture", "seed": str(seed)})
    os.replace(tmp, path)
    return path


def build_lora(path: Path | None = None, rank: int = 4, seed: int = 1, force: bool = False) -> Path:
    """A random rank-4 LoRA for the tiny UNet in the format flash-sd ships (diffusers `unet.*.lora_A/B`).

    Untrained: it stands in for a Flash LoRA so the demo graph and tests exercise FlashLoRALoader.
    """
    from safetensors.torch import save_file

    path = Path(path or cache_dir() / "models" / "loras" / LORA_NAME)
    if path.is_file() and not force:
        return path
    import_comfy()
    import comfy.utils

    diffusers_to_ldm = comfy.utils.unet_to_diffusers(TINY_UNET_CONFIG)
    shapes = {k: v.shape for k, v in build_unet_shapes().items()}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for diffusers_key, ldm_key in sorted(diffusers_to_ldm.items()):
        module = diffusers_key.removesuffix(".weight")
        if not diffusers_key.endswith(".weight") or not module.endswith(ATTENTION_PROJECTIONS):
            continue
        out_features, in_features = shapes[ldm_key][:2]
        tensors[f"unet.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.05
        tensors[f"unet.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.05
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return path


def build_unet_shapes() -> dict[str, torch.Tensor]:
    """The tiny UNet's state dict on the meta device (names and shapes only)."""
    import_comfy()
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        return UNetModel(**TINY_UNET_CONFIG).state_dict()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    print(build(args.out, args.seed, args.force))
    print(build_lora(force=args.force))


if __name__ == "__main__":
    main()
