"""flash-distill end to end on the tiny random SD1.5-family model (CPU).

Asserts: bad configs and broken datasets stop with exit code 2 and one clear line (no traceback); a run
writes checkpoints, losses, a sample grid and LoRA exports that stock ComfyUI maps completely; a run
interrupted with Ctrl-C (then SIGKILLed) resumes to the bit-identical LoRA of an uninterrupted run; two DDP
processes (gloo, launched by `accelerate launch`) end with identical LoRA weights and resume exactly; the
diffusers export reproduces the student in diffusers; the SDXL path (pooled embeddings, time ids) runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from flash_core.grid import GRID_MIN_CELL

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO_ROOT / "training" / "configs" / "tiny_sd15.yaml"
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (240, 240, 240)]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_cli(args: list[str], timeout: float = 300, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = (launcher or [PYTHON, "-m"]) + ["training.cli", *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout, check=False)


def make_dataset(folder: Path, count: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (32, 32), COLOURS[i % len(COLOURS)]).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a square of colour {i}", encoding="utf-8")
    return folder


def write_config(path: Path, **overrides) -> Path:
    """The shipped tiny config with paths (and any other key) overridden; `data` overrides merge."""
    config = yaml.safe_load(TINY_CONFIG.read_text(encoding="utf-8"))
    data = overrides.pop("data", {})
    config["data"].update(data)
    config.update(overrides)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One cache folder for the module: the tiny model is built once, each dataset encoded once."""
    return tmp_path_factory.mktemp("flash-cache")


# --------------------------------------------------------------------------------------------------
# Fail fast: bad configs and broken data -> exit code 2, one line naming the key or file, no traceback
# --------------------------------------------------------------------------------------------------


def main_in_process(args: list[str], capsys) -> tuple[int, str]:
    from training.cli import main

    code = main(args)
    return code, capsys.readouterr().err


def assert_one_line(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith("flash-distill: error:")]
    assert len(error_lines) == 1, stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        ({"learning_rate": 0.1}, ["unknown key 'learning_rate'", "known keys"]),
        ({"data": {"resolutoin": 32}}, ["unknown key 'data.resolutoin'"]),
        ({"distill": {"teacher_grid_stpes": 4}}, ["unknown key 'distill.teacher_grid_stpes'"]),
        ({"distill": {"distill_loss": "l7"}}, ["distill_loss must be one of"]),
        ({"total_steps": -5}, ["total_steps must be an integer >= 1", "-5"]),
        ({"model": {"path": "/nonexistent/sd15"}}, ["model folder /nonexistent/sd15 does not exist"]),
        ({"backbone": "flux"}, ["backbone must be one of", "'flux'"]),
        ({"mixed_precision": "fp8"}, ["mixed_precision must be one of"]),
        ({"sample_steps": [0, 4]}, ["sample_steps"]),
        ({"data": {"resolution": 30}}, ["multiple of 8"]),
        ({"distill": {"teacher_grid_steps": 6}}, ["teacher_grid_steps (K = 6) must be a multiple of the 4-step"]),
    ],
    ids=["unknown-key", "unknown-data-key", "unknown-distill-key", "bad-distill-value", "negative-steps",
         "missing-model", "bad-backbone", "bad-precision", "bad-sample-steps", "bad-resolution", "bad-teacher-grid"],
)
def test_bad_config_fails_fast_with_one_line(tmp_path, capsys, overrides, fragments):
    data = make_dataset(tmp_path / "data", 1)
    overrides = dict(overrides)
    overrides["data"] = {"path": str(data), **overrides.get("data", {})}
    config = write_config(tmp_path / "bad.yaml", output_dir=str(tmp_path / "out"), **overrides)
    code, stderr = main_in_process(["--config", str(config)], capsys)
    assert_one_line(code, stderr, str(config), *fragments)
    assert not (tmp_path / "out").exists()


