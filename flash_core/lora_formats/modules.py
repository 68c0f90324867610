"""The LoRA vocabulary every other file of this package speaks: components, key-format labels, errors, and the
normalised records (:class:`LoraModule`, :class:`LoraFile`) and mapping results (:class:`MappedModule`,
:class:`LoraPlan`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from flash_core import file_formats

UNET = "unet"  # the denoiser (UNet or DiT transformer)
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
COMPONENTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)

# File-format labels.
KOHYA = "kohya"
COMFYUI = "comfyui"
DIFFUSERS = "diffusers"
PEFT = "peft"
BARE = "bare"


class LoraFormatError(file_formats.FileFormatError):
    """The file cannot be read as a LoRA (wrong container, corrupt, non-finite, unknown keys, bad config)."""


class LoraMappingError(ValueError):
    """The LoRA is readable but (some of) its modules do not fit the model it is applied to."""


@dataclass(frozen=True)
class LoraModule:
    """One low-rank update W <- W + (alpha / rank) * up @ down of one weight.

    component: UNET (the denoiser, UNet or DiT), TEXT_ENCODER or TEXT_ENCODER_2.
    path: the module path inside the component. Dotted (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``
        for diffusers/PEFT files, an LDM path for ``diffusion_model.*`` files) unless ``flat`` is set; kohya files
        flatten dots to ``_``, which cannot be undone without the model, so their path stays flat.
    down: A, shape (rank, in_features[, kh, kw]).  up: B, shape (out_features, rank[, 1, 1]).
    alpha: the trained alpha; the trained scale is alpha / rank.
    source_keys: the file keys this module was read from (for error messages).
    source_prefix: the key prefix in the file (``unet.down_blocks...``, ``lora_unet_...``).
    """

    component: str
    path: str
    flat: bool
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    source_keys: tuple[str, ...] = ()
    source_prefix: str = ""

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank  # LoRA scale alpha / r (Hu et al. 2021, Sec. 4.1)

    def delta(self) -> torch.Tensor:
        """The weight update this module adds at strength 1, shaped like the down/up product (float32)."""
        up = self.up.float().flatten(start_dim=1)
        down = self.down.float().flatten(start_dim=1)
        return self.scale * (up @ down)  # ΔW = (alpha / r) · B A


@dataclass
class LoraFile:
    """A LoRA file normalised: its modules, which formats its keys used, and warnings for the user."""

    name: str
    modules: list[LoraModule]
    formats: tuple[str, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_keys(self) -> int:
        return sum(len(m.source_keys) for m in self.modules)


@dataclass(frozen=True)
class MappedModule:
    """A module matched to one model weight: `lora_key` is the key-map prefix that matched, `target` its value."""

    module: LoraModule
    lora_key: str
    target: Any  # a model weight key, or whatever the key map holds (ComfyUI: (key, offset) tuples too)


@dataclass
class LoraPlan:
    """Every module of a LoRA file mapped: the ones for the denoiser and the ones for the text encoder(s)."""

    unet: list[MappedModule]
    text_encoder: list[MappedModule]
