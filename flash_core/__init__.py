"""flash_core: Flash Diffusion as a plain torch / diffusers / peft / safetensors library.

Never imports ComfyUI. Sampler (sampling.py), schedules (schedules.py), LoRA file formats
(lora_formats/), losses, the distillation trainer (distill.py), the one training run around it (run.py:
loop, batch order, checkpoints, preview rule, export, hooks) and the teacher-target cache (target_cache.py)
live here; nodes/ and training/ are thin shells.
"""

__version__ = "0.1.0"
