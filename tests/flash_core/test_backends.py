"""diffusers backends: every model family passes a real Flash training step; SD1.5 parameter counts.

Tiny configs of the real diffusers classes (UNet2DConditionModel for SD1.5 / SDXL, PixArtTransformer2DModel,
SD3Transformer2DModel) are built in the tests; the published-size SD1.5 UNet is built on the meta device.
"""

from __future__ import annotations

import pytest
import torch

from flash_core.backends.diffusers import (
    PixArtDenoiser,
    SD3Denoiser,
    UNetDenoiser,
    make_diffusers_denoiser,
)
from flash_core.denoiser import Conditioning, zero_conditioning
from flash_core.distill import Batch, DistillConfig, FlashDistiller, teacher_target, training_grid
from flash_core.losses import DiscriminatorHead
from flash_core.recipes import get_recipe
from flash_core.schedules import flow_teacher_sigmas, scaled_linear_alphas_cumprod

TEXT_DIM = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---- tiny models (also used by test_distill.py) --------------------------------------------------
def tiny_sd15_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=8,
    )


def tiny_sd15_batch(batch: int = 2, size: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    cond = Conditioning(torch.randn(batch, 5, TEXT_DIM, generator=g))
    empty_prompt = Conditioning(torch.randn(1, 5, TEXT_DIM, generator=g))
    return Batch(torch.randn(batch, 4, size, size, generator=g), cond, empty_prompt)


def tiny_sdxl() -> tuple[torch.nn.Module, Batch]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TEXT_DIM + 6 * 8, norm_num_groups=8,
    )
    g = torch.Generator().manual_seed(1)
    time_ids = torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]]).repeat(2, 1)
    cond = Conditioning(torch.randn(2, 5, TEXT_DIM, generator=g), pooled=torch.randn(2, TEXT_DIM, generator=g),
                        time_ids=time_ids)
    return unet, Batch(torch.randn(2, 4, 8, 8, generator=g), cond, zero_conditioning(cond[0]))


def tiny_pixart() -> tuple[torch.nn.Module, Batch]:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=TEXT_DIM, in_channels=4, cross_attention_dim=24, out_channels=8,
        use_additional_conditions=False,
    )
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    cond = Conditioning(torch.randn(2, 5, TEXT_DIM, generator=g), attention_mask=mask)
    uncond = Conditioning(torch.randn(1, 5, TEXT_DIM, generator=g), attention_mask=torch.ones(1, 5))
    return model, Batch(torch.randn(2, 4, 8, 8, generator=g), cond, uncond)


def tiny_sd3() -> tuple[torch.nn.Module, Batch]:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=TEXT_DIM, pooled_projection_dim=16, out_channels=4,
    )
    g = torch.Generator().manual_seed(3)
    cond = Conditioning(torch.randn(2, 5, TEXT_DIM, generator=g), pooled=torch.randn(2, 16, generator=g))
    negative = Conditioning(torch.randn(1, 5, TEXT_DIM, generator=g), pooled=torch.randn(1, 16, generator=g))
    return model, Batch(torch.randn(2, 4, 8, 8, generator=g), cond, negative)


def tiny_config(backbone: str, **overrides) -> DistillConfig:
    """4 phases of two iterations each (a student, then a discriminator update), K=4 teacher grid, a small LoRA."""
    settings = {"backbone": backbone, "total_steps": 8, "lora_rank": 4, "lora_alpha": 4, "teacher_grid_steps": 4}
    settings.update(overrides)
    return DistillConfig(**settings)


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


