"""flash_core.run on a tiny SD1.5 UNet: batch order, exact resume through the one checkpoint format, the
non-finite guard, the resume contract (one test per field), the preview layout and the one export schema."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from flash_core import batches, checkpoints, grid, lora_formats, preview, run
from flash_core.backends.diffusers import UNetDenoiser
from flash_core.denoiser import Conditioning
from flash_core.distill import FlashDistiller
from flash_core.session import TrainingSession
from tests.flash_core.test_backends import TEXT_DIM, tiny_config, tiny_sd15_unet


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_dataset(count: int = 4, seed: int = 0) -> batches.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return batches.TensorDataset(torch.randn(count, 4, 8, 8, generator=g), Conditioning(torch.randn(count, 5, TEXT_DIM, generator=g)),
                             Conditioning(torch.randn(1, 5, TEXT_DIM, generator=g)))


def make_run(tmp_path, dataset=None, unet=None, hooks=None, **overrides) -> run.Run:
    settings = {"total_steps": 4, "batch_size": 2, "lr": 1e-3}
    settings.update(overrides)
    distiller = FlashDistiller(UNetDenoiser(unet if unet is not None else tiny_sd15_unet()), tiny_config("sd15", **settings))
    return run.Run(distiller, dataset if dataset is not None else tiny_dataset(), store=checkpoints.CheckpointStore(tmp_path / "ckpt", keep=2),
                   hooks=hooks, checkpoint_every=1)


def lora(trainer: run.Run) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.distiller.lora_state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Batch order
# --------------------------------------------------------------------------------------------------


def test_batch_indices_split_one_global_batch_and_depend_on_seed_and_step_only():
    single = [batches.batch_indices(3, s, 7, 4) for s in range(6)]
    rank0 = [batches.batch_indices(3, s, 7, 2, rank=0, num_processes=2) for s in range(6)]
    rank1 = [batches.batch_indices(3, s, 7, 2, rank=1, num_processes=2) for s in range(6)]
    assert [a + b for a, b in zip(rank0, rank1)] == single  # ranks split the same global batch
    assert all(not set(a) & set(b) for a, b in zip(rank0[:1], rank1[:1]))  # within an epoch
    assert sorted(single[0] + single[1][:3]) == list(range(7))  # an epoch is a permutation
    assert sorted(single[1][3:] + single[2] + single[3][:2]) == list(range(7))  # and the next one too
    assert [batches.batch_indices(4, s, 7, 4) for s in range(2)] != single[:2]
    assert batches.batch_indices(3, 5, 7, 4) == single[5]  # a resumed run needs nothing but the step
    assert batches.batch_indices(3, 0, 1, 3) == [0, 0, 0]  # batches larger than the dataset wrap into new epochs


# --------------------------------------------------------------------------------------------------
# The loop, checkpoints and exact resume
# --------------------------------------------------------------------------------------------------


class StopAt(run.RunHooks):
    def __init__(self, step: int):
        self.step, self.reports = step, []

    def on_step(self, report):
        self.reports.append(report.step)
        self.num_phases = report.num_phases

    def should_stop(self):
        return self.reports[-1] == self.step


def test_stop_checkpoint_and_resume_reproduce_the_uninterrupted_run(tmp_path):
    reference = make_run(tmp_path / "a")
    assert reference.train() == "done"
    store = reference.store
    assert [p.name for p in store.list()] == ["step-000003", "step-000004"]  # keep 2
    assert store.latest().name == "step-000004"
    state = torch.load(store.latest() / checkpoints.STATE_FILE, weights_only=True)
    assert state["format"] == checkpoints.CHECKPOINT_FORMAT and state["settings"]["lr"] == 1e-3
    assert set(state["fingerprints"]) == {"teacher", "data"} and [h["step"] for h in state["history"]] == [1, 2, 3, 4]

    stopped = make_run(tmp_path / "b", hooks=StopAt(2))
    assert stopped.train() == "stopped" and stopped.distiller.step == 2
    assert stopped.hooks.num_phases == stopped.distiller.recipe.num_phases == 4  # the report names the recipe's phases
    resumed = make_run(tmp_path / "b")
    assert resumed.resume(resumed.store.latest()) == []
    assert resumed.distiller.step == 2 and len(resumed.history) == 2
    assert resumed.train() == "done"
    expected, got = lora(reference), lora(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # bit-identical
    def strip(history):
        return [{k: v for k, v in h.items() if k not in run.TIMING_KEYS} for h in history]

    assert strip(resumed.history) == strip(reference.history)


def test_cancel_from_a_hook_checkpoints_the_finished_step_and_propagates(tmp_path):
    class Cancel(run.RunHooks):
        def on_step(self, report):
            if report.step == 2:
                raise KeyboardInterrupt

    trainer = make_run(tmp_path, hooks=Cancel())
    trainer.checkpoint_every = 0
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert [p.name for p in trainer.store.list()] == ["step-000002"]


class CancelledInPreview(Exception):
    """What ComfyUI's Cancel is to the run: an exception raised from inside any op."""


