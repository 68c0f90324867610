"""flash-distill cache-targets end to end on the tiny random SD1.5-family model (CPU): build + verify, a run on
the cache equals the live run (losses and LoRA), a mismatching run refuses with exit 2, a corrupted shard
fails --verify with exit 5."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.training.test_cli import assert_one_line, main_in_process, make_dataset, write_config

TIMINGS = ("teacher_s", "student_s", "discriminator_s", "dmd_s", "step_s")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("target-cache")
    data = make_dataset(root / "data", 4)
    return root, {"path": str(data), "cache_dir": str(root / "encoded")}


def losses(out) -> list[dict]:
    lines = (out / "losses.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def test_cache_targets_then_training_on_it_equals_the_live_run(setup, capsys):
    root, data = setup
    cache = root / "cache"
    config = write_config(root / "run.yaml", output_dir=str(root / "live"), data=data, sample_every=0)
    code, stderr = main_in_process(["cache-targets", "--config", str(config), "--target-cache", str(cache),
                                    "--teacher-batch", "3", "--verify", "2"], capsys)
    assert code == 0, stderr[-3000:]
    assert "verified 4 targets" in stderr and "8 targets in 1 shards" in stderr
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["total_steps"] == 8 and manifest["teacher_grid_steps"] == 4

    code, stderr = main_in_process(["--config", str(config), "--dump-rank-lora"], capsys)
    assert code == 0, stderr[-3000:]
    cached_config = write_config(root / "cached.yaml", output_dir=str(root / "cached"), data=data, sample_every=0,
                                 target_cache=str(cache))
    code, stderr = main_in_process(["--config", str(cached_config), "--dump-rank-lora"], capsys)
    assert code == 0, stderr[-3000:]
    live, cached = losses(root / "live"), losses(root / "cached")
    assert len(live) == 8 and [r.keys() for r in live] == [r.keys() for r in cached]
    for a, b in zip(live, cached):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    la = load_file(str(root / "live" / "debug" / "lora-rank0.safetensors"))
    lb = load_file(str(root / "cached" / "debug" / "lora-rank0.safetensors"))
    # the cache solves the teacher in batches of 3, the live run in its own batch: float rounding differs, and
    # Adam turns tiny gradient differences into parts of a step. Tolerance: a tenth of one Adam step (lr 1e-3),
    # as in tests/nodes/test_one_run.py; a wrong target moves the LoRA by whole steps.
    assert la.keys() == lb.keys()
    assert max(float((la[k] - lb[k]).abs().max()) for k in la) < 1e-4


def test_a_run_of_other_settings_refuses_the_cache_and_verify_catches_a_corrupted_shard(setup, capsys):
    root, data = setup
    cache = root / "cache"
    if not (cache / "manifest.json").is_file():
        pytest.fail("needs the cache of the previous test (run the module)")
    other = write_config(root / "other.yaml", output_dir=str(root / "other"), data=data, sample_every=0, seed=3)
    code, stderr = main_in_process(["--config", str(other), "--target-cache", str(cache)], capsys)
    assert_one_line(code, stderr, "target_cache", "seed: cache 0, run 3")
    assert not (root / "other" / "checkpoints").exists()

    shard = next(cache.glob("targets-*.safetensors"))
    tensors = load_file(str(shard))
    tensors["targets"] = tensors["targets"] + 0.05
    save_file(tensors, str(shard))
    config = root / "run.yaml"
    code, stderr = main_in_process(["cache-targets", "--config", str(config), "--target-cache", str(cache),
                                    "--verify", "4"], capsys)
    assert code == 5, stderr[-3000:]
    assert "failed verification" in stderr and shard.name in stderr and "Traceback" not in stderr
