"""FlashSampler under dynamic VRAM (ComfyUI 0.18+ on NVIDIA): it samples on ComfyUI's non-dynamic delegate of
the MODEL, so the patched weights stay resident between runs instead of being re-staged and re-patched at
cast time on every run (bench/dynamic_vram.py measures that on a GPU).

On the CPU ComfyUI never uses the dynamic patcher; tests/nodes/dynamic_patcher.py's CastTimePatcher stands in
for it (is_dynamic(), patches applied only at cast time, get_non_dynamic_delegate()).
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
import torch

from training.fixtures import tiny_checkpoint
from training.fixtures.comfy_env import import_comfy, load_pack

import_comfy()

import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dynamic_patcher import HAS_DYNAMIC, cast_time_twin, load_checkpoint, upstream_lora  # noqa: E402

# ComfyUI < 0.18 (the 0.3.75 floor) has no dynamic VRAM and no non-dynamic delegates: nothing to test there.
pytestmark = [pytest.mark.skipif(not HAS_DYNAMIC, reason="this ComfyUI has no dynamic VRAM (added in 0.18)"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def sampling():
    return load_pack().nodes.sampling


@pytest.fixture()
def models():
    """(the MODEL with an upstream LoRA as a plain patcher, its dynamic stand-in, the checkpoint's path)."""
    path = str(tiny_checkpoint.build())
    raw = load_checkpoint(path)
    lora_model, _ = comfy.sd.load_lora_for_models(raw, None, upstream_lora(raw), 1.0, 0.0)
    return lora_model, cast_time_twin(lora_model, path), path


def flash_sample(sampling, model, seed: int = 3) -> torch.Tensor:
    cond = [[torch.randn((1, 77, 768), generator=torch.Generator().manual_seed(1)), {}]]
    latent = {"samples": torch.zeros((1, 4, 8, 8))}
    return sampling.FlashSampler.execute(model, cond, cond, latent, seed, 4, 1.0, 1.0).result[0]["samples"]


def loaded_models(monkeypatch) -> list:
    """Every MODEL ComfyUI's model management is asked to load (the sampler's model among them)."""
    seen: list = []
    original = comfy.model_management.load_models_gpu

    def record(models, *args, **kwargs):
        seen.extend(models)
        return original(models, *args, **kwargs)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", record)
    return seen


def test_dynamic_model_samples_on_its_resident_delegate(sampling, models, monkeypatch):
    lora_model, standin, _ = models
    want = flash_sample(sampling, lora_model)

    seen = loaded_models(monkeypatch)
    got = flash_sample(sampling, standin)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # same patches, same result

    delegate = sampling.resident_model(standin)
    assert not delegate.is_dynamic() and delegate.patches_uuid == standin.patches_uuid
    assert delegate in seen and standin not in seen  # sampled on the delegate, not the dynamic patcher
    assert sampling.resident_model(standin) is delegate  # one per MODEL: the weights stay resident across runs

    seen.clear()
    torch.testing.assert_close(flash_sample(sampling, standin), want, rtol=1e-4, atol=1e-4)
    assert delegate in seen and standin not in seen


def test_models_of_one_checkpoint_share_one_plain_reload(sampling, models):
    lora_model, standin, path = models
    weaker = standin.clone()  # e.g. the same LoRA at another strength: another MODEL of the same checkpoint
    weaker.patches = {k: [(0.5, *patch[1:]) for patch in v] for k, v in standin.patches.items()}
    weaker.patches_uuid = uuid.uuid4()  # what add_patches does: other patches, other weights
    first, second = sampling.resident_model(standin), sampling.resident_model(weaker)
    assert first is not second and first.model is second.model  # two delegates, one plain copy of the weights
    assert first.model is not standin.model  # ... which is not the dynamic model's own
    raw = load_checkpoint(path)
    half, _ = comfy.sd.load_lora_for_models(raw, None, upstream_lora(raw), 0.5, 0.0)
    torch.testing.assert_close(flash_sample(sampling, weaker), flash_sample(sampling, half), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(flash_sample(sampling, standin), flash_sample(sampling, lora_model), rtol=1e-4, atol=1e-4)


def test_plain_model_is_sampled_as_it_is(sampling, models):
    lora_model, _, _ = models
    assert sampling.resident_model(lora_model) is lora_model


def test_dynamic_model_without_reload_factory_samples_dynamically(sampling, models, monkeypatch):
    lora_model, standin, _ = models
    standin.cached_patcher_init = None  # e.g. a custom loader: no non-dynamic twin can be made
    assert sampling.resident_model(standin) is standin
    seen = loaded_models(monkeypatch)
    torch.testing.assert_close(flash_sample(sampling, standin), flash_sample(sampling, lora_model), rtol=1e-4, atol=1e-4)
    assert standin in seen
