"""flash_core.target_cache on a tiny SD1.5 UNet: counter-based draws, a run on the cache equals the live run,
two students from one cache, an interrupted build finished by a second one, verify, and the manifest contract."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from flash_core import distill, run, target_cache
from flash_core.backends.diffusers import UNetDenoiser
from flash_core.distill import FlashDistiller, student_updates, target_inputs
from tests.flash_core.test_backends import tiny_config, tiny_sd15_batch, tiny_sd15_unet
from tests.flash_core.test_run import tiny_dataset

SETTINGS = {"total_steps": 8, "batch_size": 2, "lr": 1e-3}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_run(cache=None, **overrides) -> run.Run:
    distiller = FlashDistiller(UNetDenoiser(tiny_sd15_unet()), tiny_config("sd15", **{**SETTINGS, **overrides}))
    return run.Run(distiller, tiny_dataset(), target_cache=cache)


def build(folder, **kwargs) -> target_cache.TargetCache:
    teacher = UNetDenoiser(tiny_sd15_unet())  # no LoRA: the bare teacher, as the CLI builds it
    return target_cache.build_target_cache(folder, teacher, tiny_config("sd15", **SETTINGS), tiny_dataset(), **kwargs)


def lora(trainer: run.Run) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.distiller.lora_state_dict().items()}


def losses(trainer: run.Run) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k.startswith("loss") or k in ("grid_index", "guidance")} for h in trainer.history]


def assert_same_training(live: run.Run, cached: run.Run) -> None:
    a, b = losses(live), losses(cached)
    assert [h.keys() for h in a] == [h.keys() for h in b] and len(a) == SETTINGS["total_steps"]
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-6)
    la, lb = lora(live), lora(cached)
    assert la.keys() == lb.keys()
    assert all(torch.allclose(la[k], lb[k], rtol=1e-4, atol=1e-6) for k in la)
    assert any(float(v.abs().max()) > 0 for k, v in lb.items() if ".lora_B." in k)  # the student did train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # teacher_batch 3: batches of the build mix iterations and split groups, unlike the live run's
    return build(tmp_path_factory.mktemp("cache") / "targets", teacher_batch=3, shard_targets=4)


@pytest.fixture(scope="module")
def live_run():
    trainer = make_run()
    trainer.train()
    return trainer


def test_target_draws_are_a_function_of_seed_process_and_step():
    config = tiny_config("sd15", **SETTINGS)
    a = target_inputs(config, 6, 0, (2, 4, 8, 8))
    for step in (0, 3):  # drawing other steps first changes nothing
        target_inputs(config, step, 0, (2, 4, 8, 8))
    b = target_inputs(config, 6, 0, (2, 4, 8, 8))
    assert (a.grid_index, a.guidance) == (b.grid_index, b.guidance) and torch.equal(a.noise, b.noise)
    others = [target_inputs(config, 6, 1, (2, 4, 8, 8)), target_inputs(config, 4, 0, (2, 4, 8, 8)),
              target_inputs(tiny_config("sd15", **{**SETTINGS, "seed": 1}), 6, 0, (2, 4, 8, 8))]
    assert all(not torch.equal(a.noise, o.noise) and a.guidance != o.guidance for o in others)

    distiller = FlashDistiller(UNetDenoiser(tiny_sd15_unet()), config)
    distiller.step = 6  # straight to an iteration: the trainer draws what target_inputs says
    logs = distiller.train_step(tiny_sd15_batch())
    assert (logs["grid_index"], logs["guidance"]) == (a.grid_index, a.guidance)
    assert student_updates(config) == [0, 2, 4, 6]


def test_a_run_on_the_cache_equals_the_live_run(cache, live_run, monkeypatch):
    assert not cache.missing_shards() and len(cache.plan) == 2  # 4 student updates of 2 samples, 4 per shard
    rows = cache.rows(2, 0)
    assert rows["targets"].shape == (2, 4, 8, 8) and rows["position"].tolist() == [0, 1]
    assert rows["sample_index"].tolist() == run.batch_indices(0, 2, 4, 2)  # the dataset rows the run trains on
    cached = make_run(cache)

    def no_solve(*args, **kwargs):
        raise AssertionError("the cached run solved a teacher target")

    monkeypatch.setattr(distill, "teacher_target", no_solve)
    cached.train()
    assert_same_training(live_run, cached)


def test_two_students_from_one_cache(cache):
    for overrides in ({"lr": 3e-3}, {"lora_rank": 8, "lora_alpha": 8}):
        live = make_run(**overrides)
        live.train()
        cached = make_run(cache, **overrides)
        cached.train()
        assert_same_training(live, cached)


def test_an_interrupted_build_is_finished_by_the_next_one(tmp_path, cache):
    folder = tmp_path / "targets"

    def stop_after_first(done, total):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(folder, teacher_batch=3, shard_targets=4, progress=stop_after_first)
    partial = target_cache.TargetCache(folder)
    assert partial.missing_shards() == [1]
    with pytest.raises(target_cache.TargetCacheError, match="incomplete"):
        make_run(partial)
    first = partial.shard_path(0)
    stamp = first.stat().st_mtime_ns
    seen = []
    finished = build(folder, teacher_batch=3, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 2)]  # only the missing shard was solved
    assert first.stat().st_mtime_ns == stamp
    for index in range(2):
        a, b = load_file(str(finished.shard_path(index))), load_file(str(cache.shard_path(index)))
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_verify_passes_a_good_cache_and_catches_a_corrupted_shard(tmp_path, cache):
    teacher = UNetDenoiser(tiny_sd15_unet())
    config, dataset = tiny_config("sd15", **SETTINGS), tiny_dataset()
    report = cache.verify(teacher, config, dataset, count=4)
    assert report["checked"] == 8 and report["max_error"] < report["tolerance"]

    folder = tmp_path / "targets"
    build(folder, teacher_batch=3, shard_targets=4)
    broken = target_cache.TargetCache(folder)
    path = broken.shard_path(1)
    tensors = load_file(str(path))
    tensors["targets"][1] += 0.01  # one sample of one shard
    save_file(tensors, str(path))
    with pytest.raises(target_cache.TargetCacheError, match=path.name):
        broken.verify(teacher, config, dataset, count=4)
    path.write_bytes(path.read_bytes()[:100])  # a truncated file: refused with the file named
    with pytest.raises(target_cache.TargetCacheError, match=f"{path.name} cannot be read"):
        target_cache.TargetCache(folder).rows(4, 0)


def test_a_manifest_mismatch_refuses_with_every_difference(tmp_path, cache):
    with pytest.raises(target_cache.TargetCacheMismatchError) as error:
        make_run(cache, seed=1, guidance_range=(2.0, 3.0))
    assert [d.split(":")[0] for d in error.value.differences] == ["guidance_range", "seed"]
    with pytest.raises(target_cache.TargetCacheMismatchError, match="data_fingerprint"):
        distiller = FlashDistiller(UNetDenoiser(tiny_sd15_unet()), tiny_config("sd15", **SETTINGS))
        run.Run(distiller, tiny_dataset(seed=1), target_cache=cache)
    with pytest.raises(target_cache.TargetCacheMismatchError, match="total_steps"):  # a build into it refuses too
        target_cache.build_target_cache(cache.folder, UNetDenoiser(tiny_sd15_unet()),
                                        tiny_config("sd15", **{**SETTINGS, "total_steps": 12}), tiny_dataset())
    trainer = make_run(cache)  # and a run whose draws differ from the stored ones stops at once
    trainer.distiller.sample_grid_index = lambda phase=None, generator=None: 3
    with pytest.raises(target_cache.TargetCacheError, match="disagrees with this run at iteration 0"):
        trainer.train()
