"""The training preview: teacher | student at 1 / 2 / 4 steps, one column per prompt, the same noise for every row.

The teacher row is a K-step DPM-Solver++ solve with CFG; student rows sample with the student's few-step sampler
(re-noise generator seeded with `seed + steps`); pixels come from a `decode` callback (ComfyUI VAE / latent2rgb,
diffusers VAE). Rendering never changes the training's random stream.

    preview_due(step, total, every) -> bool
    Preview(distiller, cond, uncond, latent_shape, seed, guidance, teacher_sample_steps, decode, sample_steps=(1, 2, 4))
        .rows() -> [(label, images [n, H, W, 3] in 0..1)]   .image() -> uint8 [H, W, 3] (flash_core.grid)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from flash_core.denoiser import Conditioning
from flash_core.distill import FlashDistiller, teacher_target
from flash_core.grid import grid_image

PREVIEW_STEPS = (1, 2, 4)


def preview_due(step: int, total: int, every: int) -> bool:
    """A preview after every `every` steps and after the last one (0 = never)."""
    return bool(every) and (step % every == 0 or step == total)


class Preview:
    """Teacher (DPM-Solver++ with CFG from the same noise, `teacher_sample_steps` steps: K in the node) | student
    at each of `sample_steps` (1 / 2 / 4) sampling steps, one column per prompt. decode(latents [n, C, h, w],
    model space) -> images [n, H, W, 3] in 0..1 (CPU)."""

    def __init__(self, distiller: FlashDistiller, cond: Conditioning, uncond: Conditioning, latent_shape: Sequence[int],
                 seed: int, guidance: float, teacher_sample_steps: int, decode: Callable[[Tensor], Tensor],
                 sample_steps: Sequence[int] = PREVIEW_STEPS):
        self.distiller, self.decode = distiller, decode
        self.cond, self.uncond = cond, uncond.expand_to(cond.batch_size) if uncond.batch_size == 1 else uncond
        generator = torch.Generator().manual_seed(seed)
        self.noise = torch.randn((cond.batch_size, *latent_shape), generator=generator)  # the same noise for every row
        self.seed, self.guidance, self.teacher_sample_steps = seed, guidance, teacher_sample_steps
        self.sample_steps = tuple(sample_steps)
        self._teacher: Tensor | None = None

    def teacher_images(self) -> Tensor:
        if self._teacher is None:
            distiller = self.distiller
            den, device = distiller.denoiser, distiller.device
            with torch.no_grad(), den.teacher():
                x0 = teacher_target(den, self.noise.to(device), 0, self.cond.to(device), self.uncond.to(device),
                                    self.guidance, self.teacher_sample_steps)
            self._teacher = self.decode(x0)
        return self._teacher

    def student_latents(self, steps: int) -> Tensor:
        generator = torch.Generator(self.distiller.device).manual_seed(self.seed + steps)
        if self.distiller.guided_student:  # guidance mode "cfg": the student's own CFG at the teacher row's w
            return self.distiller.student_sample(self.noise, self.cond, steps, generator=generator,
                                                 negative=self.uncond, guidance=self.guidance)
        return self.distiller.student_sample(self.noise, self.cond, steps, generator=generator)

    def rows(self) -> list[tuple[str, Tensor]]:
        with torch.random.fork_rng(devices=[]):  # previews never change the training's random stream
            rows = [(f"teacher\nK={self.teacher_sample_steps}\ncfg {self.guidance:g}", self.teacher_images())]
            for steps in self.sample_steps:
                label = f"student\n{steps} step{'s' if steps > 1 else ''}"
                if self.distiller.guided_student:
                    label += f"\ncfg {self.guidance:g}"
                rows.append((label, self.decode(self.student_latents(steps))))
        return rows

    def image(self) -> np.ndarray:
        return grid_image(self.rows())