# ---- tests ---------------------------------------------------------------------------------------
def _train_one_step_in_last_phase(backbone: str, model: torch.nn.Module, batch: Batch):
    """One iteration of the last phase: the student's update, then the discriminator's, on the same batch."""
    denoiser = make_diffusers_denoiser(backbone, model)
    distiller = FlashDistiller(denoiser, tiny_config(backbone))
    distiller.step = 6  # last phase: distillation, adversarial and DMD losses all weighted > 0
    base, lora = snapshot(denoiser.base_parameters()), snapshot(distiller.student_params)
    head = snapshot(distiller.discriminator.parameters())
    logs = distiller.train_step(batch)
    for key in ("loss", "loss_distill", "loss_adversarial", "loss_dmd", "loss_discriminator"):
        assert torch.isfinite(torch.tensor(logs[key])), key
    assert (logs["student_update"], logs["discriminator_update"]) == (1.0, 1.0)
    assert logs["phase"] == 3 and distiller.step == 7
    after = distiller.student_params
    assert any(not torch.equal(a, b) for a, b in zip(lora, after)), "the LoRA did not train"
    for name, before, p in zip([n for n, _ in denoiser.named_lora_parameters()], lora, after):
        if "lora_B" in name:  # lora_B starts at 0 and receives the first gradient
            assert not torch.equal(before, p), name
    assert any(not torch.equal(a, b) for a, b in zip(head, distiller.discriminator.parameters())), "the head did not train"
    assert all(torch.equal(a, b) for a, b in zip(base, denoiser.base_parameters())), "teacher weights changed"
    assert all(p.grad is None for p in denoiser.base_parameters())
    return denoiser, distiller


def test_sd15_unet_training_step():
    denoiser, _ = _train_one_step_in_last_phase("sd15", tiny_sd15_unet(), tiny_sd15_batch())
    assert isinstance(denoiser, UNetDenoiser) and denoiser.prediction_type == "epsilon"
    features = denoiser.encoder_features(torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), tiny_sd15_batch().cond)
    assert features.shape == (2, 64, 4, 4)  # down path + mid block: last block width, one downsample


def test_sdxl_unet_with_added_conditions_training_step():
    unet, batch = tiny_sdxl()
    denoiser, _ = _train_one_step_in_last_phase("sdxl", unet, batch)
    assert torch.equal(batch.uncond.time_ids, batch.cond.time_ids[:1])  # zeroed text, size ids kept
    with pytest.raises(ValueError, match="pooled"):
        denoiser.predict(batch.latents, torch.tensor([10.0]), Conditioning(batch.cond.encoder_hidden_states))
    # The added conditions reach the network: other pooled embeds give another output.
    t = torch.tensor([500.0, 500.0])
    other = Conditioning(batch.cond.encoder_hidden_states, pooled=-batch.cond.pooled, time_ids=batch.cond.time_ids)
    with torch.no_grad():
        same = torch.allclose(denoiser.predict(batch.latents, t, batch.cond), denoiser.predict(batch.latents, t, other))
    assert not same


def test_pixart_training_step():
    model, batch = tiny_pixart()
    denoiser, _ = _train_one_step_in_last_phase("pixart", model, batch)
    assert isinstance(denoiser, PixArtDenoiser)
    with torch.no_grad():
        out = denoiser.predict(batch.latents, torch.tensor([500.0, 500.0]), batch.cond)
        features = denoiser.encoder_features(batch.latents, torch.tensor([500.0, 500.0]), batch.cond)
    assert out.shape == batch.latents.shape  # learned-sigma channels dropped
    assert features.shape == (2, 8, 8, 8) and torch.equal(features[:, :4], out)  # full final output
    # PixArt's DDPM schedule is "linear" 1e-4..2e-2.
    assert abs(float(denoiser.alphas_cumprod[0]) - (1 - 1e-4)) < 1e-7


def test_sd3_flow_training_step():
    model, batch = tiny_sd3()
    denoiser, _ = _train_one_step_in_last_phase("sd3", model, batch)
    assert isinstance(denoiser, SD3Denoiser) and denoiser.is_flow and denoiser.alphas_cumprod is None