def test_the_old_steps_key_is_read_as_total_steps_with_a_deprecation_warning(tmp_path):
    from training.cli.config import load_config
    from training.cli.errors import ConfigError

    data = {"path": str(make_dataset(tmp_path / "data", 1))}
    config = yaml.safe_load(write_config(tmp_path / "new.yaml", output_dir=str(tmp_path / "out"), data=data).read_text())
    config["steps"] = config.pop("total_steps") + 4
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    loaded = load_config(tmp_path / "old.yaml")
    assert loaded.total_steps == config["steps"] and loaded.raw["total_steps"] == config["steps"] and "steps" not in loaded.raw
    assert len(loaded.deprecations) == 1 and "'steps' is deprecated, call it 'total_steps'" in loaded.deprecations[0]
    assert load_config(tmp_path / "new.yaml").deprecations == []
    config["total_steps"] = 8  # both names: which one was meant is unclear
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(ConfigError, match="'steps' is the old name of 'total_steps'; give only 'total_steps'"):
        load_config(tmp_path / "both.yaml")


def test_bad_config_exit_code_and_stderr_of_the_real_command(tmp_path):
    config = write_config(tmp_path / "bad.yaml", output_dir=str(tmp_path / "out"), total_steps=-1,
                          data={"path": str(make_dataset(tmp_path / "data", 1))})
    result = run_cli(["--config", str(config)], timeout=120)
    assert_one_line(result.returncode, result.stderr, "total_steps must be an integer >= 1")


@pytest.mark.parametrize("key,value,wanted", [
    ("alternate_updates", "false", "true or false (unquoted)"),  # quoted: text, which would switch it on
    ("grad_checkpointing", "no", "true or false (unquoted)"),
    ("teacher_grid_steps", 4.0, "a whole number"),
    ("teacher_grid_steps", "4", "a whole number"),
    ("distill_weights", [1, "x", 1, 1], "a list of finite numbers"),
    ("guidance_range", [2.0, float("inf")], "a list of finite numbers"),
    ("distill_loss", 2, "a string"),
])
def test_distill_overrides_of_the_wrong_type_stop_before_any_work(tmp_path, capsys, key, value, wanted):
    config = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"), distill={key: value},
                          data={"path": str(make_dataset(tmp_path / "d", 1))})
    assert_one_line(*main_in_process(["--config", str(config)], capsys), f"distill.{key}", wanted)
    assert not (tmp_path / "out").exists()


def test_guidance_mode_cfg_with_alternate_updates_stops_before_any_work(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"),
                          distill={"guidance_mode": "cfg", "alternate_updates": True},
                          data={"path": str(make_dataset(tmp_path / "d", 1))})
    assert_one_line(*main_in_process(["--config", str(config)], capsys), "distill:", "set alternate_updates to false")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "c\\d"])
def test_an_export_name_with_folders_stops_before_any_work(tmp_path, capsys, name):
    config = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"), export_name=name,
                          data={"path": str(make_dataset(tmp_path / "d", 1))})
    assert_one_line(*main_in_process(["--config", str(config)], capsys), "export_name", "plain file name")
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


def test_missing_config_file(tmp_path, capsys):
    assert_one_line(*main_in_process(["--config", str(tmp_path / "nope.yaml")], capsys), "nope.yaml does not exist")


def test_pickle_teacher_weights_are_refused_and_never_unpickled(tmp_path, capsys):
    """A diffusers folder whose UNet weights are a .bin (pickle) file: flash-distill stops naming it, and the pickle
    (here one that would write a marker file when loaded) is never opened."""
    import pickle

    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    (model / "unet" / "config.json").write_text("{}")
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    config = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"), model={"path": str(model)},
                          data={"path": str(make_dataset(tmp_path / "d", 1))})
    code, stderr = main_in_process(["--config", str(config)], capsys)
    assert_one_line(code, stderr, "diffusion_pytorch_model.bin", "pickle", "never loads", "safetensors")
    assert not marker.exists()


