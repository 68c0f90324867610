"""A style LoRA for the digits teacher with a style an independent measure reads: italic slant.

The stack benchmark (training/digits/stack.py) needs what users stack on their checkpoints: a style LoRA. Here
the style is italics: the training digits sheared to the right (x' = x + SHEAR * (height above the centre)),
learnt by a LoRA on the teacher UNet with the teacher's own objective (epsilon MSE, 10 % empty prompts). Its
strength is read off generated images by `slant`, a measure that uses no network: the intensity-weighted
covariance of x and y over the variance of y (the slope of the strokes' principal direction).

    python -m training.digits.style            # trains (or reuses) the cached style LoRA and prints slants
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training.digits.data import load_splits, to_grey, training_prompt

SHEAR = 0.45  # italic shear of the style data: the top of a 16 px digit moves ~3.6 px to the right
STYLE_FILE = "italic_style_lora.safetensors"  # kohya keys: stock LoraLoader and FlashLoRALoader apply it
DIFFUSERS_FILE = "italic_style_lora_diffusers.safetensors"  # the same LoRA for diffusers' load_lora_weights
INFO_FILE = "italic_style_lora.json"
PROMPT_DROPOUT = 0.1


@dataclass(frozen=True)
class StyleConfig:
    """Everything that determines the style LoRA (its cache key)."""

    shear: float = SHEAR
    rank: int = 16
    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    # attention projections (the Flash LoRA's targets) and the ResNet convolutions: a geometric style needs both
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


def italic(images: torch.Tensor, shear: float = SHEAR) -> torch.Tensor:
    """Shear digits (N, C, S, S) in [-1, 1] to the right at the top (italics); background stays -1."""
    theta = torch.tensor([[1.0, shear, 0.0], [0.0, 1.0, 0.0]]).expand(images.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # samples input at (x + shear*y, y)
    ink = (images.float() + 1.0) / 2.0  # [0, 1]: zero padding = background
    return F.grid_sample(ink, grid, mode="bilinear", padding_mode="zeros", align_corners=False) * 2.0 - 1.0


def slant(images: torch.Tensor) -> torch.Tensor:
    """Per-image slant (N,) of digits in [-1, 1]: -cov(x, y) / var(y) of the ink (y grows downwards, so a
    right-leaning stroke has negative covariance); 0 = upright, SHEAR for an upright digit sheared by SHEAR."""
    ink = ((to_grey(images)[:, 0] + 1.0) / 2.0).clamp(0, 1)  # (N, S, S) ink weights
    size = ink.shape[-1]
    coords = torch.arange(size, dtype=torch.float32)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    mass = ink.sum(dim=(1, 2)).clamp_min(1e-6)
    mean_x = (ink * x).sum(dim=(1, 2)) / mass
    mean_y = (ink * y).sum(dim=(1, 2)) / mass
    dx, dy = x - mean_x[:, None, None], y - mean_y[:, None, None]
    cov_xy = (ink * dx * dy).sum(dim=(1, 2)) / mass
    var_y = (ink * dy * dy).sum(dim=(1, 2)) / mass
    return -cov_xy / var_y.clamp_min(1e-6)  # slope dx/d(-y) of the ink's regression line


def mean_slant(images: torch.Tensor) -> float:
    return float(slant(images).mean())


def default_style_dir() -> Path:
    from training.fixtures.comfy_env import cache_dir

    return cache_dir() / "digits" / "style"


def is_complete(folder: Path, config: StyleConfig) -> bool:
    info = folder / INFO_FILE
    return (folder / STYLE_FILE).is_file() and (folder / DIFFUSERS_FILE).is_file() and info.is_file() and json.loads(info.read_text()).get("config") == _jsonable(config)


def _jsonable(config: StyleConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))


def train_style_lora(pipe, out: Path | None = None, config: StyleConfig = StyleConfig()) -> Path:
    """Train (or reuse) the italic style LoRA of the digits teacher `pipe`; returns the kohya .safetensors file."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from flash_core import lora_formats
    from flash_core.files import write_json_atomic
    from training.digits.benchmark import encode_prompts
    from training.digits.teacher import encode_posteriors

    out = Path(out or default_style_dir())
    if is_complete(out, config):
        return out / STYLE_FILE
    torch.manual_seed(config.seed)
    train, _ = load_splits()
    styled = italic(train.images, config.shear)
    mean, std = encode_posteriors(pipe.vae, styled)
    scaling = float(pipe.vae.config.scaling_factor)
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(config.seed + 1)
    prompts = sorted({training_prompt(d, np.random.default_rng(i)) for d in range(10) for i in range(64)})
    embeds = encode_prompts(pipe, prompts + [""])
    empty = len(prompts)

    import copy

    unet = copy.deepcopy(pipe.unet).requires_grad_(False)
    lora = LoraConfig(r=config.rank, lora_alpha=config.rank, target_modules=list(config.targets), init_lora_weights="gaussian")
    inject_adapter_in_model(lora, unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    abar_all = pipe.scheduler.alphas_cumprod
    unet.train()
    bar = tqdm(range(config.steps), desc="style LoRA (italic)", leave=False)
    for _ in bar:
        idx = torch.randint(0, mean.shape[0], (config.batch_size,), generator=gen)
        rows = [empty if rng.random() < PROMPT_DROPOUT else prompts.index(training_prompt(int(d), rng))
                for d in train.digits[idx].tolist()]
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling  # z ~ q(z|x), scaled
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, len(abar_all), (z0.shape[0],), generator=gen)
        abar = abar_all[t].view(-1, 1, 1, 1)
        z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise  # q(z_t | z_0)
        loss = F.mse_loss(unet(z_t, t, embeds[rows]).sample, noise)  # the teacher's epsilon objective
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{float(loss):.4f}")
    peft_tensors = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(unet).items()}
    modules = lora_formats.modules_from_peft_state_dict(peft_tensors, config.rank)
    metadata = {"ss_network_dim": str(config.rank), "ss_network_alpha": str(config.rank),
                "flash.style": f"italic shear {config.shear}"}
    tensors, diffusers_metadata = lora_formats.to_diffusers_state_dict(modules, dtype=torch.float32)
    lora_formats.save_lora(out / DIFFUSERS_FILE, tensors, {**diffusers_metadata, **metadata})
    lora_formats.save_lora(out / STYLE_FILE, lora_formats.to_kohya_state_dict(modules, dtype=torch.float32), metadata)
    write_json_atomic(out / INFO_FILE, {"config": _jsonable(config), "final_loss": float(loss)})
    return out / STYLE_FILE


def styled_pipeline(pipe, style_file: Path, strength: float = 1.0):
    """A copy of `pipe` whose UNet has the style LoRA fused in (W + strength * delta), via diffusers' own
    load_lora_weights / fuse_lora on the diffusers export next to `style_file`: what a diffusers user does."""
    import copy

    styled = copy.deepcopy(pipe)
    styled.load_lora_weights(str(Path(style_file).with_name(DIFFUSERS_FILE)), adapter_name="style")
    styled.fuse_lora(lora_scale=strength, adapter_names=["style"])
    styled.unload_lora_weights()
    return styled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    from training.digits.teacher import TeacherConfig, default_teacher_dir, load_teacher_pipeline, train_teacher

    pipe = load_teacher_pipeline(train_teacher(default_teacher_dir(), TeacherConfig()))
    path = train_style_lora(pipe)
    train, _ = load_splits()
    print(f"style LoRA: {path}")
    print(f"slant of the training digits {mean_slant(train.images):.3f}, sheared {mean_slant(italic(train.images)):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
