"""Denoiser backends: adapters from a model family's network to `flash_core.denoiser.Denoiser`.

`flash_core.backends.diffusers` wraps diffusers models (SD1.5 / SDXL UNets, PixArt, SD3); a ComfyUI MODEL
adapter lives with the ComfyUI glue in nodes/.
"""

from flash_core.backends.diffusers import (  # noqa: F401
    PixArtDenoiser,
    SD3Denoiser,
    UNetDenoiser,
    make_diffusers_denoiser,
)
