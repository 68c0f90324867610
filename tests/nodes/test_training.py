"""FlashDistillTrain in-process, on real ComfyUI classes with micro SD1.5 / SDXL models built in the test.

What is asserted: distillation brings the student's 2-step output closer to the teacher's multi-step CFG
output on held-out prompts and seeds; the teacher MODEL is bit-identical afterwards; the saved file gives
the same samples through FlashLoRALoader, the stock LoraLoader and the node's own student MODEL; Cancel
leaves a checkpoint and no LoRA file, and resuming reproduces an uninterrupted run exactly; bad inputs stop
with clear messages and leave no partial file.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from flash_core.grid import GRID_MIN_CELL
from training.fixtures.comfy_env import import_comfy, load_pack

import_comfy()  # ComfyUI on sys.path, configured for the CPU, before any comfy import

MICRO_SD15 = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 4,
    "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False,
}
MICRO_SDXL = {
    **MICRO_SD15, "num_classes": "sequential", "adm_in_channels": 2816, "context_dim": 2048, "model_channels": 64,
    "use_linear_in_transformer": True,
}
LATENT = (4, 8, 8)
TEACHER_GUIDANCE = 3.0
TEACHER_STEPS = 4  # K of the teacher solver (small: CPU test)


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pack():
    return load_pack()


@pytest.fixture(scope="module")
def training(pack):
    import importlib

    return importlib.import_module(f"{pack.__name__}.nodes.training")


@pytest.fixture(scope="module")
def sampling(pack):
    import importlib

    return importlib.import_module(f"{pack.__name__}.nodes.sampling")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture()
def loras_dir(tmp_path, monkeypatch, pack):
    import folder_paths

    folder = tmp_path / "loras"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(folder)], set(folder_paths.supported_pt_extensions)))
    return folder


def micro_model(config: dict, seed: int = 0):
    """A ComfyUI SD1.5 / SDXL ModelPatcher from an explicit micro unet config, well-conditioned random weights."""
    import comfy.model_patcher
    import comfy.supported_models

    family = comfy.supported_models.SDXL if config.get("adm_in_channels") == 2816 else comfy.supported_models.SD15
    base = family(dict(config)).get_model({}, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in base.diffusion_model.state_dict().items():
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            if name.endswith("bias"):
                tensor.zero_()
            elif tensor.ndim == 1:
                tensor.fill_(1.0)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / tensor[0].numel() ** 0.5)
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def prompt(generator: torch.Generator, context_dim: int = 768) -> torch.Tensor:
    return torch.randn(1, 77, context_dim, generator=generator)


class PromptWorld:
    """Prompt -> image map the micro teacher learns: x0 = 0.8 tanh(2 mean_tokens(c) P) (model latent space)."""

    def __init__(self, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(768, LATENT[0] * LATENT[1] * LATENT[2], generator=generator) / 768**0.5

    def image(self, context: torch.Tensor) -> torch.Tensor:
        return 0.8 * torch.tanh(2 * (context.mean(1) @ self.projection)).reshape(-1, *LATENT)


def pretrain_teacher(model, world: PromptWorld, steps: int = 100, seed: int = 0) -> None:
    """Plain eps-prediction training of the micro UNet on the prompt world (15% empty-prompt dropout)."""
    dm = model.model.diffusion_model
    dm.requires_grad_(True)  # ComfyUI 0.30 builds model weights frozen
    abar = 1.0 / (1.0 + model.model.model_sampling.sigmas.double() ** 2)
    optimizer = torch.optim.AdamW(dm.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(steps):
            context = torch.cat([prompt(generator) for _ in range(16)])
            x0 = world.image(context)
            drop = torch.rand(16, generator=generator) < 0.15
            context = torch.where(drop[:, None, None], torch.zeros_like(context), context)
            t = torch.randint(0, 1000, (16,), generator=generator)
            eps = torch.randn(x0.shape, generator=generator)
            a = abar[t].float().reshape(-1, 1, 1, 1)
            loss = (dm(a.sqrt() * x0 + (1 - a).sqrt() * eps, t.float(), context=context) - eps).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    dm.requires_grad_(False)


def state_hash(model) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def node_inputs(model, latents: torch.Tensor, positives, negative=None, **overrides) -> dict:
    """FlashDistillTrain.execute keyword arguments the way ComfyUI passes them (is_input_list: lists)."""
    negative = negative if negative is not None else [[torch.zeros(1, 77, positives[0].shape[-1]), {}]]
    values = dict(
        lora_name="student", steps=4, nfe=2, rank=4, learning_rate=3e-3, guidance_min=TEACHER_GUIDANCE,
        guidance_max=TEACHER_GUIDANCE, teacher_steps=TEACHER_STEPS, distill_weights="", adversarial_weights="",
        dmd_weights="", seed=0, batch_size=2, resume=True, overwrite=False, preview_every=0,
        gradient_checkpointing=False, mixed_precision="bf16",
    )
    values.update(overrides)
    inputs = {k: [v] for k, v in values.items()}
    inputs.update(model=[model], latents=[{"samples": latents}], positive=[[[p, {}]] for p in positives],
                  negative=[negative])
    return inputs


def run_node(training, **inputs):
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        output = training.FlashDistillTrain.execute(**inputs)
    return output.args if hasattr(output, "args") else output.result


def flash_sample(sampling, model, context: torch.Tensor, seed: int, steps: int = 2, batch: int = 1) -> torch.Tensor:
    """Few-step student latents (model latent space) through SamplerCustom's path with FlashSamplerSelect +
    FlashScheduler, cfg 1. Initial noise: torch.manual_seed(seed) like every ComfyUI sampler; re-noise draws:
    seeded with seed + 1. (With the same seed for both, ComfyUI's CPU noise sampler would re-draw the initial
    noise itself as the first re-noise noise, a correlation the student never sees in training.)"""
    import comfy.sample

    noise = torch.randn((batch, *LATENT), generator=torch.manual_seed(seed))
    with torch.inference_mode():
        latent = comfy.sample.sample_custom(
            model, noise, 1.0, sampling.flash_ksampler(), sampling.flash_sigmas(model, steps), [[context, {}]],
            [[torch.zeros_like(context), {}]], torch.zeros(batch, *LATENT), seed=seed + 1)
    return model.model.process_latent_in(latent)


# --------------------------------------------------------------------------------------------------
# Distillation works, and only on a copy
# --------------------------------------------------------------------------------------------------


DISTILL_STEPS = 80
DISTILL_LR = 1e-3
EVAL_BATCH = 16  # seeds per held-out prompt (the 2-step output depends on its re-noise draw)


def distillation_run(training, sampling, steps: int = DISTILL_STEPS, lr: float = DISTILL_LR, rank: int = 8) -> dict:
    """Pretrain a micro teacher, measure the 2-step student vs the teacher on held-out prompts and seeds, distil
    through the node (distillation loss only), measure again. Needs an isolated 'loras' folder."""
    from importlib import import_module

    from flash_core.denoiser import Conditioning
    from flash_core.distill import teacher_target

    comfy_denoiser = import_module(training.__name__.rsplit(".", 1)[0] + ".comfy_denoiser")
    world = PromptWorld()
    teacher = micro_model(MICRO_SD15)
    pretrain_teacher(teacher, world)
    generator = torch.Generator().manual_seed(1)
    train_prompts = [prompt(generator) for _ in range(8)]
    held_out = [prompt(generator) for _ in range(4)]
    latents = world.image(torch.cat(train_prompts)) / 0.18215  # VAE-space latents, as VAE Encode gives
    seeds = [100 + i for i in range(len(held_out))]  # one seed per prompt, EVAL_BATCH noises per seed
    with torch.inference_mode(False):
        den = comfy_denoiser.ComfyDenoiser(teacher)
        targets = []
        for context, seed in zip(held_out, seeds):
            noise = torch.randn((EVAL_BATCH, *LATENT), generator=torch.manual_seed(seed))  # FlashSampler's noise
            with torch.no_grad():
                targets.append(teacher_target(den, noise, 0, Conditioning(context).expand_to(EVAL_BATCH),
                                              Conditioning(torch.zeros_like(context)), TEACHER_GUIDANCE, TEACHER_STEPS))
        del den

    def distance(model) -> float:  # mean squared latent error over held-out prompts x seeds
        return sum(float((flash_sample(sampling, model, c, s, batch=EVAL_BATCH) - x).pow(2).mean())
                   for c, s, x in zip(held_out, seeds, targets)) / len(held_out)

    before_hash = state_hash(teacher)
    before = distance(teacher)  # untrained student = teacher + zero LoRA, 2 Flash steps
    student, lora, loss_map, grid = run_node(training, **node_inputs(
        teacher, latents, train_prompts, steps=steps, rank=rank, learning_rate=lr, batch_size=4,
        adversarial_weights="0", dmd_weights="0", lora_name="distilled", preview_every=steps // 2))
    # Hashed before sampling the student: ComfyUI patches a clone's LoRA into the shared weights while it is
    # loaded (and restores them when the teacher is loaded again), as for any LoraLoader output.
    after_hash = state_hash(teacher)
    return dict(teacher=teacher, student=student, lora=lora, loss_map=loss_map, grid=grid, before=before,
                after=distance(student), before_hash=before_hash, after_hash=after_hash, held_out=held_out)


@pytest.fixture(scope="module")
def distilled(training, sampling, tmp_path_factory):
    """A pretrained micro teacher distilled through the node, evaluated before and after."""
    import folder_paths

    folder = tmp_path_factory.mktemp("loras")
    saved = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(folder)], set(folder_paths.supported_pt_extensions))
    try:
        yield dict(distillation_run(training, sampling), folder=folder)
    finally:
        folder_paths.folder_names_and_paths["loras"] = saved


def test_distillation_brings_2_step_student_closer_to_multi_step_cfg_teacher(distilled):
    # Held-out prompts and seeds; distance = mean squared latent error of the 2-step FlashSampler output
    # (cfg 1) to the teacher's 4-step DPM-Solver++ output at cfg 3, 4 prompts x 16 seeds. Observed: -28%.
    assert distilled["after"] < 0.85 * distilled["before"], (distilled["before"], distilled["after"])
    losses = distilled["loss_map"]["loss"]
    assert len(losses) == DISTILL_STEPS and all(torch.isfinite(torch.tensor(losses)))


def test_teacher_model_is_bit_identical_after_training(distilled):
    assert distilled["after_hash"] == distilled["before_hash"]
    assert not distilled["teacher"].patches  # the input MODEL got no patches either
    assert distilled["student"].patches  # the student MODEL is a patched clone


def test_outputs_plug_into_core_training_nodes(distilled):
    lora = distilled["lora"]
    assert lora and all(k.startswith("lora_unet_") for k in lora)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in lora)
    assert set(distilled["loss_map"]) >= {"loss", "loss_distill"}
    grid = distilled["grid"]
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3  # IMAGE [1, H, W, 3]
    tile = LATENT[1] * 8  # latent2rgb x8, nearest-enlarged to a cell of at least GRID_MIN_CELL px
    assert grid.shape[1] == 4 * tile * -(-GRID_MIN_CELL // tile)  # rows: teacher, student 1 / 2 / 4 steps


def test_saved_file_gives_identical_samples_through_flash_and_stock_loaders(distilled, pack, sampling, caplog):
    import importlib

    import comfy.sd
    import comfy.utils
    import folder_paths
    from safetensors import safe_open

    saved = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(distilled["folder"])], set(folder_paths.supported_pt_extensions))
    try:
        name = "flash/distilled.safetensors"
        with safe_open(str(distilled["folder"] / name), "pt") as handle:
            metadata = handle.metadata()
        assert metadata["flash.trained_steps"] == str(DISTILL_STEPS) and metadata["flash.rank"] == "8" and metadata["flash.recommended_steps"] == "2"
        assert metadata["flash.base_model"] == "SD15" and json.loads(metadata["flash.timesteps"]) == [999, 499]
        assert metadata["ss_network_dim"] == "8" and metadata["flash.dtype"] == "float32"
        loaders = importlib.import_module(f"{pack.__name__}.nodes.loaders")
        teacher = distilled["teacher"]
        with caplog.at_level(logging.WARNING):
            with torch.inference_mode():
                flash = loaders.FlashLoRALoader.execute(teacher, name, 1.0, 1.0, None)
                flash = (flash.args if hasattr(flash, "args") else flash.result)[0]
                # the body of ComfyUI's stock LoraLoader / LoraLoaderModelOnly (nodes.py)
                path = folder_paths.get_full_path_or_raise("loras", name)
                stock = comfy.sd.load_lora_for_models(teacher, None, comfy.utils.load_torch_file(path, safe_load=True),
                                                      1.0, 0)[0]
        assert "lora key not loaded" not in caplog.text
        context = distilled["held_out"][0]
        via_flash = flash_sample(sampling, flash, context, 7)
        via_stock = flash_sample(sampling, stock, context, 7)
        via_node = flash_sample(sampling, distilled["student"], context, 7)
        assert torch.equal(via_flash, via_stock)
        assert torch.equal(via_flash, via_node)
        assert not torch.equal(via_flash, flash_sample(sampling, teacher, context, 7))  # the LoRA does something
    finally:
        folder_paths.folder_names_and_paths["loras"] = saved


# --------------------------------------------------------------------------------------------------
# Cancel and resume
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_case():
    generator = torch.Generator().manual_seed(3)
    prompts = [prompt(generator) for _ in range(4)]
    return micro_model(MICRO_SD15, seed=1), torch.randn(4, *LATENT, generator=generator), prompts


def test_cancel_leaves_checkpoint_and_no_lora_then_resume_is_exact(training, small_case, loras_dir, monkeypatch):
    import comfy.model_management
    from safetensors.torch import load_file

    from flash_core.distill import FlashDistiller

    model, latents, prompts = small_case
    reference = run_node(training, **node_inputs(model, latents, prompts, steps=6, lora_name="reference"))[1]

    train_step = FlashDistiller.train_step

    def cancel_after_step_3(self, batch):  # Cancel pressed as step 3 ends: the node sees it at the step's report
        logs = train_step(self, batch)
        if self.step == 3:  # the trainer's own counter, not the (time-throttled) progress bar
            comfy.model_management.interrupt_current_processing(True)  # what the Cancel button does
        return logs

    monkeypatch.setattr(FlashDistiller, "train_step", cancel_after_step_3)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_node(training, **node_inputs(model, latents, prompts, steps=6, lora_name="cancelled"))
    finally:
        monkeypatch.setattr(FlashDistiller, "train_step", train_step)
        comfy.model_management.interrupt_current_processing(False)
    flash = loras_dir / "flash"
    assert not (flash / "cancelled.safetensors").exists()
    assert not [p for p in flash.rglob("*") if p.name.startswith(".tmp-")]
    checkpoint = flash / ".checkpoints" / "cancelled" / "step-000003" / "state.flashckpt"
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == 3 and [h["step"] for h in state["history"]] == [1, 2, 3]

    _, lora, loss_map, _ = run_node(training, **node_inputs(model, latents, prompts, steps=6, lora_name="cancelled"))
    assert len(loss_map["loss"]) == 6
    assert set(lora) == set(reference)
    assert all(torch.equal(lora[k], reference[k]) for k in reference)  # resume reproduces the uninterrupted run
    assert load_file(str(flash / "cancelled.safetensors")).keys() == reference.keys()


def test_cancel_inside_a_step_rolls_back_to_the_step_start_and_resume_is_exact(training, small_case, loras_dir,
                                                                              monkeypatch):
    """ComfyUI raises Cancel inside any op, here in the middle of step 3 (a student iteration, during the
    adversarial feature pass, after the step's timestep, noise and guidance were drawn): the half step is undone,
    the checkpoint holds the state after step 2 and resuming reproduces the uninterrupted run exactly.

    The trigger reads the trainer's own step counter (FlashDistiller.step at the start of train_step), never the
    progress bar: ComfyUI throttles progress updates by time, so which values a hook sees depends on speed."""
    import comfy.model_management

    from flash_core.distill import FlashDistiller

    model, latents, prompts = small_case
    reference = run_node(training, **node_inputs(model, latents, prompts, steps=6, lora_name="reference"))[1]
    state = {"in_step": None, "armed": False}
    train_step = FlashDistiller.train_step

    def counted_train_step(self, batch):
        state["in_step"] = self.step + 1  # the 1-based number of the step now running
        try:
            return train_step(self, batch)
        finally:
            state["in_step"] = None

    def before_middle_block(module, args):
        if state["in_step"] == 3 and state["armed"] is False:  # inside step 3: press Cancel now
            state["armed"] = None
            comfy.model_management.interrupt_current_processing(True)

    monkeypatch.setattr(FlashDistiller, "train_step", counted_train_step)
    block_hook = model.model.diffusion_model.middle_block[0].register_forward_pre_hook(before_middle_block)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_node(training, **node_inputs(model, latents, prompts, steps=6, lora_name="midstep"))
    finally:
        block_hook.remove()
        comfy.model_management.interrupt_current_processing(False)
    assert state["armed"] is None  # the cancel did fire inside step 3
    checkpoints = loras_dir / "flash" / ".checkpoints" / "midstep"
    assert (checkpoints / "latest").read_text().strip() == "step-000002"
    _, lora, loss_map, _ = run_node(training, **node_inputs(model, latents, prompts, steps=6, lora_name="midstep"))
    assert len(loss_map["loss"]) == 6
    assert all(torch.equal(lora[k], reference[k]) for k in reference)  # as if never interrupted


def test_checkpoints_never_show_in_a_lora_dropdown(training, small_case, loras_dir):
    """A cancelled run's checkpoint folder sits under models/loras/flash/.checkpoints: none of its files may be
    offered by ComfyUI's LoRA lists (stock Load LoRA included), only the finished LoRA."""
    import folder_paths

    model, latents, prompts = small_case
    run_node(training, **node_inputs(model, latents, prompts, steps=2, lora_name="listed"))
    checkpoint_files = [p for p in (loras_dir / "flash" / ".checkpoints").rglob("*") if p.is_file()]
    assert any(p.name.startswith("state") for p in checkpoint_files)
    folder_paths.filename_list_cache.clear()
    listed = folder_paths.get_filename_list("loras")
    assert listed == ["flash/listed.safetensors"], listed


def test_resume_with_other_settings_is_refused(training, small_case, loras_dir):
    model, latents, prompts = small_case
    run_node(training, **node_inputs(model, latents, prompts, steps=2, lora_name="settings"))
    with pytest.raises(ValueError, match="other settings.*lora_rank"):
        run_node(training, **node_inputs(model, latents, prompts, steps=4, rank=8, lora_name="settings", overwrite=True))


def test_resume_on_other_data_is_refused(training, small_case, loras_dir):
    model, latents, prompts = small_case
    run_node(training, **node_inputs(model, latents, prompts, steps=2, lora_name="data"))
    with pytest.raises(ValueError, match="other settings, teacher or data.*training data.*resume off"):
        run_node(training, **node_inputs(model, latents + 1.0, prompts, steps=2, lora_name="data", overwrite=True))


def test_resume_on_a_patched_teacher_is_refused(training, small_case, loras_dir):
    """The teacher fingerprint covers every tensor as the trainer sees it: a weight patch applied upstream (what a
    style LoRA does to an attention projection) makes it another teacher."""
    _, latents, prompts = small_case
    model = micro_model(MICRO_SD15, seed=1)  # its own weights: the patch below never touches small_case's model
    run_node(training, **node_inputs(model, latents, prompts, steps=2, lora_name="patched"))
    patched = model.clone()
    key = next(k for k in patched.model.state_dict() if k.endswith("attn2.to_k.weight"))
    patched.add_patches({key: (torch.full_like(patched.model.state_dict()[key], 1e-3),)}, 1.0)  # a "diff" patch
    with pytest.raises(ValueError, match=r"teacher weights \(fingerprint of every tensor\).*resume off"):
        run_node(training, **node_inputs(patched, latents, prompts, steps=2, lora_name="patched", overwrite=True))


def freeu_like(model, scale: float):
    """FreeU's shape of patch: an output-block patch whose closure holds its numbers (no weight changes)."""
    def output_block_patch(h, hsp, transformer_options):
        return h * scale, hsp

    patched = model.clone()
    patched.set_model_output_block_patch(output_block_patch)
    return patched


@pytest.mark.parametrize("change", ["output block patch", "its numbers", "v-prediction", "zero terminal SNR"])
def test_resume_on_a_teacher_with_another_schedule_or_patch_is_refused(training, small_case, loras_dir, change):
    """The teacher's identity is more than its weights: a FreeU-style block patch (or the same patch with other
    numbers), ModelSamplingDiscrete's v-prediction or zero-terminal-SNR schedule make another teacher, and resuming
    on it is refused (before: accepted, the weights being the same)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    _, latents, prompts = small_case
    model = micro_model(MICRO_SD15, seed=2)
    first = freeu_like(model, 1.1) if change == "its numbers" else model
    run_node(training, **node_inputs(first, latents, prompts, steps=2, lora_name="identity"))
    other = {"output block patch": lambda: freeu_like(model, 1.1), "its numbers": lambda: freeu_like(model, 1.2),
             "v-prediction": lambda: ModelSamplingDiscrete().patch(model, "v_prediction", False)[0],
             "zero terminal SNR": lambda: ModelSamplingDiscrete().patch(model, "eps", True)[0]}[change]()
    with pytest.raises(ValueError, match=r"teacher.*resume off"):
        run_node(training, **node_inputs(other, latents, prompts, steps=2, lora_name="identity", overwrite=True))


def test_a_teacher_patch_that_cannot_be_described_is_refused_not_ignored(training, small_case, loras_dir):
    import threading

    from flash_core.fingerprints import TeacherIdentityError

    _, latents, prompts = small_case
    patched = micro_model(MICRO_SD15, seed=2).clone()
    lock = threading.Lock()

    def output_block_patch(h, hsp, transformer_options):
        with lock:  # state a fingerprint cannot describe
            return h, hsp

    patched.set_model_output_block_patch(output_block_patch)
    with pytest.raises(TeacherIdentityError, match=r"cannot be described.*Remove that patch"):
        run_node(training, **node_inputs(patched, latents, prompts, steps=2, lora_name="undescribable"))


def test_nan_latents_stop_with_a_clear_error_and_keep_the_good_files(training, small_case, loras_dir):
    model, latents, prompts = small_case
    run_node(training, **node_inputs(model, latents, prompts, steps=2, lora_name="nan"))
    flash = loras_dir / "flash"
    good_lora = (flash / "nan.safetensors").read_bytes()
    good_state = (flash / ".checkpoints" / "nan" / "step-000002" / "state.flashckpt").read_bytes()
    bad = latents.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"Flash Distill Train: training stopped at step [12]: the training latents "
                                           r"\(dataset rows .*\) is not finite.*re-encode"):
        run_node(training, **node_inputs(model, bad, prompts, steps=2, lora_name="nan", resume=False, overwrite=True))
    assert (flash / "nan.safetensors").read_bytes() == good_lora  # the last good LoRA is untouched
    assert [p.name for p in (flash / ".checkpoints" / "nan").iterdir() if p.is_dir()] == ["step-000002"]
    assert (flash / ".checkpoints" / "nan" / "step-000002" / "state.flashckpt").read_bytes() == good_state
    assert not [p for p in flash.rglob("*") if p.name.startswith(".tmp-")]


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, needle", [
    ("../escape", "path separator"), ("sub/dir", "path separator"), ("sub\\dir", "path separator"),
    ("", "empty"), (".hidden", "not a valid file name"),
])
def test_bad_lora_names_are_refused(training, small_case, loras_dir, name, needle):
    model, latents, prompts = small_case
    with pytest.raises(ValueError, match=needle):
        run_node(training, **node_inputs(model, latents, prompts, lora_name=name))
    assert not list(loras_dir.rglob("*.safetensors"))


def test_settings_are_checked_by_flash_core_before_any_work(training, small_case, loras_dir):
    # the same checks as flash-distill's config (flash_core's DistillConfig), before a folder is made or locked
    model, latents, prompts = small_case
    with pytest.raises(ValueError, match=r"Flash Distill Train: .*teacher_grid_steps \(K = 6\) must be a multiple of"):
        run_node(training, **node_inputs(model, latents, prompts, teacher_steps=6))
    assert not (loras_dir / "flash").exists()


def test_empty_latents_and_count_mismatch_are_refused(training, small_case, loras_dir):
    model, latents, prompts = small_case
    with pytest.raises(ValueError, match="no training latents"):
        inputs = node_inputs(model, latents, prompts)
        inputs["latents"] = []
        run_node(training, **inputs)
    with pytest.raises(ValueError, match="3 positive conditionings for 4 latents"):
        run_node(training, **node_inputs(model, latents, prompts[:3]))
    with pytest.raises(ValueError, match="channels"):
        run_node(training, **node_inputs(model, torch.zeros(4, 16, 8, 8), prompts))


def test_unsupported_model_family_is_refused(training, small_case, loras_dir):
    import comfy.supported_models

    _, latents, prompts = small_case
    model = micro_model(MICRO_SD15)
    model.model.model_config = comfy.supported_models.SD20(dict(MICRO_SD15))  # an SD2.x MODEL
    with pytest.raises(ValueError, match="supports SD1.5 and SDXL.*'SD20'"):
        run_node(training, **node_inputs(model, latents, prompts))


def test_existing_file_is_kept_unless_overwrite(training, small_case, loras_dir):
    model, latents, prompts = small_case
    target = loras_dir / "flash" / "taken.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"precious")
    with pytest.raises(ValueError, match="already exists.*overwrite"):
        run_node(training, **node_inputs(model, latents, prompts, lora_name="taken"))
    assert target.read_bytes() == b"precious"
    run_node(training, **node_inputs(model, latents, prompts, steps=1, lora_name="taken", overwrite=True, resume=False))
    assert target.read_bytes() != b"precious"


def test_deleted_output_reruns_the_node_and_a_finished_run_is_not_redone(training, small_case, loras_dir):
    """ComfyUI re-runs FlashDistillTrain when its fingerprint changes: it covers the output file, so deleting
    the trained LoRA makes the node run again (resume: 0 steps, the same file written back); running a finished
    run again with its own file in place succeeds without rewriting it."""
    model, latents, prompts = small_case
    inputs = node_inputs(model, latents, prompts, steps=2, lora_name="kept")
    fingerprint = lambda: training.FlashDistillTrain.fingerprint_inputs(**{k: v for k, v in inputs.items()
                                                                          if k not in ("model", "latents")})
    before = fingerprint()
    first = run_node(training, **inputs)[1]
    target = loras_dir / "flash" / "kept.safetensors"
    assert target.is_file() and fingerprint() == before  # ComfyUI may serve the cached outputs now
    target.unlink()
    assert fingerprint() != before  # ... but not once the file is gone
    again = run_node(training, **inputs)[1]
    assert target.is_file() and fingerprint() == before
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    stamp = target.stat().st_mtime_ns
    run_node(training, **inputs)  # finished run, its own file: success, nothing rewritten
    assert target.stat().st_mtime_ns == stamp
    # the same finished run re-queued with only recommended_steps changed: the same weights, the new metadata
    run_node(training, **node_inputs(model, latents, prompts, steps=2, lora_name="kept", nfe=1))
    from safetensors import safe_open

    with safe_open(str(target), "pt") as handle:
        assert handle.metadata()["flash.recommended_steps"] == "1" and handle.metadata()["flash.timesteps"] == "[999]"
        assert all(torch.equal(handle.get_tensor(k), first[k]) for k in first)


def test_unwritable_output_folder_is_refused_before_training(training, small_case, loras_dir):
    model, latents, prompts = small_case
    (loras_dir / "flash").write_text("a file where the output folder should be")  # makedirs fails, even as root
    with pytest.raises(ValueError, match="cannot write to"):
        run_node(training, **node_inputs(model, latents, prompts))


def test_full_disk_at_save_leaves_no_partial_file(training, small_case, loras_dir, monkeypatch):
    import safetensors.torch

    model, latents, prompts = small_case

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # some bytes made it to disk, then the disk filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(ValueError, match="No space left on device.*resume on"):
        run_node(training, **node_inputs(model, latents, prompts, steps=2, lora_name="full"))
    flash = loras_dir / "flash"
    assert not (flash / "full.safetensors").exists()
    assert not [p for p in flash.iterdir() if p.name.startswith(".tmp-")]
    assert (flash / ".checkpoints" / "full" / "step-000002" / "state.flashckpt").is_file()  # the training is not lost


# --------------------------------------------------------------------------------------------------
# The Denoiser adapter and SDXL
# --------------------------------------------------------------------------------------------------


def test_comfy_denoiser_matches_the_unet_and_trains_a_copy(pack):
    import importlib

    from flash_core.denoiser import Conditioning

    comfy_denoiser = importlib.import_module(f"{pack.__name__}.nodes.comfy_denoiser")
    model = micro_model(MICRO_SD15)
    before = state_hash(model)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *LATENT, generator=generator)
    t = torch.tensor([999.0, 249.0])
    cond = Conditioning(torch.randn(2, 77, 768, generator=generator))
    features = {}
    model.model.diffusion_model.middle_block[-1].register_forward_hook(lambda m, i, o: features.setdefault("mid", o))
    with torch.inference_mode(False), torch.enable_grad():
        den = comfy_denoiser.ComfyDenoiser(model)
        den.add_lora(4, 4, ("to_q", "to_k", "to_v", "to_out.0"))
        eps = den.predict(x, t, cond)
        with torch.no_grad():
            reference = model.model.diffusion_model(x, t, context=cond.encoder_hidden_states)
        torch.testing.assert_close(eps, reference, atol=1e-4, rtol=1e-4)  # via apply_model: same eps
        torch.testing.assert_close(den.encoder_features(x, t, cond), features["mid"], atol=1e-5, rtol=1e-5)
        eps.square().mean().backward()
    assert all(p.grad is not None for p in den.lora_parameters())
    assert not any(p.requires_grad for p in den.base_parameters())
    assert state_hash(model) == before
    assert not any("lora_" in n for n, _ in model.model.named_parameters())


def test_sdxl_teacher_trains_through_the_node(training, loras_dir):
    generator = torch.Generator().manual_seed(0)
    model = micro_model(MICRO_SDXL)
    positives = [[torch.randn(1, 77, 2048, generator=generator), {"pooled_output": torch.randn(1, 1280, generator=generator)}]
                 for _ in range(2)]
    negative = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    inputs = node_inputs(model, torch.randn(2, *LATENT, generator=generator), [p[0] for p in positives], negative,
                         steps=2, lora_name="sdxl")
    inputs["positive"] = [[p] for p in positives]
    _, lora, loss_map, _ = run_node(training, **inputs)
    assert len(loss_map["loss"]) == 2 and lora
    from safetensors import safe_open

    with safe_open(str(loras_dir / "flash" / "sdxl.safetensors"), "pt") as handle:
        assert handle.metadata()["flash.backbone"] == "sdxl"
    inputs["positive"] = [[[positives[0][0], {}]]]  # SDXL conditioning without pooled output
    inputs["lora_name"] = ["sdxl_nopool"]
    with pytest.raises(ValueError, match="pooled_output"):
        run_node(training, **inputs)


def test_node_schema(training):
    schema = training.FlashDistillTrain.define_schema()
    assert schema.node_id == "FlashDistillTrain" and schema.category == "Flash Diffusion"
    assert schema.is_output_node and schema.is_input_list
    assert [o.io_type for o in schema.outputs] == ["MODEL", "LORA_MODEL", "LOSS_MAP", "IMAGE"]
    assert training.NODES == [training.FlashDistillTrain]
    # the step counts: frozen input ids (saved workflows, API prompts), the pack's words as labels
    labels = {i.id: i.display_name for i in schema.inputs if i.id in ("steps", "nfe", "teacher_steps")}
    assert labels == {"steps": "total_steps", "nfe": "recommended_steps", "teacher_steps": "teacher_grid_steps"}


def test_latent_preview_without_rgb_factors_shows_the_latent_channels(training):
    """Pipelines with their own VAE (FlashDiffusersLoader) have no latent2rgb factors: the preview falls back to
    the first three latent channels instead of failing at the end of training."""
    import comfy.latent_formats

    no_factors = comfy.latent_formats.SD15()
    no_factors.latent_rgb_factors = no_factors.latent_rgb_factors_bias = None
    latents = torch.zeros(2, 4, 3, 5)
    latents[:, 1] = 1.0  # channel 1 -> green
    rgb = importlib.import_module(f"{training.__package__}.training_progress").latent_rgb(no_factors, latents, upscale=2)
    assert rgb.shape == (2, 6, 10, 3)
    assert torch.allclose(rgb[..., 1], torch.ones(())) and torch.allclose(rgb[..., 0], torch.full((), 0.5))
