"""Guidance mode "cfg" (issue 24) on a tiny SD1.5 UNet: the prompt pairs it draws, the student's own CFG in training
and sampling, DMD at the batch's w, a target cache of the mode equal to the live run, and the mode in the LoRA's
metadata, read back by the sampler's settings."""

from __future__ import annotations

import pytest
import torch

from flash_core import distill, run, schedules, target_cache
from flash_core.backends.diffusers import UNetDenoiser
from flash_core.denoiser import Conditioning
from flash_core.distill import DistillConfig, FlashDistiller, guidance_pair, target_inputs
from flash_core.draws import EMPTY_POSITIVE_SHARE, PROMPT_NEGATIVE_SHARE
from flash_core.lora_formats.metadata import lora_metadata, recommended_cfg, sampling_settings
from tests.flash_core.test_backends import tiny_config, tiny_sd15_batch, tiny_sd15_unet
from tests.flash_core.test_distill import randomise_lora
from tests.flash_core.test_run import tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SHAPE = (8, 4, 8, 8)


def cfg_distiller(**overrides) -> FlashDistiller:
    return FlashDistiller(UNetDenoiser(tiny_sd15_unet()), tiny_config("sd15", guidance_mode="cfg", **overrides))


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="guidance_mode must be one of"):
        DistillConfig(guidance_mode="nag")


def test_the_mode_draws_prompt_pairs_and_a_w_per_sample_after_the_baked_draws():
    baked = tiny_config("sd15", guidance_range=(1.0, 8.0))
    cfg = tiny_config("sd15", guidance_mode="cfg", guidance_range=(1.0, 8.0))
    empty_positive = prompt_negative = 0
    for step in range(200):
        a, b = target_inputs(baked, step, 0, SHAPE), target_inputs(cfg, step, 0, SHAPE)
        assert a.positive_rows is None and a.negative_rows is None  # baked: the batch's prompts, the empty prompt
        assert (a.grid_index, a.guidance) == (b.grid_index, b.guidance) and torch.equal(a.noise, b.noise)
        size = SHAPE[0]
        assert all(p in (i, size + i) for i, p in enumerate(b.positive_rows))  # own prompt or empty
        assert all(n < size or n == size + i for i, n in enumerate(b.negative_rows))  # a batch prompt or empty
        assert a.sample_guidances is None and len(b.sample_guidances) == size  # "cfg": one w per sample
        assert all(cfg.guidance_range[0] <= w <= cfg.guidance_range[1] for w in b.sample_guidances)
        empty_positive += sum(p >= size for p in b.positive_rows)
        prompt_negative += sum(n < size for n in b.negative_rows)
    assert empty_positive / 1600 == pytest.approx(EMPTY_POSITIVE_SHARE, abs=0.03)
    assert prompt_negative / 1600 == pytest.approx(PROMPT_NEGATIVE_SHARE, abs=0.04)


def test_guidance_pair_takes_the_drawn_rows():
    cond = Conditioning(torch.arange(3.0).reshape(3, 1, 1))
    empty = Conditioning(torch.full((1, 1, 1), -1.0))
    inputs = distill.TargetInputs(0, 3.0, torch.zeros(3), positive_rows=(0, 4, 2), negative_rows=(3, 0, 1))
    positive, negative = guidance_pair(inputs, cond, empty)
    assert positive.encoder_hidden_states.flatten().tolist() == [0.0, -1.0, 2.0]
    assert negative.encoder_hidden_states.flatten().tolist() == [-1.0, 0.0, 1.0]
    baked = distill.TargetInputs(0, 3.0, torch.zeros(3))
    positive, negative = guidance_pair(baked, cond, empty)
    assert positive is cond and negative.encoder_hidden_states.flatten().tolist() == [-1.0] * 3


def test_the_students_output_is_its_own_cfg():
    distiller = cfg_distiller()
    randomise_lora(distiller)
    batch = tiny_sd15_batch()
    z_t, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.full((2,), 499.0)
    negative = batch.uncond.expand_to(2)
    guided = distiller.student_x0(z_t, t, batch.cond, negative, 5.0)
    unet = distiller.denoiser.unet  # the LoRA is active on it outside the teacher context
    with torch.no_grad():
        eps_c = unet(z_t, t, encoder_hidden_states=batch.cond.encoder_hidden_states).sample
        eps_n = unet(z_t, t, encoder_hidden_states=negative.encoder_hidden_states).sample
    by_hand = distiller.student_x0(z_t, t, batch.cond)  # one call, to get the boundary of a known output
    eps = 5.0 * eps_c - 4.0 * eps_n  # eps = w eps_c + (1-w) eps_n
    abar = distiller.denoiser.alphas_cumprod[499].float()
    x0 = (z_t - (1 - abar).sqrt() * eps) / abar.sqrt()
    from flash_core.sampling import lcm_boundary_x0

    assert torch.allclose(guided, lcm_boundary_x0(x0, z_t, t), atol=1e-4)
    assert not torch.allclose(guided, by_hand, atol=1e-3)