@pytest.mark.parametrize("student_steps", [None, 4])
def test_sd3_teacher_target_is_flow_euler_on_the_shifted_grid(student_steps):
    """Independent reference: CFG Euler steps x += (s_next - s) v on the K-step flow grid + [0].

    Training (student_steps=4) and previews (None) both solve on schedules.flow_teacher_sigmas(K), the
    reference's grid (diffusers' shift-3 set_timesteps(K)).
    """
    model, batch = tiny_sd3()
    denoiser = SD3Denoiser(model)
    grid_steps, start, w = 8, 2, 7.5
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    uncond = batch.uncond.expand_to(2)
    grid = flow_teacher_sigmas(grid_steps)
    sigmas = grid + [0.0]
    with torch.no_grad():
        x = z.clone()
        for s, s_next in zip(sigmas[start:-1], sigmas[start + 1:]):
            t = torch.full((2,), s * 1000)
            v = w * denoiser.predict(x, t, batch.cond) + (1 - w) * denoiser.predict(x, t, uncond)
            x = x + (s_next - s) * v
        target = teacher_target(denoiser, z, start, batch.cond, batch.uncond, w, grid_steps, student_steps)
    assert torch.allclose(target, x, atol=1e-5, rtol=1e-4)
    assert training_grid(denoiser, grid_steps, student_steps) == pytest.approx([g * 1000 for g in grid])


def test_published_sd15_parameter_counts_on_meta_device():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
        )
        denoiser = UNetDenoiser(unet)
        recipe = get_recipe("sd15")
        denoiser.add_lora(recipe.lora_rank, recipe.lora_alpha, recipe.lora_targets)
        head = DiscriminatorHead(recipe.discriminator_head, denoiser.encoder_feature_channels)
    assert denoiser.encoder_feature_channels == 1280
    assert sum(p.numel() for p in denoiser.lora_parameters()) == 25_509_888
    assert sum(p.numel() for p in head.parameters()) == 870_720
    assert all(p.requires_grad and p.dtype == torch.float32 for p in denoiser.lora_parameters())
    assert not any(p.requires_grad for p in denoiser.base_parameters())


@pytest.mark.parametrize("backbone", ["sd15", "pixart", "sd3"])
def test_lora_init_follows_the_recipe(backbone):
    """UNets: lora_A ~ N(0, 1/r^2); DiTs: peft's default kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
    lora_B = 0; each module drawn from (seed, module path), so the start is deterministic."""
    import math

    from flash_core.denoiser import _module_seed

    network = TINY_NETWORKS[backbone]()
    distiller = FlashDistiller(make_diffusers_denoiser(backbone, network), tiny_config(backbone, seed=3))
    denoiser, rank = distiller.denoiser, distiller.recipe.lora_rank
    assert distiller.recipe.lora_init == ("gaussian" if backbone == "sd15" else "kaiming_uniform")
    lora_a = {n: p for n, p in denoiser.named_lora_parameters() if ".lora_A." in n}
    assert lora_a and all(not p.any() for n, p in denoiser.named_lora_parameters() if ".lora_B." in n)
    for name, param in lora_a.items():
        generator = torch.Generator().manual_seed(_module_seed(3, denoiser.lora_path(name.split(".lora_")[0])))
        if backbone == "sd15":
            expected = torch.randn(param.shape, generator=generator) / rank  # std 1/r
        else:
            expected = torch.nn.init.kaiming_uniform_(torch.empty(param.shape), a=math.sqrt(5), generator=generator)
            fan_in = param[0].numel()  # in_features (Linear) or in_channels * k * k (Conv2d, e.g. pos_embed.proj)
            assert param.abs().max() <= 1 / math.sqrt(fan_in)  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert torch.equal(param, expected), name
    if backbone != "sd15":
        values = torch.cat([p.detach().flatten() * math.sqrt(p[0].numel()) for p in lora_a.values()])  # U(-1, 1)
        assert abs(float(values.std()) - 1 / math.sqrt(3)) < 0.02  # the uniform's std, not the Gaussian 1/r
    again = make_diffusers_denoiser(backbone, TINY_NETWORKS[backbone]())
    again.add_lora(rank, distiller.recipe.lora_alpha, distiller.recipe.lora_targets, seed=3,
                   init=distiller.recipe.lora_init)
    assert all(torch.equal(a, b) for a, b in zip(denoiser.lora_parameters(), again.lora_parameters()))
    with pytest.raises(ValueError, match="LoRA init"):
        make_diffusers_denoiser(backbone, TINY_NETWORKS[backbone]()).add_lora(4, 4, ("to_q",), init="orthogonal")


