"""The published-size SD1.5 UNet, trained one step on the CPU with bf16 frozen weights (mixed precision).

Random weights (nothing downloaded), diffusers' UNet2DConditionModel with SD1.5's configuration, batch 1,
8x8 latents, K = 4: it checks what only the full size shows (the LoRA size of the recipe, dtypes of every
trainable and optimiser tensor, the 1280-channel mid block feeding the reference discriminator head), not
speed. CPUs without bf16 instructions run bf16 convolutions slowly: about a minute here.
"""

from __future__ import annotations

import time

import pytest
import torch

from flash_core.backends.diffusers import UNetDenoiser
from flash_core.denoiser import Conditioning
from flash_core.distill import Batch, DistillConfig, FlashDistiller

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json (the non-default keys)
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
)
SD15_LORA_PARAMETERS = 25_509_888  # rank 128 on to_q / to_k / to_v / to_out.0 of all 32 attention layers
SD15_HEAD_PARAMETERS = 870_720  # the reference discriminator head on the 1280-channel mid block

pytestmark = pytest.mark.slow  # the full-size SD1.5 UNet on the CPU: make test, not test-fast


def sd15_unet_bf16() -> torch.nn.Module:
    """SD1.5's UNet with random weights, created directly in bf16 (as the CLI loads it for bf16 runs)."""
    from diffusers import UNet2DConditionModel

    default = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        return UNet2DConditionModel(**SD15_UNET)
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("guidance_mode", ["baked", "cfg"])
def test_full_size_sd15_bf16_mixed_precision_step(guidance_mode):
    """Both guidance modes: "cfg" runs the student's own CFG (a batch of 2 through the LoRA with gradients), here with
    the moving average of the LoRA (ema_decay 0.99, `make bench-guidance-ema`'s): a float32 copy of the full LoRA."""
    started = time.perf_counter()
    unet = sd15_unet_bf16()
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD1.5's UNet
    denoiser = UNetDenoiser(unet)
    config = DistillConfig(backbone="sd15", total_steps=8, teacher_grid_steps=4, batch_size=1, mixed_precision="bf16",
                           guidance_mode=guidance_mode, ema_decay=0.99 if guidance_mode == "cfg" else 0.0)
    distiller = FlashDistiller(denoiser, config)  # the recipe's rank 128, alpha 128, lr 1e-5
    distiller.sample_grid_index = lambda phase=None, generator=None: 3  # the last of K = 4: one teacher CFG evaluation

    lora = dict(denoiser.named_lora_parameters())
    assert sum(p.numel() for p in lora.values()) == SD15_LORA_PARAMETERS
    assert sum(p.numel() for p in distiller.discriminator.parameters()) == SD15_HEAD_PARAMETERS
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in denoiser.base_parameters())
    trainables = list(lora.values()) + list(distiller.discriminator.parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in trainables)

    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(1, 4, 8, 8, generator=g), Conditioning(torch.randn(1, 8, 768, generator=g)),
                  Conditioning(torch.randn(1, 8, 768, generator=g)))
    lora_b = {n: p.detach().clone() for n, p in lora.items() if "lora_B" in n}
    built = time.perf_counter()
    logs = distiller.train_step(batch)  # phase 0, iteration 0: a student update (distillation loss)
    stepped = time.perf_counter()
    assert logs["student_update"] == 1.0 and torch.isfinite(torch.tensor(logs["loss"]))
    moved = sum(int((lora[n] != before).sum()) for n, before in lora_b.items())
    # Adam's first step moves every lora_B entry with a non-zero gradient by ~lr (measured: 98.1 % of them).
    assert moved / sum(b.numel() for b in lora_b.values()) > 0.95
    states = [v for s in distiller.student_optimizer.state.values() for v in s.values() if v.ndim]
    assert sum(v.numel() for v in states) == 2 * SD15_LORA_PARAMETERS  # AdamW exp_avg + exp_avg_sq
    assert all(v.dtype == torch.float32 for v in states)
    assert all(p.dtype == torch.float32 for p in lora.values())  # still float32 after the update
    if guidance_mode == "cfg":  # the average: float32 beside the LoRA, after update 0 at the warm-up's d = 1/10
        ema = distiller.ema_lora
        assert sum(v.numel() for v in ema.values()) == SD15_LORA_PARAMETERS
        assert all(v.dtype == torch.float32 for v in ema.values())
        for name, before in lora_b.items():
            torch.testing.assert_close(ema[name], 0.1 * before + 0.9 * lora[name].detach())

    logs = distiller.train_step(batch)  # iteration 1: the discriminator head on the real mid block
    assert logs["discriminator_update"] == 1.0 and torch.isfinite(torch.tensor(logs["loss_discriminator"]))
    assert all(v.dtype == torch.float32 for s in distiller.discriminator_optimizer.state.values()
               for v in s.values() if v.ndim)
    print(f"full-size SD1.5 on CPU, guidance mode {guidance_mode}: build {built - started:.1f} s, student iteration {stepped - built:.1f} s, "
          f"discriminator iteration {time.perf_counter() - stepped:.1f} s")
