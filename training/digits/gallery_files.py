"""The gallery's files: links to `make demo`'s teacher and student LoRA (and the tiny test fixtures for
ControlNet) in the gallery's own models folder, the Load Image inputs (held-out digits), and the stand-in style
LoRA of the digits UNet's shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flash_core.files import save_image_atomic, write_atomic
from training.fixtures.comfy_env import cache_dir

TEACHER_PIPELINE = "flash_digits_teacher"
FLASH_LORA = "flash/flash_digits_demo.safetensors"
STYLE_LORA = "flash_digits_style_standin.safetensors"  # models/loras/<name>, kohya keys (build_style_lora)
STYLE_RANK = 4
STYLE_RELATIVE = 3.0  # its update's size, relative to the Flash LoRA's update of the same weight
INPUT_IMAGE = "flash_gallery_digit.png"
INPAINT_IMAGE = "flash_gallery_digit_inpaint.png"
CONTROL_IMAGE = "flash_gallery_digit_64.png"

INPUT_DIGIT = 3  # the held-out digit the image-to-image graphs start from
INPAINT_DIGIT = 8  # the held-out digit whose lower half is repainted


def gallery_dir() -> Path:
    return cache_dir() / "gallery"


def demo_models() -> Path:
    return cache_dir() / "demo" / "models"


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.resolve() == target.resolve():
            return
        link.unlink()
    link.symlink_to(target.resolve(), target_is_directory=target.is_dir())


def prepare_models(models_root: Path, with_fixtures: bool) -> None:
    """models_root: links to the demo's teacher and student LoRA (and, for ControlNet, the tiny fixtures)."""
    teacher = demo_models() / "diffusers" / TEACHER_PIPELINE
    student = demo_models() / "loras" / FLASH_LORA
    missing = [str(p) for p in (teacher, student) if not p.exists()]
    if missing:
        raise SystemExit(f"run `make demo` first: missing {', '.join(missing)}")
    _link(models_root / "diffusers" / TEACHER_PIPELINE, teacher)
    _link(models_root / "loras" / FLASH_LORA, student)
    if with_fixtures:
        from training.fixtures import tiny_checkpoint, tiny_controlnet

        _link(models_root / "checkpoints" / tiny_checkpoint.CHECKPOINT_NAME, tiny_checkpoint.build())
        _link(models_root / "loras" / tiny_checkpoint.LORA_NAME, tiny_checkpoint.build_lora())
        _link(models_root / "controlnet" / tiny_controlnet.CONTROLNET_NAME, tiny_controlnet.build())


def held_out_digit(digit: int) -> np.ndarray:
    """The first held-out (never trained on) image of `digit`, 16x16x3 uint8."""
    from training.digits.data import load_splits, to_uint8

    _, held = load_splits()
    index = int((held.digits == digit).nonzero()[0, 0])
    return to_uint8(held.images[index:index + 1])[0]


def write_inputs(input_dir: Path) -> None:
    """The Load Image files: a digit, the same digit binarised and 4x larger (ControlNet on the 64 px fixture),
    a digit with a transparent lower half (inpainting)."""
    from PIL import Image

    input_dir.mkdir(parents=True, exist_ok=True)
    digit = held_out_digit(INPUT_DIGIT)
    save_image_atomic(Image.fromarray(digit), input_dir / INPUT_IMAGE)
    ink = np.where(digit >= 128, 255, 0).astype(np.uint8)  # crisp strokes: edges for Canny at 0.4 / 0.8
    save_image_atomic(Image.fromarray(ink).resize((64, 64), Image.NEAREST), input_dir / CONTROL_IMAGE)
    rgb = held_out_digit(INPAINT_DIGIT)
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[rgb.shape[0] // 2:, :] = 0  # LoadImage: MASK = 1 - alpha, the area to repaint
    save_image_atomic(Image.fromarray(np.dstack([rgb, alpha])), input_dir / INPAINT_IMAGE)


def build_style_lora(path: Path, flash_lora: Path, rank: int = STYLE_RANK, relative: float = STYLE_RELATIVE,
                     seed: int = 0) -> Path:
    """A stand-in style LoRA in kohya format for the digits UNet: seeded random rank-`rank` updates of the same
    attention projections the Flash LoRA patches, each scaled to `relative` times the Flash LoRA's own update
    there (norm of up @ down * alpha / rank). No style LoRA exists for the digits model, and training one
    (backpropagation through the UNet) takes minutes on this CPU, so this one only has the shapes, the key
    format and an effect of the Flash LoRA's order of size: it shows the stock Load LoRA stacking a second
    LoRA on the student, not a style."""
    import torch
    from safetensors.torch import load_file, save_file

    flash = load_file(str(flash_lora))
    generator = torch.Generator().manual_seed(seed)
    style = {}
    for key in sorted(k for k in flash if k.endswith(".lora_down.weight")):
        module = key.removesuffix(".lora_down.weight")
        down_f, up_f = flash[key].float(), flash[f"{module}.lora_up.weight"].float()
        alpha_f = float(flash.get(f"{module}.alpha", torch.tensor(float(down_f.shape[0]))))
        target = (up_f @ down_f).norm() * alpha_f / down_f.shape[0] * relative
        down = torch.randn(rank, down_f.shape[1], generator=generator) / down_f.shape[1] ** 0.5
        up = torch.randn(up_f.shape[0], rank, generator=generator)
        up *= target / (up @ down).norm()  # alpha = rank: the update is exactly up @ down
        style[key] = down.half().contiguous()
        style[f"{module}.lora_up.weight"] = up.half().contiguous()
        style[f"{module}.alpha"] = torch.tensor(float(rank))
    metadata = {"flash_gallery": "stand-in style LoRA, random directions", "seed": str(seed)}
    write_atomic(path, lambda tmp: save_file(style, tmp, metadata=metadata))
    return path