def test_conditioning_helpers():
    cond = Conditioning(torch.arange(6.0).reshape(3, 2), pooled=torch.arange(3.0).reshape(3, 1),
                        extra={"resolution": torch.arange(3.0)})
    assert cond.batch_size == 3
    assert torch.equal(cond[1].encoder_hidden_states, torch.tensor([[2.0, 3.0]]))
    assert torch.equal(cond[1].extra["resolution"], torch.tensor([1.0]))
    both = Conditioning.cat([cond[0].expand_to(3), cond])
    assert both.batch_size == 6 and torch.equal(both.pooled[:3].flatten(), torch.zeros(3))
    assert torch.equal(zero_conditioning(cond).pooled, torch.zeros(3, 1))
    with pytest.raises(ValueError, match="some conditionings"):
        Conditioning.cat([cond, Conditioning(torch.zeros(1, 2))])
    with pytest.raises(KeyError, match="sd15"):
        make_diffusers_denoiser("flux", torch.nn.Linear(1, 1))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_output_conversions_recover_x0_and_eps(prediction_type):
    from flash_core.denoiser import add_noise, noise_coefficients, output_to_x0_eps

    denoiser = UNetDenoiser.__new__(UNetDenoiser)  # conversions only need the schedule and the type
    denoiser.prediction_type = prediction_type
    denoiser.alphas_cumprod = None if prediction_type == "flow" else scaled_linear_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    t = torch.tensor([249.0, 749.0])
    alpha, sigma = noise_coefficients(denoiser, t)
    x_t = add_noise(denoiser, x0, eps, t)
    raw = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "flow": eps - x0}[prediction_type]
    got_x0, got_eps = output_to_x0_eps(denoiser, raw, x_t, t)
    assert torch.allclose(got_x0, x0, atol=1e-5) and torch.allclose(got_eps, eps, atol=1e-5)
    if prediction_type == "flow":
        assert torch.allclose(x_t[0], 0.249 * eps[0] + 0.751 * x0[0], atol=1e-6)  # sigma eps + (1-sigma) x0
    else:
        abar = scaled_linear_alphas_cumprod()[249]
        assert torch.allclose(x_t[0], abar.sqrt().float() * x0[0] + (1 - abar).sqrt().float() * eps[0], atol=1e-6)


# ---- the backbone registry -------------------------------------------------------------------------
TINY_NETWORKS = {"sd15": lambda: tiny_sd15_unet(), "sdxl": lambda: tiny_sdxl()[0], "pixart": lambda: tiny_pixart()[0],
                 "sd3": lambda: tiny_sd3()[0]}


@pytest.mark.parametrize("name", list(TINY_NETWORKS))
def test_registry_facts_match_the_networks_and_recipes_they_describe(name):
    """Each registered backbone has a recipe and a Denoiser; its network class is the one the tiny model is, and
    the Denoiser over it predicts what the registry says (what the files' flash.prediction_type records)."""
    from flash_core.backbones import BACKBONES, get_backbone
    from flash_core.backends.diffusers import DENOISERS
    from flash_core.recipes import RECIPES

    assert list(BACKBONES) == list(RECIPES) == list(DENOISERS) == list(TINY_NETWORKS)
    backbone = get_backbone(name)
    network = TINY_NETWORKS[name]()
    assert type(network) is backbone.network()
    assert make_diffusers_denoiser(name, network).prediction_type == backbone.prediction_type
    assert backbone.is_dit == (name in ("pixart", "sd3"))
    with pytest.raises(KeyError, match="flash_core/backbones.py"):
        get_backbone("flux")