def test_custom_pipeline_code_in_the_model_folder_is_refused_and_never_runs(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    marker = tmp_path / "code-ran"
    (model / "model_index.json").write_text(json.dumps({"_class_name": ["evil_pipeline", "EvilPipeline"]}))
    (model / "evil_pipeline.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"), model={"path": str(model)},
                          data={"path": str(make_dataset(tmp_path / "d", 1))})
    code, stderr = main_in_process(["--config", str(config)], capsys)
    assert_one_line(code, stderr, "model.path", "custom pipeline", "never runs code from a model folder")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_resume_without_checkpoint_and_fresh_start_over_checkpoints_are_refused(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"), data={"path": str(make_dataset(tmp_path / "d", 1))})
    assert_one_line(*main_in_process(["--config", str(config), "--resume"], capsys), "no checkpoint in")
    (tmp_path / "out" / "checkpoints" / "step-000002").mkdir(parents=True)
    (tmp_path / "out" / "checkpoints" / "step-000002" / "meta.json").write_text("{}")
    assert_one_line(*main_in_process(["--config", str(config)], capsys), "already holds checkpoints", "--resume")


def test_empty_and_corrupt_datasets_fail_fast(tmp_path, capsys, shared_cache):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = write_config(tmp_path / "e.yaml", output_dir=str(tmp_path / "out-e"), data={"path": str(empty), "cache_dir": str(shared_cache)})
    assert_one_line(*main_in_process(["--config", str(config)], capsys), f"no images found in {empty}")

    no_caption = make_dataset(tmp_path / "nocap", 2)
    (no_caption / "1.txt").unlink()
    config = write_config(tmp_path / "n.yaml", output_dir=str(tmp_path / "out-n"), data={"path": str(no_caption), "cache_dir": str(shared_cache)})
    assert_one_line(*main_in_process(["--config", str(config)], capsys), f"caption file missing for {no_caption / '1.png'}")

    corrupt = make_dataset(tmp_path / "corrupt", 2)
    (corrupt / "0.png").write_bytes(b"not an image at all")
    config = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out-c"), data={"path": str(corrupt), "cache_dir": str(shared_cache)})
    assert_one_line(*main_in_process(["--config", str(config)], capsys), f"image {corrupt / '0.png'} cannot be decoded")
    assert not (tmp_path / "out-c" / "checkpoints").exists()


# --------------------------------------------------------------------------------------------------
# Training runs (subprocesses, one CPU thread each so reruns are bit-identical)
# --------------------------------------------------------------------------------------------------

RUN_OVERRIDES = {
    "total_steps": 12, "checkpoint_every": 2, "sample_every": 6, "distill": {"teacher_grid_steps": 4},
}
TIMING_KEYS = ("teacher_s", "student_s", "discriminator_s", "dmd_s")


def load_lora(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def losses_without_timings(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in records]


@pytest.fixture(scope="module")
def run_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("run-data"), 4)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, run_data, shared_cache) -> Path:
    """An uninterrupted 12-step run of the tiny model (every phase, every loss)."""
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root / "config.yaml", output_dir=str(root / "out"), data={"path": str(run_data), "cache_dir": str(shared_cache)}, **RUN_OVERRIDES)
    result = run_cli(["--config", str(config), "--dump-rank-lora"])
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "out"


