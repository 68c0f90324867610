"""flash-distill refuses what it cannot train right, before any work: one line naming the config file, the key
(or the teacher folder's file), the value and what to do; exit 2, no traceback (issue 23, second round)."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from tests.training.test_cli import assert_one_line, main_in_process, make_dataset, write_config


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """The tiny random SD1.5-family pipeline folder flash-distill builds for `model.random_tiny`."""
    from training.cli.teacher import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline", seed=0)


def refused(tmp_path, capsys, *fragments, **overrides):
    """Run the CLI on the tiny config with `overrides`: exit 2 and one line holding the config path and `fragments`,
    and nothing written to output_dir."""
    data = {"path": str(make_dataset(tmp_path / "data", 1)), **overrides.pop("data", {})}
    config = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"), data=data, **overrides)
    code, stderr = main_in_process(["--config", str(config)], capsys)
    assert_one_line(code, stderr, str(config), *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, fragments", [
    ({"lr": float("nan")}, ["lr must be a positive number", "nan"]),
    ({"seed": 2**40}, ["seed must be an integer from 0 to 4294967295", str(2**40)]),
    ({"teacher_sample_steps": 10**9}, ["teacher_sample_steps must be an integer from 1 to 1000", str(10**9)]),
    ({"sample_prompts": []}, ["sample_prompts is an empty list", "leave the key out"]),
    ({"distill": {"teacher_grid_steps": 4, "distill_weights": [1, float("inf"), 1, 1]}},
     ["distill.distill_weights must be a list of finite numbers"]),
    ({"distill": {"teacher_grid_steps": 4, "lora_targets": ["to_q", "to_qq"]}},
     ["distill.lora_targets", "'to_qq' names no layer of the sd15 network", "to_out.0", "leave the key out"]),
    ({"distill": {"teacher_grid_steps": 4, "lora_targets": []}}, ["distill.lora_targets", "(an empty list)"]),
], ids=["nan-lr", "huge-seed", "huge-teacher-sample-steps", "empty-sample-prompts", "inf-loss-weight",
        "unknown-lora-target", "no-lora-target"])
def test_values_that_fail_later_stop_before_any_work(tmp_path, capsys, overrides, fragments):
    refused(tmp_path, capsys, *fragments, **overrides)


def test_known_lora_targets_are_accepted(tmp_path):
    from training.cli.config import load_config

    config = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"),
                          data={"path": str(make_dataset(tmp_path / "data", 1))},
                          distill={"teacher_grid_steps": 4, "lora_targets": ["to_q", "to_out.0", "proj_in"]})
    assert load_config(config).distill["lora_targets"] == ["to_q", "to_out.0", "proj_in"]


def test_a_model_path_that_is_a_file_is_named_a_file(tmp_path, capsys):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"\0" * 16)
    refused(tmp_path, capsys, f"{checkpoint} is a file", "diffusers pipeline folder", "save_pretrained",
            model={"path": str(checkpoint)})


@pytest.mark.parametrize("change, fragments", [
    ("broken json", ["scheduler_config.json", "is not valid JSON", "re-save the pipeline"]),
    ("unknown class", ["scheduler_config.json", "'_class_name' is 'NoSuchScheduler'", "not a scheduler class"]),
    ("unknown prediction", ["'prediction_type' is 'x_start'", "epsilon or v_prediction"]),
    ("zero snr", ["'rescale_betas_zero_snr' is True", "SD noise schedule"]),
    ("other schedule", ["'beta_schedule' is 'linear'", "SD noise schedule"]),
])
def test_a_broken_or_unknown_scheduler_config_stops_before_any_work(tmp_path, capsys, tiny_pipeline, change, fragments):
    folder = tmp_path / "teacher"
    shutil.copytree(tiny_pipeline, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    if change == "broken json":
        path.write_text('{"_class_name": "DDPMScheduler",')
    else:
        config.update({"unknown class": {"_class_name": "NoSuchScheduler"},
                       "unknown prediction": {"prediction_type": "x_start"},
                       "zero snr": {"rescale_betas_zero_snr": True},
                       "other schedule": {"beta_schedule": "linear"}}[change])
        path.write_text(json.dumps(config))
    refused(tmp_path, capsys, "model.path", *fragments, model={"path": str(folder)})


def test_the_teacher_folders_own_schedule_and_v_prediction_pass(tmp_path, tiny_pipeline):
    from training.cli.config import load_config

    folder = tmp_path / "teacher"
    shutil.copytree(tiny_pipeline, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "v_prediction"}))
    data = {"path": str(make_dataset(tmp_path / "data", 1))}
    config = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"), data=data, model={"path": str(folder)},
                          distill={"teacher_grid_steps": 4, "lora_targets": ["to_k"]})
    assert load_config(config).model_path == folder


def test_an_unknown_lora_target_of_a_teacher_folder_is_refused(tmp_path, capsys, tiny_pipeline):
    refused(tmp_path, capsys, "distill.lora_targets", "'attn9' names no layer", model={"path": str(tiny_pipeline)},
            distill={"teacher_grid_steps": 4, "lora_targets": ["attn9"]})


def test_the_tiny_model_folder_follows_the_umask(tiny_pipeline):
    """It was built in a mkdtemp folder and moved in whole, so it kept mkdtemp's private 0700."""
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(tiny_pipeline.stat().st_mode) == 0o777 & ~mask


def test_resuming_from_an_older_checkpoint_is_refused_until_the_later_ones_are_deleted(tmp_path, capsys):
    """`--resume <older checkpoint> --allow-changes` replaced the later checkpoints and the exported LoRA without
    a word: refused in one line naming them; deleting them is the confirmation, and then it resumes."""
    data = {"path": str(make_dataset(tmp_path / "data", 2)), "cache_dir": str(tmp_path / "cache")}
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", output_dir=str(out), data=data, total_steps=4, checkpoint_every=2,
                          sample_every=0, export=["comfyui"])
    code, stderr = main_in_process(["--config", str(config)], capsys)
    assert code == 0, stderr[-3000:]
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-000002", "step-000004"]
    export = next((out / "export").glob("*.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in [export, *checkpoints.glob("step-000004/*")]}

    older = checkpoints / "step-000002"
    code, stderr = main_in_process(["--config", str(config), "--resume", str(older), "--allow-changes"], capsys)
    assert_one_line(code, stderr, "--resume", f"{older} is step 2", "later checkpoints (step-000004)",
                    "delete step-000004 first", "exported LoRA")
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing replaced

    shutil.rmtree(checkpoints / "step-000004")  # the user's confirmation
    code, stderr = main_in_process(["--config", str(config), "--resume", str(older)], capsys)
    assert code == 0 and "resumed from" in stderr and "at step 2" in stderr, stderr[-3000:]
