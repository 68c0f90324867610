"""The exponential moving average of a student's LoRA (DistillConfig.ema_decay > 0; FlashDistiller.ema_lora).

After every student update, ema <- d_k * ema + (1 - d_k) * lora with d_k = min(ema_decay, (1 + k) / (10 + k)) at
iteration k (diffusers EMAModel's warm-up: the first updates are not tied to the initial LoRA). Training runs on the
LoRA; everything that samples or exports the student (FlashDistiller.student_sample, so the previews;
lora_state_dict, so every export and the node's MODEL) swaps the average in. On the digits model the average brought
the "cfg" student's dial nearer the teacher's and its unprompted mix of digits farther (README, make bench-guidance-ema).

    initial_average(denoiser) -> dict[str, Tensor]          # a float32 copy of the LoRA, on its device
    update_average(average, denoiser, ema_decay, step)      # one EMA step, after the optimiser's
    swapped_in(denoiser, average)                           # context: the LoRA holds `average` (None: as trained)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor


def initial_average(denoiser) -> dict[str, Tensor]:
    """The average's start: a copy of the LoRA as initialised (named as Denoiser.named_lora_parameters)."""
    return {name: p.detach().clone() for name, p in denoiser.named_lora_parameters()}


@torch.no_grad()
def update_average(average: dict[str, Tensor], denoiser, ema_decay: float, step: int) -> None:
    """average <- d * average + (1 - d) * lora, d = min(ema_decay, (1 + step) / (10 + step))."""
    decay = min(ema_decay, (1 + step) / (10 + step))
    for name, param in denoiser.named_lora_parameters():
        average[name].lerp_(param.detach(), 1.0 - decay)


@contextlib.contextmanager
def swapped_in(denoiser, average: dict[str, Tensor] | None) -> Iterator[None]:
    """The LoRA holds `average` for the duration (no grad; the trained weights restored exactly on exit); None: the
    LoRA as trained."""
    if average is None:
        yield
        return
    params = dict(denoiser.named_lora_parameters())
    trained = {name: p.detach().clone() for name, p in params.items()}
    try:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(average[name])
        yield
    finally:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(trained[name])