def test_run_writes_checkpoints_losses_samples_and_exports(reference_run):
    import torch
    from safetensors import safe_open

    out = reference_run
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step-000010", "step-000012"]  # keep 2
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000012"
    records = losses_without_timings(out / "losses.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    assert [int(r["phase"]) for r in records] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert "loss_dmd" in records[-1] and "loss_adversarial" in records[-1] and "loss_dmd" not in records[0]

    grid = Image.open(out / "samples" / "step-000012.png")
    cell = 32 * -(-GRID_MIN_CELL // 32)  # 32 px samples, nearest-enlarged to at least GRID_MIN_CELL
    assert grid.height == 4 * cell and grid.width > 2 * cell  # rows: teacher + student 1/2/4 steps; a column per prompt
    assert (out / "samples" / "step-000006.png").is_file()

    trained = load_lora(out / "debug" / "lora-rank0.safetensors")
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)  # trained away from B = 0

    comfy_file = out / "export" / "flash-tiny-sd15_comfyui.safetensors"
    with safe_open(str(comfy_file), "pt") as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
    assert metadata["flash.rank"] == "4" and metadata["flash.alpha"] == "2" and metadata["flash.trained_steps"] == "12"
    assert metadata["flash.base_model"] == "random_tiny" and json.loads(metadata["flash.timesteps"]) == [999, 749, 499, 249]
    assert len(keys) == 3 * len(trained) // 2 and all(k.startswith("lora_unet_") for k in keys)

    adapter = json.loads((out / "export" / "peft" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 2 and adapter["peft_type"] == "LORA"
    peft_tensors = load_lora(out / "export" / "peft" / "adapter_model.safetensors")
    for key, value in trained.items():
        assert torch.equal(peft_tensors[f"base_model.model.{key}"], value)
    diffusers_tensors = load_lora(out / "export" / "diffusers" / "pytorch_lora_weights.safetensors")
    assert set(diffusers_tensors) == {f"unet.{key}" for key in trained}


# The LDM twin of training.cli.teacher.TINY_UNET (what ComfyUI would build for this UNet).
TINY_LDM_UNET = {
    "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
    "channel_mult": [1, 2], "num_heads": 4, "transformer_depth": [1, 0],
    "transformer_depth_output": [1, 1, 0, 0], "transformer_depth_middle": 1, "context_dim": 32,
    "use_spatial_transformer": True, "use_linear_in_transformer": False, "legacy": False,
}


def test_comfyui_export_loads_in_stock_lora_loader_with_every_key(reference_run, comfy_path, caplog):
    import logging
    from types import SimpleNamespace

    import comfy.lora
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        ldm_state = {f"diffusion_model.{k}": v for k, v in UNetModel(**TINY_LDM_UNET).state_dict().items()}

    class TinyComfyModel:  # what comfy.lora.model_lora_keys_unet reads from a ComfyUI model
        model_config = SimpleNamespace(unet_config=TINY_LDM_UNET)

        def state_dict(self):
            return ldm_state

    key_map = comfy.lora.model_lora_keys_unet(TinyComfyModel(), {})
    lora = load_lora(reference_run / "export" / "flash-tiny-sd15_comfyui.safetensors")
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora, key_map)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(patches) == len(lora) // 3  # every module (down, up, alpha) became one patch
    for target, patch in patches.items():
        up, down, alpha = patch.weights[:3]
        assert float(alpha) == 2.0  # the trained alpha: ComfyUI scales by alpha / rank
        assert ldm_state[target].shape[:2] == (up.shape[0], down.shape[1])  # B A has the weight's shape


# `python -m training.cli` with a gate before one step (FLASH_TEST_PAUSE_AT_STEP): the run writes <gate>/paused and
# waits there for <gate>/go, so a test can signal it at a known step whatever the machine's speed.
GATED_CLI = """
import os, sys, time
from pathlib import Path
from flash_core.distill import FlashDistiller
pause_at, gate = int(os.environ.get("FLASH_TEST_PAUSE_AT_STEP", "0")), Path(os.environ.get("FLASH_TEST_GATE", "."))
train_step = FlashDistiller.train_step
def gated(self, batch):
    if self.step + 1 == pause_at:
        (gate / "paused").touch()
        while not (gate / "go").exists():
            time.sleep(0.01)
    return train_step(self, batch)
FlashDistiller.train_step = gated
from training.cli.main import main
sys.exit(main())
"""


def test_ctrl_c_then_kill_then_resume_reaches_the_uninterrupted_lora(tmp_path, reference_run, run_data, shared_cache):
    import torch

    caches_before = {p.name: p.stat().st_mtime_ns for p in shared_cache.glob("*.safetensors")}
    config = write_config(tmp_path / "config.yaml", output_dir=str(tmp_path / "out"), data={"path": str(run_data), "cache_dir": str(shared_cache)}, **RUN_OVERRIDES)
    checkpoints = tmp_path / "out" / "checkpoints"
    gate = tmp_path / "gate"
    gate.mkdir()

    def start(*extra: str, pause_at: int = 0) -> subprocess.Popen:
        env = {**cli_env(), "FLASH_TEST_PAUSE_AT_STEP": str(pause_at), "FLASH_TEST_GATE": str(gate)}
        return subprocess.Popen([PYTHON, "-c", GATED_CLI, "--config", str(config), "--dump-rank-lora", *extra],
                                cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_for(path: Path, process: subprocess.Popen) -> None:
        deadline = time.monotonic() + 240  # a hang guard only: the gate, not the clock, orders the events
        while not path.is_file():
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)

    # 1) Ctrl-C during step 3 (the run is held at the gate before it): the run finishes the step, saves where it
    # stands and exits 130.
    process = start(pause_at=3)
    wait_for(gate / "paused", process)
    process.send_signal(signal.SIGINT)
    (gate / "go").touch()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Continue with --resume" in stderr and "Traceback" not in stderr
    stopped_at = int((checkpoints / "latest").read_text().strip().removeprefix("step-"))
    assert stopped_at == 3
    assert not (tmp_path / "out" / "export").exists()

    # 2) Resume, then SIGKILL (no chance to save) after a later checkpoint: only complete checkpoints remain.
    (gate / "paused").unlink()
    (gate / "go").unlink()
    process = start("--resume", pause_at=7)  # held before step 7: the step-4 and step-6 checkpoints are written
    wait_for(gate / "paused", process)
    process.kill()
    process.communicate(timeout=60)
    assert (checkpoints / "latest").read_text().strip() == "step-000006"
    assert (checkpoints / "step-000006" / "state.flashckpt").is_file()

    # 3) Resume to the end: the same LoRA and the same losses as the run that was never interrupted.
    result = run_cli(["--config", str(config), "--dump-rank-lora", "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    resumed = load_lora(tmp_path / "out" / "debug" / "lora-rank0.safetensors")
    reference = load_lora(reference_run / "debug" / "lora-rank0.safetensors")
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key  # bit-identical
    assert losses_without_timings(tmp_path / "out" / "losses.jsonl") == losses_without_timings(reference_run / "losses.jsonl")
    # the dataset was encoded once (by the reference run): no cache file was rewritten
    assert {p.name: p.stat().st_mtime_ns for p in shared_cache.glob("*.safetensors")} == caches_before


@pytest.mark.slow  # several processes: make test, not test-fast
def test_two_ddp_processes_end_with_identical_lora_and_resume_exactly(tmp_path, run_data, shared_cache):
    import torch

    config = write_config(tmp_path / "config.yaml", output_dir=str(tmp_path / "out"), data={"path": str(run_data), "cache_dir": str(shared_cache)},
                          total_steps=8, checkpoint_every=4, sample_every=0, distill={"teacher_grid_steps": 4})
    launcher = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "-m"]
    result = run_cli(["--config", str(config), "--dump-rank-lora"], launcher=launcher, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = load_lora(tmp_path / "out" / "debug" / "lora-rank0.safetensors")
    rank1 = load_lora(tmp_path / "out" / "debug" / "lora-rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(v.abs().max() > 0 for k, v in rank0.items() if "lora_B" in k)
    checkpoint = tmp_path / "out" / "checkpoints" / "step-000008"
    assert (checkpoint / "rank-0.flashckpt").is_file() and (checkpoint / "rank-1.flashckpt").is_file()
    assert json.loads((checkpoint / "meta.json").read_text())["num_processes"] == 2

    # Resuming both ranks from the middle (each with its own RNG and data-order state) ends on the same LoRA.
    halfway = tmp_path / "out" / "checkpoints" / "step-000004"
    shutil.rmtree(checkpoint)  # going back to step 4: the later checkpoint is deleted first (resume refuses otherwise)
    again = run_cli(["--config", str(config), "--dump-rank-lora", "--resume", str(halfway)], launcher=launcher, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    for rank in (0, 1):
        resumed = load_lora(tmp_path / "out" / "debug" / f"lora-rank{rank}.safetensors")
        assert all(torch.equal(resumed[k], rank0[k]) for k in rank0)


def test_diffusers_export_loads_in_diffusers_and_applies_alpha_over_rank(reference_run, shared_cache):
    """diffusers' load_lora_weights on the export == the base UNet with W + (alpha / r) B A merged from the
    PEFT export (what the student computed during training)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    model_folder = next(shared_cache.glob("tiny-sd15-*"))
    adapter = json.loads((reference_run / "export" / "peft" / "adapter_config.json").read_text())
    peft_tensors = load_lora(reference_run / "export" / "peft" / "adapter_model.safetensors")
    merged = UNet2DConditionModel.from_pretrained(str(model_folder), subfolder="unet")
    weights = dict(merged.named_parameters())
    scale = adapter["lora_alpha"] / adapter["r"]
    with torch.no_grad():
        for key, down in peft_tensors.items():
            if key.endswith("lora_A.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                up = peft_tensors[key.replace("lora_A", "lora_B")]
                weights[f"{module}.weight"] += scale * up @ down  # W + (alpha / r) B A

    pipeline = StableDiffusionPipeline.from_pretrained(str(model_folder), safety_checker=None, requires_safety_checker=False)
    pipeline.load_lora_weights(str(reference_run / "export" / "diffusers"), weight_name="pytorch_lora_weights.safetensors")
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        expected = merged(sample, 500, encoder_hidden_states=context).sample
        loaded = pipeline.unet(sample, 500, encoder_hidden_states=context).sample
        pipeline.unet.disable_lora()
        base = pipeline.unet(sample, 500, encoder_hidden_states=context).sample
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-5)
    assert (loaded - base).abs().max() > 1e-4  # the LoRA changes the output


@pytest.mark.parametrize("name", ["sd15", "sdxl", "pixart", "sd3", "tiny_sd15"])
def test_shipped_configs_validate(tmp_path, name):
    """Every shipped config uses known keys and valid values once its model / data paths exist."""
    from flash_core.recipes import get_recipe
    from training.cli.config import validate_config

    raw = yaml.safe_load((REPO_ROOT / "training" / "configs" / f"{name}.yaml").read_text(encoding="utf-8"))
    if "path" in raw["model"]:
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "model_index.json").write_text('{"_class_name": "DiffusionPipeline"}')
        raw["model"]["path"] = str(tmp_path / "model")
    raw["data"]["path"] = str(make_dataset(tmp_path / "data", 1))
    config = validate_config(raw, Path(f"{name}.yaml"))
    assert config.backbone == raw["backbone"]
    get_recipe(config.backbone)
    assert config.output_dir == Path(raw["output_dir"])


def build_tiny_sdxl(folder: Path) -> Path:
    """A random SDXL-family diffusers folder: two CLIP text encoders (pooled + time ids), text_time UNet."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    from training.cli.teacher import TINY_TEXT_ENCODER, TINY_VAE, tiny_tokenizer_folder

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32, transformer_layers_per_block=(1, 2),
        norm_num_groups=8,
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_tokenizer_folder()))
    tokenizer.model_max_length = 77
    pipeline = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**TINY_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT_ENCODER)), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    )
    pipeline.save_pretrained(str(folder))
    return folder


def test_sdxl_backbone_from_a_diffusers_folder(tmp_path, capsys, run_data):
    """backbone sdxl from a model folder: pooled embeddings + time ids are cached, zeros uncond, exports."""
    from safetensors.torch import load_file

    model = build_tiny_sdxl(tmp_path / "sdxl")
    config = write_config(
        tmp_path / "sdxl.yaml", backbone="sdxl", model={"path": str(model)}, output_dir=str(tmp_path / "out"),
        data={"path": str(run_data), "cache_dir": str(tmp_path / "cache")}, total_steps=4, checkpoint_every=4, sample_every=4,
        export_name="flash-tiny-sdxl",
    )
    code, stderr = main_in_process(["--config", str(config)], capsys)
    assert code == 0, stderr[-3000:]
    cache = load_file(str(next((tmp_path / "cache").glob("latents-*.safetensors"))))
    assert cache["cond.encoder_hidden_states"].shape == (4, 77, 64)  # CLIP-L + CLIP-G penultimate states
    assert cache["cond.pooled"].shape == (4, 32)
    assert cache["cond.time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 4  # size, crop, target
    grid, cell = Image.open(tmp_path / "out" / "samples" / "step-000004.png"), 32 * -(-GRID_MIN_CELL // 32)
    assert grid.height == 4 * cell and grid.width > 2 * cell
    assert (tmp_path / "out" / "export" / "flash-tiny-sdxl_comfyui.safetensors").is_file()
    assert (tmp_path / "out" / "export" / "peft" / "adapter_config.json").is_file()


# --------------------------------------------------------------------------------------------------
# Nothing silent: a non-finite run stops (exit 3) and keeps its good checkpoints; resume compares settings
# --------------------------------------------------------------------------------------------------


def test_exploding_learning_rate_stops_with_one_line_and_keeps_the_good_checkpoints(tmp_path, capsys, run_data, shared_cache):
    import re

    import torch

    from training.cli.errors import EXIT_NON_FINITE

    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", output_dir=str(out), data={"path": str(run_data), "cache_dir": str(shared_cache)},
                          total_steps=8, checkpoint_every=1, keep_checkpoints=2, sample_every=0, lr=1e30, distill={"teacher_grid_steps": 4})
    code, stderr = main_in_process(["--config", str(config)], capsys)
    assert code == EXIT_NON_FINITE == 3, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("flash-distill: error:")]
    assert len(errors) == 1 and "not finite" in errors[0] and "learning rate is too high" in errors[0], stderr[-3000:]
    step = int(re.search(r"stopped at step (\d+)", errors[0]).group(1))
    assert step >= 2
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept and kept[-1] == f"step-{step - 1:06d}"  # the good ones stay; none of the bad step
    assert (out / "checkpoints" / "latest").read_text().strip() == kept[-1]
    assert kept[-1] in errors[0]  # the message names the checkpoint that is kept
    for name in kept:
        state = torch.load(out / "checkpoints" / name / "state.flashckpt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["distiller"]["lora"].values())
    assert not (out / "export").exists()  # nothing exported


def test_resume_with_changed_settings_is_refused_then_allowed_explicitly(tmp_path, capsys, run_data, shared_cache):
    data = {"path": str(run_data), "cache_dir": str(shared_cache)}
    config = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"), data=data, total_steps=2, checkpoint_every=2,
                          sample_every=0, export=["comfyui"], distill={"teacher_grid_steps": 4})
    code, stderr = main_in_process(["--config", str(config)], capsys)
    assert code == 0, stderr[-3000:]
    changed = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"), data=data, total_steps=2, checkpoint_every=2,
                           sample_every=0, export=["comfyui"], lr=0.002, distill={"teacher_grid_steps": 4, "guidance_range": [2.0, 4.0]})
    assert_one_line(*main_in_process(["--config", str(changed), "--resume"], capsys),
                    "other settings", "lr: checkpoint 0.001, now 0.002", "guidance_range: checkpoint", "--allow-changes")
    code, stderr = main_in_process(["--config", str(changed), "--resume", "--allow-changes"], capsys)
    assert code == 0, stderr[-3000:]
    assert "continuing despite a changed lr" in stderr


def test_a_second_run_on_the_same_output_is_refused_naming_the_first(tmp_path, capsys):
    import textwrap

    out = tmp_path / "out"
    holder = subprocess.Popen([PYTHON, "-c", textwrap.dedent(f"""
        import time
        from flash_core.files import OutputLock
        with OutputLock({str(out)!r}, what="flash-distill --config first.yaml"):
            print("locked", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = write_config(tmp_path / "c.yaml", output_dir=str(out), data={"path": str(make_dataset(tmp_path / "d", 1))})
        code, stderr = main_in_process(["--config", str(config)], capsys)
        assert_one_line(code, stderr, "in use by another training run", f"pid {holder.pid}", "first.yaml")
        assert not (out / "checkpoints").exists()
    finally:
        holder.kill()