def test_the_mode_trains_every_phase_with_finite_losses_and_moves_the_lora():
    distiller = cfg_distiller(total_steps=8)
    before = {k: v.clone() for k, v in distiller.lora_state_dict().items()}
    for step in range(8):
        logs = distiller.train_step(tiny_sd15_batch(seed=step))
        assert all(torch.isfinite(torch.tensor(v)) for k, v in logs.items() if k.startswith("loss"))
    assert "loss_dmd" in logs and "loss_adversarial" in logs
    assert any(not torch.equal(before[k], v) for k, v in distiller.lora_state_dict().items())


@pytest.mark.parametrize("mode", ["baked", "cfg"])
def test_the_discriminators_real_sample_is_the_data_or_in_mode_cfg_the_teachers_guided_target(mode, monkeypatch):
    distiller = FlashDistiller(UNetDenoiser(tiny_sd15_unet()), tiny_config("sd15", guidance_mode=mode, total_steps=4))
    distiller.step = 2  # phase 2: the adversarial loss is on
    targets, reals = [], []
    solve, step = distill.teacher_target, distiller._discriminator_step
    monkeypatch.setattr(distill, "teacher_target", lambda *a, **k: targets.append(solve(*a, **k)) or targets[-1])
    monkeypatch.setattr(distiller, "_discriminator_step", lambda real, *a: reals.append(real) or step(real, *a))
    batch = tiny_sd15_batch()
    distiller.train_step(batch)
    expected = targets[0].float() if mode == "cfg" else batch.latents  # "cfg": real = w-guided, negative included
    assert torch.equal(reals[0], expected)
    assert not torch.equal(targets[0].float(), batch.latents)


def test_the_mode_refuses_alternate_updates():
    with pytest.raises(ValueError, match="set alternate_updates to false"):
        DistillConfig(guidance_mode="cfg", alternate_updates=True)


def test_dmd_of_the_mode_vanishes_when_student_equals_teacher_at_any_w():
    distiller = cfg_distiller(guidance_range=(2.0, 9.0))
    batch = tiny_sd15_batch()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    # both scores are CFG at the same w and pair: LoRA B = 0 makes them equal (in mode baked they differ unless w = 1)
    assert float(distiller.distribution_matching_loss(x, batch.cond, batch.uncond, 7.0)) < 1e-10
    randomise_lora(distiller)
    assert float(distiller.distribution_matching_loss(x, batch.cond, batch.uncond, 7.0)) > 1e-6


def test_student_sample_with_a_negative_runs_cfg_at_each_step_re_noised_deterministically():
    """The mode's sampler (sampling.renoise_rule): CFG at each step, the re-noise the noise z_t implies (DDIM eta 0),
    so the generator changes nothing; renoise="fresh" gives today's LCM-style sampler back."""
    from flash_core import sampling

    distiller = cfg_distiller()
    batch = tiny_sd15_batch()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = distiller.student_sample(noise, batch.cond, 2, torch.Generator().manual_seed(1), batch.uncond, 4.0)
    unet, empty = distiller.denoiser.unet, batch.uncond.encoder_hidden_states.expand(2, -1, -1)

    def cfg(x, t):
        ts = torch.full((2,), float(t))
        c = unet(x, ts, encoder_hidden_states=batch.cond.encoder_hidden_states).sample
        u = unet(x, ts, encoder_hidden_states=empty).sample
        return 4.0 * c - 3.0 * u

    with torch.no_grad():
        reference = sampling.sample_discrete(cfg, noise, schedules.trailing_timesteps(2),
                                             schedules.scaled_linear_alphas_cumprod(), renoise="deterministic")
        fresh = sampling.sample_discrete(cfg, noise, schedules.trailing_timesteps(2),
                                         schedules.scaled_linear_alphas_cumprod(), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, reference, atol=1e-4)
    assert torch.equal(out, distiller.student_sample(noise, batch.cond, 2, torch.Generator().manual_seed(2), batch.uncond, 4.0))
    assert not torch.allclose(out, fresh, atol=1e-3)
    assert torch.allclose(fresh, distiller.student_sample(noise, batch.cond, 2, torch.Generator().manual_seed(1),
                                                          batch.uncond, 4.0, renoise="fresh"), atol=1e-4)
    plain = distiller.student_sample(noise, batch.cond, 2, torch.Generator().manual_seed(1))
    assert not torch.allclose(out, plain, atol=1e-3)


