"""The node path at the published SD1.5 size: ComfyDenoiser over ComfyUI's own SD1.5 UNetModel in bf16.

Random weights (nothing downloaded), built by ComfyUI's SD15 model config on the CPU; one mixed-precision
student update (batch 1, 8x8 latents, K = 4), as tests/flash_core/test_full_size.py does for diffusers.
CPUs without bf16 instructions run bf16 convolutions slowly: about a minute here.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from training.fixtures.comfy_env import import_comfy, load_pack

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_fixtures as F  # noqa: E402

import_comfy()  # ComfyUI on sys.path, configured for the CPU, before any comfy import

# ComfyUI's SD1.5 unet config (comfy/model_detection.py, the SD15 entry): one home, the LoRA fixtures'.
SD15_UNET_CONFIG = F.SD15_COMFY

pytestmark = pytest.mark.slow  # the full-size SD1.5 UNet on the CPU: make test, not test-fast


@pytest.fixture(scope="module")
def pack():
    return load_pack()


def sd15_comfy_model_bf16():
    """A ComfyUI SD1.5 MODEL with bf16 weights; ComfyUI's layers skip initialisation, so fill them here."""
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(SD15_UNET_CONFIG))
    config.set_inference_dtype(torch.bfloat16, None)
    base = config.get_model({}, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in base.diffusion_model.state_dict().items():
            if name.endswith("bias"):
                tensor.zero_()
            elif tensor.ndim == 1:
                tensor.fill_(1.0)  # norm scales
            else:  # fan-in scaled Gaussian weights
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / tensor[0].numel() ** 0.5)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def test_full_size_comfy_sd15_bf16_mixed_precision_step(pack):
    from flash_core.denoiser import Conditioning
    from flash_core.distill import Batch, DistillConfig, FlashDistiller

    comfy_denoiser = importlib.import_module(f"{pack.__name__}.nodes.comfy_denoiser")
    model = sd15_comfy_model_bf16()
    assert sum(p.numel() for p in model.model.diffusion_model.parameters()) == 859_520_964
    with torch.inference_mode(False), torch.enable_grad():
        den = comfy_denoiser.ComfyDenoiser(model, device=torch.device("cpu"))
        config = DistillConfig(backbone="sd15", total_steps=8, teacher_grid_steps=4, batch_size=1,
                               mixed_precision="bf16")
        distiller = FlashDistiller(den, config)  # the recipe's rank 128 on the attention projections
        distiller.sample_grid_index = lambda phase=None, generator=None: 3  # the last of K = 4: one teacher CFG evaluation
        lora = dict(den.named_lora_parameters())
        assert sum(p.numel() for p in lora.values()) == 25_509_888
        assert den.encoder_feature_channels == 1280
        assert sum(p.numel() for p in distiller.discriminator.parameters()) == 870_720
        assert all(p.dtype == torch.bfloat16 for p in den.base_parameters())
        assert all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())

        g = torch.Generator().manual_seed(0)
        batch = Batch(torch.randn(1, 4, 8, 8, generator=g), Conditioning(torch.randn(1, 8, 768, generator=g)),
                      Conditioning(torch.randn(1, 8, 768, generator=g)))
        lora_b = {n: p.detach().clone() for n, p in lora.items() if "lora_B" in n}
        logs = distiller.train_step(batch)
    assert logs["student_update"] == 1.0 and torch.isfinite(torch.tensor(logs["loss"]))
    moved = sum(int((lora[n] != before).sum()) for n, before in lora_b.items())
    assert moved / sum(b.numel() for b in lora_b.values()) > 0.95  # Adam's first step: ~lr on every entry
    states = [v for s in distiller.student_optimizer.state.values() for v in s.values() if v.ndim]
    assert sum(v.numel() for v in states) == 2 * 25_509_888 and all(v.dtype == torch.float32 for v in states)
    assert all(p.dtype == torch.float32 for p in lora.values())
    assert not any("lora_" in n for n, _ in model.model.named_parameters())  # the MODEL itself is untouched