@pytest.mark.parametrize("part", ["teacher solve", "student samples", "decode"])
def test_cancel_inside_a_preview_keeps_a_checkpoint_of_the_finished_step(tmp_path, monkeypatch, part):
    """The preview after step 2 raises in each of its parts (the teacher's solve, the student's few-step samples,
    the VAE decode): the run stops with the exception and the checkpoint holds step 2, from which a resume
    reproduces the uninterrupted run."""
    reference = make_run(tmp_path / "reference")
    reference.train()
    trainer = make_run(tmp_path / "cancelled")
    trainer.checkpoint_every = 0
    data = trainer.dataset

    def decode(latents):
        if part == "decode":
            raise CancelledInPreview(part)
        return torch.sigmoid(latents[:, :3]).permute(0, 2, 3, 1)

    trainer.preview = preview.Preview(trainer.distiller, data.cond[torch.arange(2)], data.uncond, (4, 8, 8), 5, 3.0, 4, decode)
    trainer.preview_every = 2
    if part == "teacher solve":
        monkeypatch.setattr(preview, "teacher_target", lambda *args, **kwargs: (_ for _ in ()).throw(CancelledInPreview(part)))
    elif part == "student samples":
        monkeypatch.setattr(trainer.distiller, "student_sample", lambda *args, **kwargs: (_ for _ in ()).throw(CancelledInPreview(part)))
    with pytest.raises(CancelledInPreview):
        trainer.train()
    assert [p.name for p in trainer.store.list()] == ["step-000002"]
    monkeypatch.undo()
    resumed = make_run(tmp_path / "cancelled")
    resumed.resume(resumed.store.latest())
    resumed.train()
    assert all(torch.equal(a, b) for a, b in zip(lora(resumed).values(), lora(reference).values()))


def test_the_lora_start_is_drawn_once_per_module_from_its_diffusers_path(tmp_path, monkeypatch):
    """FlashDistiller's add_lora draws the start once: lora_A ~ N(0, 1/r^2) per module from (seed, its diffusers
    path: Denoiser.lora_path), lora_B = 0; no front end re-draws it. Other paths give another start, the same
    paths the same one, whatever the module order."""
    trainer = make_run(tmp_path)
    names = dict(trainer.distiller.denoiser.named_lora_parameters())
    a_keys = [k for k in names if ".lora_A." in k]
    first = {k: names[k].detach().clone() for k in a_keys}
    assert all(float(names[k].abs().max()) == 0 for k in names if ".lora_B." in k)
    denoiser = trainer.distiller.denoiser
    renamed = {k.split(".lora_")[0]: f"other.{i}" for i, k in enumerate(reversed(a_keys))}
    monkeypatch.setattr(denoiser, "lora_path", renamed.__getitem__)
    denoiser.init_lora_weights(0)  # other diffusers paths: another start
    assert not torch.equal(names[a_keys[0]], first[a_keys[0]])
    monkeypatch.undo()
    denoiser.init_lora_weights(0)
    assert all(torch.equal(names[k], first[k]) for k in a_keys)
    again = make_run(tmp_path / "again")  # a new student of the same seed: the same start, nothing else to call
    assert all(torch.equal(p, first[k]) for k, p in again.distiller.denoiser.named_lora_parameters() if k in first)
    std = torch.cat([v.flatten() for v in first.values()]).std()
    assert abs(float(std) - 1 / 4) < 0.03  # N(0, 1/r^2), r = 4


