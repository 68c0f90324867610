"""flash_core.target_cache on a tiny SD1.5 UNet: counter-based draws, a run on the cache equals the live run,
two students from one cache, an interrupted build finished by a second one, verify, the manifest contract, and
shards that carry their cache's identity (another dataset's, truncated or damaged ones are refused, naming them)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from flash_core import batches, distill, run, target_cache
from flash_core.backends.diffusers import UNetDenoiser
from flash_core.checkpoints import CheckpointStore
from flash_core.distill import FlashDistiller, student_updates, target_inputs
from tests.flash_core.test_backends import tiny_config, tiny_sd15_batch, tiny_sd15_unet
from tests.flash_core.test_run import tiny_dataset

# Alternating updates: only the even iterations need targets (the default, both every batch: test_session.py).
SETTINGS = {"total_steps": 8, "batch_size": 2, "lr": 1e-3, "alternate_updates": True}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_run(cache=None, store=None, **overrides) -> run.Run:
    distiller = FlashDistiller(UNetDenoiser(tiny_sd15_unet()), tiny_config("sd15", **{**SETTINGS, **overrides}))
    return run.Run(distiller, tiny_dataset(), target_cache=cache, store=store)


def build(folder, **kwargs) -> target_cache.TargetCache:
    teacher = UNetDenoiser(tiny_sd15_unet())  # no LoRA: the bare teacher, as the CLI builds it
    return target_cache.build_target_cache(folder, teacher, tiny_config("sd15", **SETTINGS), tiny_dataset(), **kwargs)


def rewrite_shard(cache: target_cache.TargetCache, index: int, change, sign: bool = True) -> None:
    """Change a stored shard's tensors in place; sign=True records the new checksum (targets that are wrong but
    intact: what only `verify` can find), sign=False keeps the old one (a damaged file)."""
    from safetensors import safe_open

    path = cache.shard_path(index)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    change(tensors)
    if sign:
        metadata = target_cache.shard_metadata(cache.identity, cache.plan[index], tensors)
    save_file(tensors, str(path), metadata=metadata)


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
    assert rows["sample_index"].tolist() == batches.batch_indices(0, 2, 4, 2)  # the dataset rows the run trains on
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
    rewrite_shard(broken, 1, lambda tensors: tensors["targets"][1].add_(0.01))  # one sample, intact and signed
    with pytest.raises(target_cache.TargetCacheError, match=f"{path.name}.*failed verification|failed verification.*{path.name}"):
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


# --------------------------------------------------------------------------------------------------
# Shards carry the identity of their cache; a damaged one stops the run before the step, with a checkpoint
# --------------------------------------------------------------------------------------------------


def test_a_shard_of_another_dataset_is_refused_naming_it_and_rebuilt_by_a_build(tmp_path, cache, live_run):
    """Same seed and settings, other data: the shard's targets look right (same shapes, grid indices, guidance)
    and were used silently; the shard now carries its cache's identity and is refused, naming it."""
    other = target_cache.build_target_cache(tmp_path / "other", UNetDenoiser(tiny_sd15_unet()),
                                            tiny_config("sd15", **SETTINGS), tiny_dataset(seed=1),
                                            teacher_batch=3, shard_targets=4)
    folder = tmp_path / "mixed"
    shutil.copytree(cache.folder, folder)
    shutil.copyfile(other.shard_path(1), folder / other.shard_path(1).name)  # same name: same iterations
    mixed = target_cache.TargetCache(folder)
    with pytest.raises(target_cache.TargetCacheError) as error:
        make_run(mixed)
    message = str(error.value)
    assert other.shard_path(1).name in message and "was built for another target cache" in message
    assert "delete it and run `flash-distill cache-targets` again" in message
    with pytest.raises(target_cache.TargetCacheError, match="another target cache"):  # read directly, too
        mixed.rows(4, 0)
    seen = []
    build(folder, teacher_batch=3, progress=lambda done, total: seen.append(done))
    assert seen == [2]  # the build rebuilt that shard only
    repaired = make_run(target_cache.TargetCache(folder))
    repaired.train()
    assert_same_training(live_run, repaired)


def test_a_truncated_shard_is_refused_when_the_run_opens_the_cache_and_a_build_rebuilds_it(tmp_path, cache):
    folder = tmp_path / "targets"
    shutil.copytree(cache.folder, folder)
    path = target_cache.TargetCache(folder).shard_path(1)
    path.write_bytes(path.read_bytes()[:-100])  # the header is intact, the data is not
    with pytest.raises(target_cache.TargetCacheError, match=rf"{path.name} cannot be read: it is truncated"):
        make_run(target_cache.TargetCache(folder))  # before the first step, not half-way
    build(folder, teacher_batch=3)
    make_run(target_cache.TargetCache(folder))


def test_a_shard_damaged_during_the_run_stops_before_the_step_and_keeps_a_checkpoint(tmp_path, cache, live_run):
    """A shard that turns unreadable while the run trains (its bytes changed, the header intact) stops the run at
    the first iteration that reads it, before anything of that iteration is applied, with a TargetCacheError
    naming the shard and what to do; the iterations done are checkpointed, and once the shard is rebuilt the
    resumed run ends where an uninterrupted one does."""
    folder = tmp_path / "targets"
    shutil.copytree(cache.folder, folder)
    damaged = target_cache.TargetCache(folder)
    trainer = make_run(damaged, store=CheckpointStore(tmp_path / "ckpt"))
    rewrite_shard(damaged, 1, lambda tensors: tensors["targets"][0].mul_(-1), sign=False)  # after the run opened it
    with pytest.raises(target_cache.TargetCacheError) as error:
        trainer.train()
    message = str(error.value)
    assert damaged.shard_path(1).name in message and "differ from the checksum" in message and "delete it" in message
    assert trainer.distiller.step == 4 and trainer.store.latest().name == "step-000004"  # iterations 0-3 kept

    damaged.shard_path(1).unlink()  # what the message says: delete it, build again
    build(folder, teacher_batch=3)
    resumed = make_run(target_cache.TargetCache(folder), store=CheckpointStore(tmp_path / "ckpt"))
    resumed.resume(resumed.store.latest())
    resumed.train()
    assert_same_training(live_run, resumed)


@pytest.mark.parametrize("change", ["no layout", "layout of another kind", "no backbone"])
def test_a_manifest_without_layout_is_refused_naming_the_file_and_key(tmp_path, cache, change):
    folder = tmp_path / "targets"
    shutil.copytree(cache.folder, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    key = "backbone" if change == "no backbone" else "layout"
    if change == "layout of another kind":
        manifest["layout"] = 4
    else:
        del manifest[key]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(target_cache.TargetCacheError) as error:  # was: KeyError 'layout'
        target_cache.TargetCache(folder)
    message = str(error.value)
    assert "manifest.json" in message and f"'{key}'" in message and "build the cache again" in message