def test_a_cache_of_the_mode_equals_the_live_run(tmp_path, monkeypatch):
    settings = {"total_steps": 4, "batch_size": 2, "lr": 1e-3, "guidance_mode": "cfg"}
    teacher = UNetDenoiser(tiny_sd15_unet())
    cache = target_cache.build_target_cache(tmp_path / "targets", teacher, tiny_config("sd15", **settings), tiny_dataset())
    assert cache.manifest["guidance_mode"] == "cfg"
    assert "guidance_mode" not in target_cache.cache_manifest(tiny_config("sd15"), "t", "d")  # older caches still fit
    live = run.Run(FlashDistiller(UNetDenoiser(tiny_sd15_unet()), tiny_config("sd15", **settings)), tiny_dataset())
    live.train()

    def no_solve(*args, **kwargs):
        raise AssertionError("the cached run solved a teacher target")

    monkeypatch.setattr(distill, "teacher_target", no_solve)
    cached = run.Run(FlashDistiller(UNetDenoiser(tiny_sd15_unet()), tiny_config("sd15", **settings)), tiny_dataset(),
                     target_cache=cache)
    cached.train()
    for a, b in zip(live.history, cached.history):
        assert a["loss_distill"] == pytest.approx(b["loss_distill"], rel=1e-4, abs=1e-6)
    saved = cache.manifest
    baked = target_cache.cache_manifest(tiny_config("sd15", **{**settings, "guidance_mode": "baked"}),
                                        saved["teacher_fingerprint"], saved["data_fingerprint"])
    assert [d.split(":")[0] for d in target_cache.manifest_differences(saved, baked)] == [
        "guidance_mode", "prompt_pair_shares"]
    # a cache of the mode drawn with other prompt-pair shares (or before they were recorded) holds other pairs under
    # the same guidance values: it is refused, naming the key, not trained on
    older = {k: v for k, v in saved.items() if k != "prompt_pair_shares"}
    assert target_cache.manifest_differences(older, saved) == [
        f"prompt_pair_shares: cache None, run {[EMPTY_POSITIVE_SHARE, PROMPT_NEGATIVE_SHARE]!r}"]


def test_the_mode_is_a_run_setting_a_resume_compares():
    cfg, baked = run.run_settings(tiny_config("sd15", guidance_mode="cfg")), run.run_settings(tiny_config("sd15"))
    assert cfg["guidance_mode"] == "cfg" and baked["guidance_mode"] == "baked"
    # and the shares its prompt pairs are drawn with: a checkpoint of other shares (or none recorded) is a difference
    assert cfg["prompt_pair_shares"] == [EMPTY_POSITIVE_SHARE, PROMPT_NEGATIVE_SHARE] and "prompt_pair_shares" not in baked


@pytest.mark.parametrize("mode,cfg", [("baked", 1.0), ("cfg", 8.0)])
def test_the_lora_records_the_mode_and_the_sampler_reads_it(mode, cfg):
    distiller = FlashDistiller(UNetDenoiser(tiny_sd15_unet()), DistillConfig(backbone="sd15", guidance_mode=mode,
                                                                             teacher_grid_steps=4, lora_rank=4))
    metadata = lora_metadata(distiller, {"backbone": "sd15"}, [], base_model="SD15")
    assert metadata["flash.guidance_mode"] == mode and metadata["flash.guidance_range"] == "[3.0, 13.0]"
    settings = sampling_settings(metadata)
    assert (settings.guidance_mode, settings.cfg, settings.guidance_range) == (mode, cfg, (3.0, 13.0))
    assert ("two model calls" in metadata["flash.sampling"]) == (mode == "cfg")


def test_recommended_cfg_is_the_middle_of_the_range_to_half_a_step():
    assert recommended_cfg("cfg", (1.0, 8.0)) == 4.5 and recommended_cfg("cfg", (2.0, 4.0)) == 3.0
    assert recommended_cfg("baked", (3.0, 13.0)) == 1.0


@pytest.mark.parametrize("key,value,why", [
    ("flash.guidance_mode", "nag", "is not one of"),
    ("flash.guidance_range", "[8, 2]", "is not a range"),
    ("flash.guidance_range", "[1, NaN]", "is not a range"),
])
def test_a_broken_mode_or_range_is_refused_naming_the_key(key, value, why):
    base = {"flash.format_version": "1", "flash.recommended_steps": "4", "flash.guidance_mode": "cfg",
            "flash.guidance_range": "[1, 8]"}
    with pytest.raises(ValueError, match=f"'{key}'.*{why}"):
        sampling_settings({**base, key: value}, source="x.safetensors")
    assert sampling_settings({k: v for k, v in base.items() if k != "flash.guidance_mode"}).guidance_mode == "baked"