# --------------------------------------------------------------------------------------------------
# The non-finite guard
# --------------------------------------------------------------------------------------------------


def test_nan_latents_stop_before_the_step_and_save_nothing(tmp_path):
    dataset = tiny_dataset()
    dataset.latents[1, 0, 0, 0] = float("nan")
    trainer = make_run(tmp_path, dataset=dataset)
    with pytest.raises(run.NonFiniteError, match=r"step 1: the training latents.*rows.*re-encode") as caught:
        trainer.train()
    assert caught.value.step == 1 and trainer.distiller.step == 0
    assert trainer.store.list() == []


@pytest.mark.parametrize("which", ["cond", "uncond"])
def test_a_nan_prompt_embedding_is_named_not_blamed_on_the_learning_rate(tmp_path, which):
    """NaN in a prompt embedding (or the unconditional one) stops before the step with the prompts as the cause,
    not 'lr too high / bad latents' (issue 23, case 14); nothing is saved."""
    dataset = tiny_dataset()
    getattr(dataset, which).encoder_hidden_states[0, 0, 0] = float("nan")
    trainer = make_run(tmp_path, dataset=dataset)
    with pytest.raises(run.NonFiniteError, match=r"step 1: the prompt embeddings.*re-encode these prompts") as caught:
        trainer.train()
    assert "learning rate" not in str(caught.value) and trainer.distiller.step == 0 and trainer.store.list() == []


def test_exploding_learning_rate_stops_before_the_bad_update_and_keeps_good_checkpoints(tmp_path):
    class Snapshot(run.RunHooks):
        def on_step(self, report):
            self.after = lora(trainer)

    hooks = Snapshot()
    trainer = make_run(tmp_path, hooks=hooks, lr=1e30)
    with pytest.raises(run.NonFiniteError, match="learning rate is too high") as caught:
        trainer.train()
    step = caught.value.step
    assert step >= 2 and trainer.distiller.step == step - 1
    assert "gradient" in str(caught.value) or "loss" in str(caught.value)
    now = lora(trainer)
    assert all(torch.equal(now[k], hooks.after[k]) for k in now)  # the optimiser step was not applied
    saved = trainer.store.list()
    assert saved and all(int(p.name[-6:]) < step for p in saved)  # no checkpoint of the bad step
    for folder in saved:
        state = torch.load(folder / checkpoints.STATE_FILE, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["distiller"]["lora"].values())
    assert str(saved[-1]) in str(caught.value)  # the message names the checkpoint that is kept


# --------------------------------------------------------------------------------------------------
# The resume contract: one test per field
# --------------------------------------------------------------------------------------------------

CHANGED_SETTINGS = {
    "lr": 2e-3, "batch_size": 4, "lora_rank": 8, "lora_alpha": 2, "seed": 1, "total_steps": 8,
    "guidance_range": (2.0, 4.0), "teacher_grid_steps": 8, "distill_weights": (1.0, 1.0, 1.0, 0.5),
    "adversarial_weights": (0.0, 0.0, 0.1, 0.1), "dmd_weights": (0.0, 0.0, 0.0, 0.0),
    "lora_targets": ("to_q", "to_v"), "distill_loss": "l1",
}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    assert make_run(root, hooks=StopAt(2)).train() == "stopped"  # a checkpoint at step 2 of 4
    return root


@pytest.mark.parametrize("field", sorted(CHANGED_SETTINGS))
def test_resume_refuses_a_changed_setting(saved_run, field):
    trainer = make_run(saved_run, **{field: CHANGED_SETTINGS[field]})
    folder = trainer.store.latest()
    with pytest.raises(run.ResumeMismatchError, match=rf"{field}: checkpoint .*, now .*Start fresh") as caught:
        trainer.resume(folder)
    assert any(d.startswith(f"{field}:") for d in caught.value.differences)
    assert trainer.distiller.step == 0  # nothing loaded


