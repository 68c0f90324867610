"""EMA of the student's LoRA (DistillConfig.ema_decay): the average it keeps, where it is used (sampling, exports)
and where not (training), an exact resume, the setting a resume compares, and the metadata that records it."""

from __future__ import annotations

import pytest
import torch

from flash_core import run
from flash_core.backends.diffusers import UNetDenoiser
from flash_core.denoiser import Conditioning
from flash_core.distill import DistillConfig
from flash_core.lora_formats.metadata import lora_metadata
from flash_core.run import RunHooks
from flash_core.session import TrainingSession
from tests.flash_core.test_backends import tiny_config, tiny_sd15_unet
from tests.flash_core.test_run import TEXT_DIM, tiny_dataset
from tests.flash_core.test_session import StopAt

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DECAY = 0.5  # short enough that 4 steps of the warm-up min(decay, (1+k)/(10+k)) reach it


def ema_session(tmp_path=None, hooks=None, ema_decay=DECAY, **overrides) -> TrainingSession:
    config = tiny_config("sd15", total_steps=4, batch_size=2, lr=1e-2, ema_decay=ema_decay, **overrides)
    folders = {"output": tmp_path / "out", "checkpoints": tmp_path / "out" / "ckpt"} if tmp_path is not None else {}
    return TrainingSession(UNetDenoiser(tiny_sd15_unet()), config, tiny_dataset(), hooks=hooks, **folders)


class Trained(RunHooks):
    """The trained LoRA after every step (what the optimiser holds, not the average)."""

    def __init__(self, session_box: list):
        self.box, self.after = session_box, []

    def on_step(self, report) -> None:
        self.after.append({n: p.detach().clone() for n, p in self.box[0].denoiser.named_lora_parameters()})


def test_the_average_follows_the_warmed_up_recursion_and_exports_use_it_not_the_trained_lora():
    box: list = []
    hooks = Trained(box)
    session = ema_session(hooks=hooks)
    box.append(session)
    session.start()
    initial = {n: p.detach().clone() for n, p in session.denoiser.named_lora_parameters()}
    session.train()
    expected = dict(initial)
    for k, trained in enumerate(hooks.after):  # ema <- d ema + (1 - d) lora, d = min(decay, (1+k)/(10+k))
        d = min(DECAY, (1 + k) / (10 + k))
        expected = {n: d * expected[n] + (1 - d) * trained[n] for n in expected}
    for name, value in expected.items():
        torch.testing.assert_close(session.distiller.ema_lora[name], value, rtol=0, atol=1e-6)

    exported = session.distiller.lora_state_dict()
    trained_now = dict(session.denoiser.named_lora_parameters())
    b_keys = [k for k in exported if "lora_B" in k]
    assert b_keys and any(not torch.equal(exported[k], trained_now[_param_name(k, trained_now)]) for k in b_keys)
    for key, value in exported.items():  # every export reads the average
        torch.testing.assert_close(value, expected[_param_name(key, trained_now)].cpu(), rtol=0, atol=1e-6)
    # the trained weights come back exactly after an export and after sampling (previews, benchmarks)
    before = {n: p.detach().clone() for n, p in trained_now.items()}
    cond = Conditioning(torch.randn(1, 5, TEXT_DIM))
    session.distiller.student_sample(torch.randn(1, 4, 8, 8), cond, 2)
    assert all(torch.equal(p, before[n]) for n, p in session.denoiser.named_lora_parameters())


def test_sampling_uses_the_average():
    session = ema_session()
    session.train()
    distiller, cond, noise = session.distiller, Conditioning(torch.randn(2, 5, TEXT_DIM)), torch.randn(2, 4, 8, 8)
    averaged = distiller.student_sample(noise, cond, 2, generator=torch.Generator().manual_seed(0))
    with distiller.averaged_lora():  # the average in the LoRA; sampling again swaps it in once more (no change)
        again = distiller.student_sample(noise, cond, 2, generator=torch.Generator().manual_seed(0))
    distiller.ema_lora = None  # the LoRA as trained
    trained = distiller.student_sample(noise, cond, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, averaged)
    assert not torch.allclose(trained, averaged)


def test_without_ema_the_export_is_the_trained_lora():
    session = ema_session(ema_decay=0.0)
    session.train()
    assert session.distiller.ema_lora is None
    trained = dict(session.denoiser.named_lora_parameters())
    for key, value in session.distiller.lora_state_dict().items():
        assert torch.equal(value, trained[_param_name(key, trained)].detach().cpu())


def test_a_resume_continues_the_average_exactly(tmp_path):
    straight = ema_session()
    straight.train()
    with ema_session(tmp_path, hooks=StopAt(2)) as first:
        assert first.train() == "stopped"
    with ema_session(tmp_path) as second:
        assert second.start(resume="latest") == [] and second.step == 2
        assert second.train() == "done"
    for name, value in straight.distiller.ema_lora.items():
        torch.testing.assert_close(second.distiller.ema_lora[name], value, rtol=0, atol=1e-6)


def test_the_decay_is_a_setting_a_resume_compares_and_older_checkpoints_read_as_off(tmp_path):
    with ema_session(tmp_path, hooks=StopAt(2)) as first:
        first.train()
    with ema_session(tmp_path, ema_decay=0.9) as other, \
            pytest.raises(run.ResumeMismatchError, match="ema_decay: checkpoint 0.5, now 0.9"):
        other.start(resume="latest")
    settings = run.run_settings(tiny_config("sd15"))
    older = {"settings": {k: v for k, v in settings.items() if k != "ema_decay"}}  # a checkpoint before the setting
    session = ema_session(ema_decay=0.0)
    session.start()
    assert [d for d in session.run.differences(older) if "ema_decay" in d] == []


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_a_decay_outside_0_to_1_is_refused(value):
    with pytest.raises(ValueError, match="ema_decay must be 0"):
        DistillConfig(backbone="sd15", ema_decay=value)


@pytest.mark.parametrize("decay", [0.0, 0.99])
def test_the_lora_records_the_decay(decay):
    session = ema_session(ema_decay=decay)
    session.start()
    assert lora_metadata(session.distiller, {"backbone": "sd15"}, [], base_model="SD15")["flash.ema_decay"] == f"{decay:g}"


def _param_name(state_key: str, params: dict) -> str:
    """The named_lora_parameters name of a peft state-dict key (`...lora_A.weight` -> `...lora_A.default.weight`)."""
    name = state_key.replace(".weight", ".default.weight")
    matches = [n for n in params if n.endswith(name) or n == name]
    assert len(matches) == 1, (state_key, matches[:3])
    return matches[0]
