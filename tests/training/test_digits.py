"""The digits corpus, its evaluator (accuracy / Fréchet distance) and the teacher pipeline folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flash_core.files import LOCK_NAME, staging_folder
from training.digits import data
from training.digits.evaluator import frechet_distance_from_features, load_evaluator
from training.digits.teacher import (
    TeacherConfig,
    is_complete,
    load_tokenizer,
    train_teacher,
)


# ---- data ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def splits():
    return data.load_splits()


def test_splits_shapes_range_and_stratified_labels(splits):
    train, held_out = splits
    assert len(train) + len(held_out) == 1797
    assert len(held_out) == 360
    for split in (train, held_out):
        assert split.images.shape[1:] == (3, data.IMAGE_SIZE, data.IMAGE_SIZE)
        assert split.images.dtype == torch.float32
        assert split.images.min() >= -1.0 and split.images.max() <= 1.0
        assert torch.equal(split.images[:, 0], split.images[:, 2])  # grey RGB
        assert set(split.digits.tolist()) == set(range(10))
    # stratified: every digit is ~20 % held out
    for d in range(10):
        fraction = float((held_out.digits == d).sum()) / float((held_out.digits == d).sum() + (train.digits == d).sum())
        assert 0.17 < fraction < 0.23
    # fixed seed: the same split twice
    again, _ = data.load_splits()
    assert torch.equal(again.digits, train.digits) and torch.equal(again.images, train.images)


def test_background_is_black_and_ink_is_bright(splits):
    train, _ = splits
    corners = train.images[:, :, 0, 0]
    assert float(corners.mean()) < -0.9  # scikit-learn digits: 0 = background
    assert float(train.images.amax(dim=(1, 2, 3)).mean()) > 0.8


def test_prompts_name_the_digit():
    assert data.canonical_prompt(7) == "a handwritten digit seven"
    rng = np.random.default_rng(0)
    seen = set()
    for d, word in enumerate(data.DIGIT_WORDS):
        for _ in range(20):
            prompt = data.training_prompt(d, rng)
            assert word in prompt.split(" ")
            seen.add(prompt.replace(word, "{word}"))
    assert seen == set(data.PROMPT_TEMPLATES)


def test_uint8_round_trip(splits):
    images = splits[1].images[:5]
    back = data.from_uint8(data.to_uint8(images))
    assert back.shape == images.shape
    assert float((back - images).abs().max()) <= 1.0 / 127.5 + 1e-6


# ---- evaluator ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    return load_evaluator(cache_dir=tmp_path_factory.mktemp("classifier"))


def test_classifier_reads_held_out_digits_and_not_noise(evaluator, splits):
    _, held_out = splits
    assert evaluator.held_out_accuracy > 0.95
    assert evaluator.accuracy(held_out.images, held_out.digits) > 0.9
    noise = torch.rand(held_out.images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert evaluator.accuracy(noise, held_out.digits) < 0.3  # chance is 0.1
    # wrong labels are read as wrong
    assert evaluator.accuracy(held_out.images, (held_out.digits + 1) % 10) < 0.1


def test_classifier_cache_reloads_the_same_model(evaluator, splits, tmp_path_factory):
    folder = tmp_path_factory.getbasetemp()
    cached = [p for p in folder.rglob("classifier-v*.safetensors")]
    assert cached, "the classifier was not cached as safetensors"
    reloaded = load_evaluator(cache_dir=cached[0].parent)
    images = splits[1].images[:50]
    assert np.allclose(reloaded.features(images), evaluator.features(images))


def test_frechet_distance_zero_for_same_set_larger_for_noise(evaluator, splits):
    train, held_out = splits
    assert evaluator.frechet_distance(held_out.images, held_out.images) < 1e-6
    real_vs_real = evaluator.frechet_distance(train.images[:360], held_out.images)
    noise = torch.rand(held_out.images.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise_vs_real = evaluator.frechet_distance(noise, held_out.images)
    blurred = torch.nn.functional.avg_pool2d(held_out.images, 3, 1, 1)
    assert noise_vs_real > 10 * real_vs_real
    assert real_vs_real < evaluator.frechet_distance(blurred, held_out.images) < noise_vs_real


def test_frechet_formula_on_known_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 3))
    b = rng.standard_normal((20000, 3)) * 2.0 + np.array([1.0, 0.0, 0.0])
    # N(0, I) vs N(m, 4I): ||m||^2 + Tr(I + 4I - 2*2I) = 1 + 3
    assert frechet_distance_from_features(a, b) == pytest.approx(4.0, rel=0.05)


# ---- teacher pipeline folder --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "pipe"
    config = TeacherConfig(steps=3, vae_steps=2, text_steps=3, batch_size=8, seed=0)
    train_teacher(out, config)
    return out, config


def test_teacher_folder_is_a_loadable_sd_pipeline(tiny_teacher, monkeypatch):
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, _ = tiny_teacher
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / sub).is_dir(), sub
    assert not staging_folder(out).exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    sched = pipe.scheduler.config
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end, sched.num_train_timesteps) == (
        "scaled_linear", 0.00085, 0.012, 1000)
    assert sched.prediction_type == "epsilon"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels == 4
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the data, not SD's constant

    pipe.set_progress_bar_config(disable=True)
    image = pipe("a handwritten digit three", height=16, width=16, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def test_teacher_tokenizer_is_comfyuis_sd1_clip_tokenizer(tiny_teacher):
    from transformers import CLIPTokenizer

    out, _ = tiny_teacher
    saved = CLIPTokenizer.from_pretrained(str(out / "tokenizer"), local_files_only=True)
    reference = load_tokenizer()
    assert len(saved) == 49408 and saved.model_max_length == 77
    prompts = [data.canonical_prompt(d) for d in range(10)] + ["the handwritten number four", ""]
    for prompt in prompts:
        ids = saved(prompt, padding="max_length", max_length=77).input_ids
        assert ids == reference(prompt, padding="max_length", max_length=77).input_ids
        assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 77
        assert saved.decode(ids, skip_special_tokens=True).strip() == prompt
    assert saved("a handwritten digit seven").input_ids[1:-1] == [320, 35192, 27472, 5757]


def test_teacher_cache_is_reused_and_keyed_on_config(tiny_teacher):
    out, config = tiny_teacher
    assert is_complete(out, config)
    assert not is_complete(out, TeacherConfig(steps=4, vae_steps=2, text_steps=3, batch_size=8, seed=0))
    before = (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    train_teacher(out, config)  # complete: nothing retrained
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before
    info = json.loads((out / "flash_digits_teacher.json").read_text())
    assert info["config"]["steps"] == 3


def test_retraining_replaces_the_teacher_folder_whole(tiny_teacher, tmp_path):
    import shutil

    out = tmp_path / "pipe"
    shutil.copytree(tiny_teacher[0], out)
    (out / "stale.txt").write_text("from the previous teacher")
    other = TeacherConfig(steps=4, vae_steps=2, text_steps=3, batch_size=8, seed=0)
    train_teacher(out, other)
    assert is_complete(out, other) and not (out / "stale.txt").exists()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != LOCK_NAME)  # the build lock's file may stay
    assert left == ["pipe"]  # no staging or old folder left


# ---- benchmark plumbing -------------------------------------------------------------------------
def test_distillation_batches_match_the_pipeline_encoders(tiny_teacher, splits):
    from flash_core.distill import Batch
    from training.digits.benchmark import DigitsDataset, encode_prompts
    from training.digits.teacher import load_teacher_pipeline

    pipe = load_teacher_pipeline(tiny_teacher[0])
    dataset = DigitsDataset(pipe, splits[0], seed=0)
    assert len(dataset) == len(splits[0].digits)
    rows = [5, 0, 3, 3, 1, 2]
    batch = dataset.batch(rows, step=4)
    assert isinstance(batch, Batch)
    assert batch.latents.shape == (6, 4, 8, 8)
    assert batch.cond.encoder_hidden_states.shape == (6, 77, pipe.text_encoder.config.hidden_size)
    assert torch.allclose(batch.uncond.encoder_hidden_states, encode_prompts(pipe, [""]))
    assert len(dataset.prompts) == 10 * len(data.PROMPT_TEMPLATES)
    again = dataset.batch(rows, step=4)  # a function of (rows, step): a resumed run draws the same batch
    assert torch.equal(again.latents, batch.latents)
    assert torch.equal(again.cond.encoder_hidden_states, batch.cond.encoder_hidden_states)
    assert not torch.equal(dataset.batch(rows, step=5).latents, batch.latents)  # a fresh posterior draw per step
    assert not torch.equal(batch.latents[2], batch.latents[3])  # the same image, two posterior draws


def test_students_train_through_the_one_run(tiny_teacher, splits):
    from training.digits.benchmark import StudentSettings, train_student
    from training.digits.teacher import load_teacher_pipeline

    pipe = load_teacher_pipeline(tiny_teacher[0])
    settings = StudentSettings(total_steps=4, batch_size=2, lora_rank=2, teacher_grid_steps=4)
    distiller, seconds, losses = train_student(pipe, splits[0], settings, {}, desc="test")
    assert distiller.step == 4 and seconds > 0
    assert {"loss", "loss_distill", "loss_dmd"} <= set(losses) and losses["teacher_s_per_step"] > 0
    assert any(float(v.abs().max()) > 0 for k, v in distiller.lora_state_dict().items() if "lora_B" in k)


def test_goal_checks_compare_student_and_teacher_to_the_reference():
    from training.digits.benchmark import MethodResult, goal_checks

    def row(method, nfe, acc, fd):
        return MethodResult(method, method, nfe, nfe, None, acc, fd, 0.0)

    good = goal_checks([row("teacher_reference", 50, 0.95, 20.0), row("teacher_dpmpp", 2, 0.6, 60.0),
                        row("flash", 2, 0.93, 24.0)])
    assert good["student_within_1.25x_distance"] and good["student_within_5_points_accuracy"]
    assert good["teacher_2nfe_clearly_worse"]
    bad = goal_checks([row("teacher_reference", 50, 0.95, 20.0), row("teacher_dpmpp", 2, 0.9, 22.0),
                       row("flash", 2, 0.80, 26.0)])
    assert not bad["student_within_1.25x_distance"] and not bad["student_within_5_points_accuracy"]
    assert not bad["teacher_2nfe_clearly_worse"]
    assert goal_checks([row("flash", 2, 0.9, 20.0)]) == {"complete": False}


# ---- the teacher the pack ships -----------------------------------------------------------------
def test_shipped_teacher_is_the_default_recipe_with_its_provenance():
    """training/digits/shipped_teacher: the default TeacherConfig, fp16 weights whose sha256 the provenance file
    records, and the command that retrains it."""
    import hashlib

    from training.digits.teacher import PROVENANCE_FILE, SHIPPED_DIR, WEIGHT_FILES, shipped_config

    assert shipped_config() == TeacherConfig()
    provenance = json.loads((SHIPPED_DIR / PROVENANCE_FILE).read_text())
    assert provenance["recipe"] == json.loads(json.dumps(TeacherConfig().__dict__)) and provenance["seed"] == 0
    assert provenance["retrain"] == "make teacher"
    for name, digest in provenance["sha256"].items():
        assert hashlib.sha256((SHIPPED_DIR / name).read_bytes()).hexdigest() == digest, name
    from safetensors.torch import load_file

    for name in WEIGHT_FILES:
        assert {t.dtype for t in load_file(str(SHIPPED_DIR / name)).values()} == {torch.float16}, name
    assert sum((SHIPPED_DIR / name).stat().st_size for name in WEIGHT_FILES) < 12 * 2**20  # a few MB


def test_shipped_teacher_installs_in_place_of_training_and_follows_prompts(tmp_path, evaluator):
    """train_teacher on the default recipe installs the shipped teacher (float32 copies of its fp16 values, ComfyUI's
    tokenizer) instead of training; the pipeline loads offline and draws the prompted digit (25 steps, CFG 3)."""
    from safetensors.torch import load_file

    from training.digits.benchmark import teacher_generate
    from training.digits.teacher import SHIPPED_DIR, load_teacher_pipeline

    out = train_teacher(tmp_path / "teacher", TeacherConfig())
    assert is_complete(out, TeacherConfig())
    shipped = load_file(str(SHIPPED_DIR / "unet" / "diffusion_pytorch_model.safetensors"))
    installed = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(installed[k].dtype == torch.float32 and torch.equal(installed[k], shipped[k].float()) for k in shipped)
    pipe = load_teacher_pipeline(out)
    digits = torch.arange(10).repeat_interleave(3)
    noise = torch.randn(len(digits), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = teacher_generate(pipe, [data.canonical_prompt(int(d)) for d in digits], noise, steps=25, guidance=3.0)
    assert evaluator.accuracy(images, digits) >= 0.7  # the default teacher scores about 0.85 on 200 images