def test_resume_refuses_another_teacher_even_an_attention_weight(saved_run):
    unet = tiny_sd15_unet()
    with torch.no_grad():
        unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight[0, 0] += 1e-3  # a patched teacher
    trainer = make_run(saved_run, unet=unet)
    with pytest.raises(run.ResumeMismatchError, match="teacher weights") as caught:
        trainer.resume(trainer.store.latest())
    assert len(caught.value.differences) == 1


def test_the_teacher_fingerprint_covers_prediction_type_and_schedule():
    """flash-distill's teacher folder switching its scheduler from epsilon to v_prediction (or another beta
    schedule) is another teacher, the weights being the same."""
    from flash_core.fingerprints import teacher_fingerprint
    from flash_core.schedules import scaled_linear_alphas_cumprod

    unet = tiny_sd15_unet()
    eps = teacher_fingerprint(UNetDenoiser(unet))
    assert teacher_fingerprint(UNetDenoiser(unet)) == eps
    assert teacher_fingerprint(UNetDenoiser(unet, prediction_type="v_prediction")) != eps
    other_schedule = scaled_linear_alphas_cumprod().clone()
    other_schedule[-1] = 0.0  # zero terminal SNR
    assert teacher_fingerprint(UNetDenoiser(unet, alphas_cumprod=other_schedule)) != eps


def test_resume_refuses_other_data(saved_run):
    dataset = tiny_dataset()
    dataset.latents[3] += 0.5
    trainer = make_run(saved_run, dataset=dataset)
    with pytest.raises(run.ResumeMismatchError, match="training data"):
        trainer.resume(trainer.store.latest())
    other_prompts = tiny_dataset()
    other_prompts.cond.encoder_hidden_states[0] += 1.0
    with pytest.raises(run.ResumeMismatchError, match="training data"):
        make_run(saved_run, dataset=other_prompts).resume(checkpoints.CheckpointStore(saved_run / "ckpt").latest())


def test_resume_allows_changes_when_asked_and_free_settings_always(saved_run):
    trainer = make_run(saved_run, lr=2e-3)
    differences = trainer.resume(trainer.store.latest(), allow_changes=True)
    assert [d.split(":")[0] for d in differences] == ["lr"] and trainer.distiller.step == 2
    same = make_run(saved_run, mixed_precision="no", grad_checkpointing=True)  # how, not what: may change
    assert same.resume(same.store.latest()) == []


def test_checkpoints_use_an_extension_no_model_folder_lists_and_earlier_pt_ones_still_resume(tmp_path):
    """state / rank files end in .flashckpt (ComfyUI lists .pt / .ckpt files as models); a checkpoint written by an
    earlier version (state.pt, rank-0.pt) still resumes."""
    trainer = make_run(tmp_path, total_steps=2)
    trainer.train()
    folder = trainer.store.latest()
    assert sorted(p.suffix for p in folder.iterdir()) == [".flashckpt", ".flashckpt", ".json"]
    for path in folder.glob("*.flashckpt"):
        path.rename(path.with_suffix(".pt"))
    resumed = make_run(tmp_path, total_steps=2)
    resumed.resume(folder)
    assert resumed.distiller.step == 2


def test_a_checkpoint_of_another_format_is_refused(tmp_path):
    folder = tmp_path / "ckpt" / "step-000001"
    folder.mkdir(parents=True)
    (folder / checkpoints.META_FILE).write_text("{}")
    torch.save({"version": 1, "distiller": {}}, folder / checkpoints.STATE_FILE)
    trainer = make_run(tmp_path)
    with pytest.raises(run.CheckpointError, match=f"not a version-{checkpoints.CHECKPOINT_VERSION} Flash checkpoint"):
        trainer.resume(folder)


# --------------------------------------------------------------------------------------------------
# Preview and export
# --------------------------------------------------------------------------------------------------


