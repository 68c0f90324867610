"""flash_core: Flash Diffusion as a plain torch / diffusers / peft / safetensors library.

Never imports ComfyUI. Sampler (sampling.py), schedules (schedules.py), LoRA file formats
(lora_formats.py), losses and the distillation trainer live here; nodes/ and training/ are thin shells.
"""

__version__ = "0.1.0"
