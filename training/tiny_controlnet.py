"""A tiny SD1.5-shaped ControlNet built with ComfyUI's own class (random weights, no download).

comfy.cldm.cldm.ControlNet with the tiny checkpoint's UNet config (tiny_checkpoint.TINY_UNET_CONFIG:
model_channels 320, context_dim 768, one level) and an RGB hint (hint_channels 3). Saved in fp16 with the
`control_model.` prefix of the original lllyasviel .pth files, it loads through the stock ControlNetLoader,
which detects it as an SD1.5 ControlNet from its keys. Unlike a freshly initialised real ControlNet, its
zero convolutions are random too, so the hint visibly changes what the UNet predicts (what the tests need).
Built once and cached next to the tiny checkpoint.

    python -m training.tiny_controlnet [--out PATH]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from training.comfy_env import cache_dir, import_comfy
from training.tiny_checkpoint import TINY_UNET_CONFIG, _randomise

CONTROLNET_NAME = "flash_tiny_sd15_controlnet.safetensors"
HINT_CHANNELS = 3
KEY_PREFIX = "control_model."  # the lllyasviel SD1.5 ControlNet layout ComfyUI's loader recognises


def default_path() -> Path:
    return cache_dir() / "models" / "controlnet" / CONTROLNET_NAME


def controlnet_config() -> dict:
    """ControlNet constructor arguments: the tiny UNet's encoder half plus an RGB hint encoder."""
    config = {k: v for k, v in TINY_UNET_CONFIG.items() if k not in ("out_channels", "transformer_depth_output")}
    return dict(config, hint_channels=HINT_CHANNELS)


def build_state_dict(seed: int = 2) -> dict[str, torch.Tensor]:
    """Seeded random weights for every tensor of the tiny ControlNet (fp16, `control_model.` keys)."""
    import_comfy()
    import comfy.cldm.cldm
    import comfy.ops

    generator = torch.Generator().manual_seed(seed)
    model = comfy.cldm.cldm.ControlNet(**controlnet_config(), operations=comfy.ops.disable_weight_init)
    _randomise(model, generator)
    return {KEY_PREFIX + key: value.detach().to(torch.float16).contiguous() for key, value in model.state_dict().items()}


def build(path: Path | None = None, seed: int = 2, force: bool = False) -> Path:
    """Build the ControlNet file at `path` unless it is already there. Written atomically."""
    from safetensors.torch import save_file

    path = Path(path or default_path())
    if path.is_file() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(build_state_dict(seed), str(tmp),
              metadata={"flash_comfyui": "tiny random SD1.5-family ControlNet fixture", "seed": str(seed)})
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    print(build(args.out, args.seed, args.force))


if __name__ == "__main__":
    main()