def test_preview_rows_teacher_then_students_one_column_per_prompt(tmp_path):
    trainer = make_run(tmp_path)
    data = trainer.dataset
    decoded = []

    def decode(latents):
        decoded.append(latents)
        return torch.sigmoid(latents[:, :3]).permute(0, 2, 3, 1).repeat_interleave(2, 1).repeat_interleave(2, 2)

    shown = preview.Preview(trainer.distiller, data.cond[torch.arange(3)], data.uncond, (4, 8, 8), 5, 3.0, 4, decode)
    image = shown.image()
    assert image.dtype.name == "uint8" and image.shape == (*grid.grid_layout(shown.rows()).size, 3)
    assert [label for label, _ in shown.rows()] == preview_labels(4, 3.0)  # what the grid tests below draw
    assert torch.equal(shown.noise, torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(5)))
    assert [preview.preview_due(s, 10, 4) for s in (1, 4, 8, 9, 10)] == [False, True, True, False, True]
    assert not preview.preview_due(4, 10, 0)


def preview_labels(teacher_steps: int = 32, guidance: float = 3.0) -> list[str]:
    """The labels Preview.rows builds: teacher, then the student at 1 / 2 / 4 steps."""
    return [f"teacher\nK={teacher_steps}\ncfg {guidance:g}", "student\n1 step", "student\n2 steps", "student\n4 steps"]


def preview_rows(size: int, cols: int = 4) -> list[tuple[str, torch.Tensor]]:
    """Preview.rows-shaped rows of `cols` random size x size images with exact uint8 levels."""
    g = torch.Generator().manual_seed(0)
    return [(label, torch.randint(0, 256, (cols, size, size, 3), generator=g).float() / 255) for label in preview_labels()]


