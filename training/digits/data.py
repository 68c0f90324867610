"""The digits data set: scikit-learn's 1,797 real 8x8 handwritten digits as a text-to-image corpus.

Choices (documented once, here):
  * Resolution: 8x8 -> 16x16 (bilinear). 16x16 keeps every model of the project on a 2-core CPU budget;
    the VAE halves it to an 8x8x4 latent.
  * Channels: 3 (the grey image repeated as RGB), because diffusers' AutoencoderKL and ComfyUI's VAE
    nodes expect RGB images. The evaluator averages the channels back to one.
  * Range: pixels in [-1, 1] (white ink on black, as scikit-learn stores it: 0 = background).
  * Split: stratified, fixed seed, 80 % train / 20 % held-out (1,437 / 360 images).
  * Prompts: "a handwritten digit seven" is the canonical prompt (benchmarks use it); training draws
    from a few templates so the text encoder sees some variation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
IMAGE_CHANNELS = 3
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

CANONICAL_TEMPLATE = "a handwritten digit {word}"
PROMPT_TEMPLATES = (
    CANONICAL_TEMPLATE,
    "a photo of the handwritten digit {word}",
    "the handwritten number {word}",
    "a scanned handwritten {word}",
)


@dataclass(frozen=True)
class DigitsSplit:
    """Images as float32 tensors (N, 3, S, S) in [-1, 1] and their digit labels (N,) int64."""

    images: torch.Tensor
    digits: torch.Tensor

    def __len__(self) -> int:
        return int(self.digits.shape[0])


def canonical_prompt(digit: int) -> str:
    """The one prompt per digit that benchmarks and demos use: "a handwritten digit seven"."""
    return CANONICAL_TEMPLATE.format(word=DIGIT_WORDS[int(digit)])


def training_prompt(digit: int, rng: np.random.Generator) -> str:
    """A prompt for `digit` drawn uniformly from the templates."""
    template = PROMPT_TEMPLATES[int(rng.integers(len(PROMPT_TEMPLATES)))]
    return template.format(word=DIGIT_WORDS[int(digit)])


def upscale(images_8x8: np.ndarray | torch.Tensor, size: int = IMAGE_SIZE, channels: int = IMAGE_CHANNELS) -> torch.Tensor:
    """(N, 8, 8) raw scikit-learn intensities 0..16 -> (N, channels, size, size) float32 in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images_8x8), dtype=torch.float32).unsqueeze(1) / 16.0  # 0..16 -> 0..1
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(0.0, 1.0) * 2.0 - 1.0  # [0, 1] -> [-1, 1]
    return x.repeat(1, channels, 1, 1)


def load_splits(size: int = IMAGE_SIZE, channels: int = IMAGE_CHANNELS) -> tuple[DigitsSplit, DigitsSplit]:
    """(train, held_out): stratified split of load_digits() with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, held_idx = train_test_split(
        index, test_size=HELD_OUT_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
    )
    train_idx, held_idx = np.sort(train_idx), np.sort(held_idx)

    def make(idx: np.ndarray) -> DigitsSplit:
        return DigitsSplit(
            images=upscale(digits.images[idx], size, channels),
            digits=torch.as_tensor(digits.target[idx], dtype=torch.int64),
        )

    return make(train_idx), make(held_idx)


def to_grey(images: torch.Tensor) -> torch.Tensor:
    """(N, C, S, S) in [-1, 1] -> (N, 1, S, S): channel mean (our images are grey RGB)."""
    return images.float().mean(dim=1, keepdim=True)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, S, S) in [-1, 1] -> (N, S, S, C) uint8 for PNG files."""
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """(N, S, S, C) uint8 -> (N, C, S, S) float32 in [-1, 1] (inverse of to_uint8)."""
    x = torch.as_tensor(np.asarray(pixels), dtype=torch.float32).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0
