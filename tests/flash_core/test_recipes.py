"""Per-backbone recipe numbers (flash_core/recipes.py) and the DistillConfig overrides."""

from __future__ import annotations

from dataclasses import replace

import pytest

from flash_core import schedules
from flash_core.distill import DistillConfig
from flash_core.losses import DiscriminatorHeadSpec
from flash_core.recipes import RECIPES, Recipe, get_recipe, lora_alpha_for_rank

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def test_known_backbones():
    assert set(RECIPES) == {"sd15", "sdxl", "pixart", "sd3"}
    for name, recipe in RECIPES.items():
        assert recipe.backbone == name
        assert recipe.phase_mode_weights == schedules.PHASE_MODE_WEIGHTS
        assert recipe.distill_weights == (1.0, 1.0, 1.0, 1.0)
        assert recipe.dmd_weights == (0.0, 0.3, 0.5, 0.7)
        assert recipe.adversarial_timesteps == (10, 250, 500, 750)
        assert recipe.lr == 1e-5
        assert recipe.student_steps == 4
        assert recipe.num_phases == 4


def test_sd15_recipe():
    r = get_recipe("sd15")
    assert (r.lora_rank, r.lora_alpha, r.lora_targets) == (128, 128, UNET_TARGETS)
    assert r.guidance_range == (3.0, 13.0)
    assert r.teacher_grid_steps == 32
    assert r.batch_size == 4
    assert r.uncond == "empty_prompt"
    assert r.adversarial_weights == (0.0, 0.1, 0.2, 0.3)
    assert r.discriminator_head == DiscriminatorHeadSpec("sd15", feature_dim=64, num_blocks=1)  # 870,720 on 1280 ch
    assert r.lora_init == "gaussian"


def test_sdxl_recipe():
    r = get_recipe("sdxl")
    assert (r.lora_rank, r.lora_alpha, r.lora_targets) == (64, 64, UNET_TARGETS)
    assert (r.guidance_range, r.teacher_grid_steps, r.batch_size, r.uncond) == ((3.0, 13.0), 32, 2, "zeros")
    assert r.adversarial_weights == (0.0, 0.1, 0.2, 0.3)
    assert r.discriminator_head == DiscriminatorHeadSpec("deep", feature_dim=256, num_blocks=2)  # 15,748,096
    assert r.lora_init == "gaussian"


def test_dit_recipes():
    pixart, sd3 = get_recipe("pixart"), get_recipe("sd3")
    for r in (pixart, sd3):
        assert (r.lora_rank, r.lora_alpha, r.batch_size) == (64, 8, 2)
        assert {"to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "proj", "linear", "linear_1", "linear_2"} == set(r.lora_targets)
    assert (pixart.guidance_range, pixart.teacher_grid_steps, pixart.uncond) == ((2.0, 9.0), 16, "empty_prompt")
    assert pixart.adversarial_weights == (0.0, 0.05, 0.1, 0.2)
    assert (sd3.guidance_range, sd3.teacher_grid_steps, sd3.uncond) == ((7.0, 13.0), 32, "negative_prompt")
    assert sd3.adversarial_weights == (0.0, 0.1, 0.3, 0.5)
    assert sd3.discriminator_head == DiscriminatorHeadSpec("deep", feature_dim=64, num_blocks=3)  # 2,778,880
    assert pixart.discriminator_head == DiscriminatorHeadSpec("deep", feature_dim=64, num_blocks=4,
                                                              drop_learned_sigma=True)  # 11,165,440 on 4 channels
    assert pixart.lora_init == sd3.lora_init == "kaiming_uniform"  # peft's default, as the reference's DiTs


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(KeyError) as err:
        get_recipe("flux")
    for name in ("sd15", "sdxl", "pixart", "sd3"):
        assert name in str(err.value)


def test_recipe_validates_per_phase_weights():
    with pytest.raises(ValueError, match="one weight per phase"):
        Recipe(backbone="x", lora_rank=4, lora_alpha=4, lora_targets=("to_q",), guidance_range=(1.0, 2.0),
               teacher_grid_steps=8, batch_size=1, uncond="zeros", adversarial_weights=(0.0, 0.1),
               dmd_weights=(0.0, 0.3, 0.5, 0.7))
    with pytest.raises(ValueError, match="uncond"):
        Recipe(backbone="x", lora_rank=4, lora_alpha=4, lora_targets=("to_q",), guidance_range=(1.0, 2.0),
               teacher_grid_steps=8, batch_size=1, uncond="nothing", adversarial_weights=(0.0,) * 4,
               dmd_weights=(0.0,) * 4)
    with pytest.raises(ValueError, match="lora_init must be one of"):
        replace(get_recipe("sd15"), lora_init="orthogonal")


def test_config_overrides_recipe():
    config = DistillConfig(backbone="sd15", lora_rank=8, lora_alpha=16, lr=1e-4, guidance_range=[1, 2],
                           teacher_grid_steps=8, dmd_weights=[0, 0, 0, 1])
    r = config.recipe()
    assert (r.lora_rank, r.lora_alpha, r.lr, r.guidance_range, r.teacher_grid_steps) == (8, 16, 1e-4, (1, 2), 8)
    assert r.dmd_weights == (0.0, 0.0, 0.0, 1.0)
    assert r.adversarial_weights == get_recipe("sd15").adversarial_weights  # not overridden
    assert get_recipe("sd15").lora_rank == 128  # the published recipe is untouched


def test_config_rejects_bad_options():
    with pytest.raises(ValueError, match="distill_loss"):
        DistillConfig(distill_loss="l3")
    with pytest.raises(ValueError, match="mixed_precision"):
        DistillConfig(mixed_precision="fp16")
    with pytest.raises(ValueError, match=r"teacher_grid_steps \(K = 30\) must be a multiple of the 4-step"):
        DistillConfig(teacher_grid_steps=30)  # the mixture's modes must sit on the K grid
    with pytest.raises(ValueError, match="one weight per phase"):
        DistillConfig(dmd_weights=[0.1, 0.2])  # a bad override fails when the config is made
    with pytest.raises(ValueError, match="dmd_weights needs one weight per phase .4., each >= 0"):
        DistillConfig(dmd_weights=[0.1, -0.2, 0.3, 0.4])  # the CLI's config takes loss weights unparsed


@pytest.mark.parametrize("backbone,rank,alpha", [("sd15", 32, 32), ("sdxl", 16, 16), ("pixart", 32, 4), ("sd3", 4, 0.5),
                                                 ("sd15", 128, 128)])
def test_a_rank_without_alpha_keeps_the_recipes_lora_scale(backbone, rank, alpha):
    """One rule for node and CLI: alpha = rank x recipe alpha / recipe rank (a LoRA of any rank keeps the recipe's
    scale); an explicit alpha wins."""
    recipe = DistillConfig(backbone=backbone, lora_rank=rank).recipe()
    assert (recipe.lora_rank, recipe.lora_alpha) == (rank, alpha)
    base = get_recipe(backbone)
    assert recipe.lora_alpha / recipe.lora_rank == base.lora_alpha / base.lora_rank == lora_alpha_for_rank(base, 1)
    assert DistillConfig(backbone=backbone, lora_rank=rank, lora_alpha=7).recipe().lora_alpha == 7