def boxes_intersect(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def assert_readable_layout(rows, image, layout):
    """Cells >= GRID_MIN_CELL, labels inside their rows and the strip, no label over another, ink only in the boxes."""
    assert image.dtype.name == "uint8" and image.shape == (*layout.size, 3)
    assert min(layout.cell) >= grid.GRID_MIN_CELL
    boxes, tops = layout.label_boxes, layout.row_tops
    assert len(boxes) == len(rows) == len(layout.row_heights)
    for r, (left, top, right, bottom) in enumerate(boxes):
        assert 0 <= left < right <= layout.label_width  # inside the label strip
        assert tops[r] <= top < bottom <= tops[r] + layout.row_heights[r]  # inside its own row
        assert layout.row_heights[r] >= bottom - top
        assert (image[top:bottom, left:right] < 128).any()  # the label is drawn in its box
    assert not any(boxes_intersect(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    strip = image[:, :layout.label_width].copy()
    for left, top, right, bottom in boxes:
        strip[top:bottom, left:right] = 255
    assert (strip == 255).all()  # no ink outside the label boxes: nothing spills into another row or the images


def cell_pixels(image, layout, row: int, col: int):
    left, top, right, bottom = layout.cell_box(row, col)
    return image[top:bottom, left:right]


def test_digits_size_preview_is_enlarged_nearest_with_labels_that_do_not_overlap():
    rows = preview_rows(16)  # the digits demo: 16 x 16 px decodes, 4 prompts
    layout, image = grid.grid_layout(rows), grid.grid_image(rows)
    assert layout.scale == 6 and layout.cell == (96, 96)  # 16 px * 6: the smallest integer factor reaching 96 px
    assert_readable_layout(rows, image, layout)
    for r, (_, images) in enumerate(rows):
        for c in range(images.shape[0]):
            source = (images[c] * 255).round().to(torch.uint8).numpy()
            expected = source.repeat(6, axis=0).repeat(6, axis=1)  # every source pixel -> a 6 x 6 block
            assert (cell_pixels(image, layout, r, c) == expected).all()
    block = cell_pixels(image, layout, 2, 3)[12:18, 30:36]  # source pixel (2, 5) of row 2, column 3
    assert (block == (rows[2][1][3, 2, 5] * 255).round().to(torch.uint8).numpy()).all()


def test_large_images_are_not_scaled():
    rows = preview_rows(128, cols=2)
    layout, image = grid.grid_layout(rows), grid.grid_image(rows)
    assert layout.scale == 1 and layout.cell == (128, 128)
    assert layout.size == (4 * 128, layout.label_width + 2 * 128)
    assert_readable_layout(rows, image, layout)
    for r, (_, images) in enumerate(rows):
        for c in range(2):
            assert (cell_pixels(image, layout, r, c) == (images[c] * 255).round().to(torch.uint8).numpy()).all()


def test_label_strip_and_rows_grow_with_the_labels():
    rows = preview_rows(16, cols=1)
    long_rows = [("student with a much longer label\n1\n2\n3\n4\n5\n6\n7", rows[0][1])] + rows[1:]
    layout, long_layout = grid.grid_layout(rows), grid.grid_layout(long_rows)
    assert long_layout.label_width > layout.label_width  # as wide as the widest label needs
    assert long_layout.row_heights[0] > long_layout.cell[0] and long_layout.row_heights[1:] == layout.row_heights[1:]
    assert_readable_layout(long_rows, grid.grid_image(long_rows), long_layout)


def test_every_export_has_one_schema_and_float32(tmp_path):
    config = tiny_config("sd15", total_steps=4, batch_size=2, lr=1e-3)
    session = TrainingSession(UNetDenoiser(tiny_sd15_unet()), config, tiny_dataset(), settings={"base_model": "tiny"})
    session.train()
    modules = session.lora_modules()
    metadata = session.metadata(recommended_steps=2)
    assert metadata["flash.trained_steps"] == "4" and metadata["flash.rank"] == "4" and metadata["ss_network_dim"] == "4"
    assert metadata["flash.base_fingerprint"] == session.teacher_fingerprint and metadata["flash.base_model"] == "tiny"
    assert json.loads(metadata["flash.timesteps"]) == [999, 499] and metadata["flash.dtype"] == "float32"
    assert (metadata["flash.recommended_steps"], metadata["flash.student_steps"]) == ("2", "4") and "flash.nfe" not in metadata
    assert set(json.loads(metadata["flash.losses_last"])) >= {"loss", "loss_distill"}
    for kind in ("comfyui", "diffusers", "peft"):
        export = session.export(kind, name="c", recommended_steps=2)
        assert {k: v for k, v in export.metadata.items() if k.startswith(("ss_", "flash."))} == metadata
        path = export.save(tmp_path)
        with safe_open(str(path), "pt") as handle:
            assert {k: v for k, v in handle.metadata().items() if k.startswith(("ss_", "flash."))} == metadata
            assert all(handle.get_tensor(k).dtype == torch.float32 for k in handle.keys())  # noqa: SIM118
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    with pytest.raises(ValueError, match="ckpt"):
        lora_formats.build_lora_export(modules, "sd15", "ckpt", metadata=metadata)


# --------------------------------------------------------------------------------------------------
# Crash safety: a full disk at a checkpoint, a save killed half-way
# --------------------------------------------------------------------------------------------------


def test_full_disk_at_a_checkpoint_stops_with_the_file_named_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    from flash_core import files

    trainer = make_run(tmp_path)
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # step 1's rank + state files are written; step 2's hit a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(files.FileWriteError) as error:
        trainer.train()
    assert "disk is full" in str(error.value) and "step-000002" in str(error.value)
    store = trainer.store
    assert store.latest().name == "step-000001" and [p.name for p in store.list()] == ["step-000001"]
    monkeypatch.setattr(torch, "save", real_save)
    assert store.load(store.latest())["step"] == 1  # the previous checkpoint is whole
    leftovers = files.remove_orphaned_temporaries(store.root)  # what the next run removes when it starts
    assert [p.split("/")[-1] for p in leftovers] == [f"{files.TEMP_PREFIX}step-000002"]
    resumed = make_run(tmp_path)
    resumed.resume(store.latest())
    assert resumed.train() == "done" and resumed.distiller.step == 4
