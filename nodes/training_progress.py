"""What Flash Distill Train shows while it trains: ComfyUI's progress bar with the loss as text, preview grids
(teacher | student rows, decoded by the VAE when one is wired, else ComfyUI's latent2rgb), and Cancel, which
raises from the progress update (flash_core.run then checkpoints the last finished step and re-raises).
"""

from __future__ import annotations

import comfy.model_management
import comfy.utils
import numpy as np
import torch
from PIL import Image

from flash_core.run import RunHooks, StepReport

# --------------------------------------------------------------------------------------------------
# Preview grid
# --------------------------------------------------------------------------------------------------


def latent_rgb(latent_format, latents: torch.Tensor, upscale: int = 8) -> torch.Tensor:
    """ComfyUI's latent2rgb preview (latent_format.latent_rgb_factors) of model-space latents -> [N, H, W, 3].
    Latent formats without factors (custom VAEs) show their first three channels (or the first, in grey)."""
    if latent_format.latent_rgb_factors is not None:
        factors = torch.tensor(latent_format.latent_rgb_factors, dtype=torch.float32)  # [C, 3]
    else:
        channels = latents.shape[1]
        factors = torch.zeros(channels, 3)
        for rgb_channel in range(3):
            factors[rgb_channel if channels >= 3 else 0, rgb_channel] = 1.0
    bias = latent_format.latent_rgb_factors_bias
    rgb = torch.einsum("nchw,cr->nhwr", latents.float().cpu(), factors)
    if bias is not None:
        rgb = rgb + torch.tensor(bias, dtype=torch.float32)
    rgb = ((rgb + 1.0) / 2.0).clamp(0, 1)  # -1..1 -> 0..1 as latent_preview.preview_to_image
    return rgb.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)


def to_images(latents: torch.Tensor, latent_format, vae=None) -> torch.Tensor:
    """Model-space latents -> IMAGE [N, H, W, 3] (VAE decode when a VAE is given, else latent2rgb)."""
    if vae is None:
        return latent_rgb(latent_format, latents)
    with torch.inference_mode():  # ComfyUI's own mode for the VAE (its weights are inference tensors)
        decoded = vae.decode(latent_format.process_out(latents.detach().float().cpu()))
    return decoded[..., :3].float().cpu().clamp(0, 1).clone()


def progress_preview(image: np.ndarray) -> tuple[str, Image.Image, int]:
    """The (format, PIL image, max size) tuple ComfyUI's progress hook sends to the frontend."""
    return ("JPEG", Image.fromarray(image), 1024)


def image_output(image: np.ndarray) -> torch.Tensor:
    """A uint8 [H, W, 3] grid as a ComfyUI IMAGE [1, H, W, 3] in 0..1."""
    return torch.from_numpy(image.astype(np.float32) / 255.0)[None]


# --------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------


class Progress:
    """ComfyUI progress bar (+ previews, + Cancel check) and the loss as the node's progress text."""

    def __init__(self, total: int, node_id: str | None):
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.node_id = node_id
        try:
            from server import PromptServer

            self.server = PromptServer.instance if node_id is not None else None
        except Exception:  # not running inside the ComfyUI server (in-process use)
            self.server = None

    def update(self, step: int, total: int, text: str, preview=None) -> None:
        if self.server is not None and hasattr(self.server, "send_progress_text"):
            self.server.send_progress_text(text, self.node_id)
        self.bar.update_absolute(step, total, preview)  # also raises InterruptProcessingException on Cancel
        comfy.model_management.throw_exception_if_processing_interrupted()


class NodeHooks(RunHooks):
    """flash_core.run's hooks on ComfyUI: progress bar + loss text + preview; Cancel raises from on_step (the run
    then checkpoints the finished step and re-raises)."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def on_step(self, report: StepReport) -> None:
        logs = report.logs
        text = (f"step {report.step}/{report.total}  loss {logs['loss']:.4f}  distill {logs['loss_distill']:.4f}  "
                f"phase {int(logs['phase']) + 1}/{report.num_phases}  {report.seconds_per_step:.2f} s/step")
        preview = progress_preview(report.preview) if report.preview is not None else None
        self.progress.update(report.step, report.total, text, preview)
