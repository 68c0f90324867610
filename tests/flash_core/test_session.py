"""flash_core.session.TrainingSession: the one owner of a training session (lock, identities, student, target cache,
resume, loop, export) that the node, the CLI and the benchmarks drive."""

from __future__ import annotations

import ast

import pytest
import torch

from flash_core import files
from flash_core.backends.diffusers import UNetDenoiser
from flash_core.distill import DistillConfig
from flash_core.run import RunHooks
from flash_core.session import TrainingSession
from tests.flash_core.test_backends import tiny_config, tiny_sd15_unet
from tests.flash_core.test_run import tiny_dataset
from tests.test_layering import REPO_ROOT, imported_modules

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_session(tmp_path=None, unet=None, hooks=None, **kwargs) -> TrainingSession:
    config = tiny_config("sd15", total_steps=4, batch_size=2, lr=1e-3)
    folders = {"output": tmp_path / "out", "checkpoints": tmp_path / "out" / "ckpt"} if tmp_path is not None else {}
    return TrainingSession(UNetDenoiser(unet if unet is not None else tiny_sd15_unet()), config, tiny_dataset(),
                           hooks=hooks, **folders, **kwargs)


def lora_of(session: TrainingSession) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in session.distiller.lora_state_dict().items()}


def test_a_second_session_on_the_same_output_is_refused_naming_the_holder(tmp_path):
    with make_session(tmp_path, output_label="the first run"):
        with pytest.raises(files.OutputLockedError, match="the first run"):
            make_session(tmp_path, output_label="the second run").open()
    with make_session(tmp_path, output_label="the second run"):  # released on exit
        pass


def test_the_session_cleans_what_a_killed_run_left_half_written_once_it_holds_the_lock(tmp_path):
    orphan = tmp_path / "out" / f"{files.TEMP_PREFIX}step-000002"
    orphan.mkdir(parents=True)
    with make_session(tmp_path):
        assert not orphan.exists()


def test_the_recipe_is_resolved_once_per_session(monkeypatch):
    config = tiny_config("sd15", total_steps=4, batch_size=2, lr=1e-3)  # (validating a config resolves it once)
    calls = []
    original = DistillConfig.recipe
    monkeypatch.setattr(DistillConfig, "recipe", lambda self: calls.append(1) or original(self))
    session = TrainingSession(UNetDenoiser(tiny_sd15_unet()), config, tiny_dataset())
    session.train()
    assert session.step == 4 and len(calls) == 1  # the session's own resolution; the trainer and every step reuse it
    assert session.distiller.recipe is session.recipe


class StopAt(RunHooks):
    def __init__(self, step: int):
        self.step, self.at = 0, step

    def on_step(self, report) -> None:
        self.step = report.step

    def should_stop(self) -> bool:
        return self.step == self.at


def test_a_stopped_session_resumed_from_latest_gives_the_uninterrupted_lora(tmp_path):
    straight = make_session()
    straight.train()
    first = make_session(tmp_path, hooks=StopAt(2))
    with first:
        assert first.train() == "stopped" and first.step == 2
    second = make_session(tmp_path)
    with second:
        assert second.latest_checkpoint().name == "step-000002"
        assert second.start(resume="latest") == [] and second.step == 2
        assert second.train() == "done"
    for key, value in lora_of(straight).items():
        torch.testing.assert_close(lora_of(second)[key], value, rtol=0, atol=1e-6)


def test_targets_built_by_one_session_train_another_like_the_live_teacher(tmp_path, monkeypatch):
    live = make_session()
    live.train()
    builder = make_session()
    cache = builder.targets(tmp_path / "targets", build=True)
    assert not cache.missing_shards() and builder.distiller is None  # building needs the teacher only, no student
    cached = make_session()
    cached.targets(tmp_path / "targets", build=False)
    from flash_core import distill

    def no_solve(*args, **kwargs):
        raise AssertionError("the teacher was solved although the session has its targets cached")

    monkeypatch.setattr(distill, "teacher_target", no_solve)  # read, not solved
    cached.train()
    monkeypatch.undo()
    for a, b in zip(live.history, cached.history, strict=True):  # the same targets: the same losses at every step
        assert {k: v for k, v in a.items() if k.startswith("loss")} == pytest.approx(
            {k: v for k, v in b.items() if k.startswith("loss")}, rel=1e-5)
    # the cache's targets are solved in other batches than the live run's: rounding apart, which Adam's step (lr 1e-3
    # whatever the gradient's size) can blow up on a near-zero gradient element to ~1e-5; a tenth of a step allowed
    for key, value in lora_of(live).items():
        torch.testing.assert_close(lora_of(cached)[key], value, rtol=1e-4, atol=1e-4)


def test_a_partial_slice_of_training_keeps_going_to_the_end_without_a_checkpoint_in_between(tmp_path):
    session = make_session(tmp_path)
    with session:
        session.start()
        assert session.train(stop_at=2) == "done" and session.step == 2 and session.latest_checkpoint() is None
        session.train()
        assert session.step == 4 and session.latest_checkpoint().name == "step-000004"


# Front ends drive the session: none builds a trainer, a LoRA, a target cache or a lock itself.
FRONT_ENDS = ("nodes", "training/cli", "training/digits", "bench")
BUILT_ONLY_BY_THE_SESSION = {"FlashDistiller", "Run", "OutputLock", "build_target_cache", "TargetCache", "add_lora",
                             "init_lora_weights"}
# The digits teacher is not a student session: training it (teacher.py) takes its own folder lock.
OWN_LOCKS = {("training/digits/teacher.py", "OutputLock")}


def test_no_front_end_builds_a_trainer_lora_cache_or_lock_itself():
    offenders = []
    for top in FRONT_ENDS:
        for path in sorted((REPO_ROOT / top).rglob("*.py")):
            rel = str(path.relative_to(REPO_ROOT))
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                    if name in BUILT_ONLY_BY_THE_SESSION and (rel, name) not in OWN_LOCKS:
                        offenders.append(f"{rel}:{node.lineno} calls {name}")
    assert not offenders, offenders
    assert [m for _, m in imported_modules(REPO_ROOT / "nodes" / "training.py") if m == "flash_core.session"]
