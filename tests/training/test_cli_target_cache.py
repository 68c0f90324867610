"""flash-distill cache-targets end to end on the tiny random SD1.5-family model (CPU): build + verify, a run on
the cache equals the live run (losses and LoRA), a mismatching run refuses with exit 2, a corrupted shard
fails --verify with exit 5, a shard of another dataset's cache or one damaged while training stops with exit 2 and
one line naming it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from flash_core import target_cache
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
    assert "verified 4 targets" in stderr and "16 targets in 1 shards" in stderr  # 8 student updates (every batch updates the student) x batch 2
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
    opened = target_cache.TargetCache(cache)  # wrong targets in an intact, signed shard: what only --verify finds
    save_file(tensors, str(shard), metadata=target_cache.shard_metadata(opened.identity, opened.plan[0], tensors))
    config = root / "run.yaml"
    code, stderr = main_in_process(["cache-targets", "--config", str(config), "--target-cache", str(cache),
                                    "--verify", "4"], capsys)
    assert code == 5, stderr[-3000:]
    assert "failed verification" in stderr and shard.name in stderr and "Traceback" not in stderr


def test_a_shard_of_another_datasets_cache_stops_the_run_with_one_line(setup, capsys, tmp_path):
    """Same seed and settings, other images: the other cache's shard has the same name and shapes, and was used
    silently (only --verify found it). Refused before any work, naming the shard; cache-targets rebuilds it."""
    root, data = setup
    other_data = {"path": str(make_dataset(tmp_path / "other-data", 4)), "cache_dir": data["cache_dir"]}
    (tmp_path / "other-data" / "0.txt").write_text("a square of another colour", encoding="utf-8")
    other_cache = tmp_path / "other-cache"
    other_config = write_config(tmp_path / "other.yaml", output_dir=str(tmp_path / "o"), data=other_data, sample_every=0)
    code, stderr = main_in_process(["cache-targets", "--config", str(other_config), "--target-cache", str(other_cache)],
                                   capsys)
    assert code == 0, stderr[-3000:]
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "cache", mixed)
    shard = next(other_cache.glob("targets-*.safetensors"))
    shutil.copyfile(shard, mixed / shard.name)

    config = write_config(tmp_path / "run.yaml", output_dir=str(tmp_path / "out"), data=data, sample_every=0,
                          target_cache=str(mixed))
    code, stderr = main_in_process(["--config", str(config)], capsys)
    assert_one_line(code, stderr, "target_cache", shard.name, "was built for another target cache",
                    "run `flash-distill cache-targets` again")
    assert not (tmp_path / "out" / "checkpoints").exists()
    code, stderr = main_in_process(["cache-targets", "--config", str(config)], capsys)  # rebuilds that shard
    assert code == 0, stderr[-3000:]
    assert target_cache.TargetCache(mixed).damaged_shards() == {}


def test_a_shard_damaged_while_training_stops_with_one_line_not_a_traceback(setup, capsys, tmp_path, monkeypatch):
    root, data = setup
    cache = tmp_path / "cache"
    shutil.copytree(root / "cache", cache)
    real_check = target_cache.TargetCache.check

    damaged = []

    def check_then_damage(self, *args, **kwargs):  # the shard changes on disk after the run opened the cache
        real_check(self, *args, **kwargs)
        if damaged:
            return
        damaged.append(True)
        from safetensors import safe_open

        path = self.shard_path(0)
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata())
        tensors = load_file(str(path))
        tensors["targets"] = -tensors["targets"]
        save_file(tensors, str(path), metadata=metadata)  # the old checksum: damaged

    monkeypatch.setattr(target_cache.TargetCache, "check", check_then_damage)
    config = write_config(tmp_path / "run.yaml", output_dir=str(tmp_path / "out"), data=data, sample_every=0,
                          target_cache=str(cache))
    code, stderr = main_in_process(["--config", str(config)], capsys)
    assert_one_line(code, stderr, "target_cache", "targets-", "differ from the checksum", "delete it",
                    "Training stopped before step 1")
