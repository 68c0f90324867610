"""The distill node's network (nodes/comfy_denoiser.py ComfyDenoiser) is exactly the MODEL it receives.

A MODEL with a LoRA applied upstream (ComfyUI's own comfy.sd.load_lora_for_models, what LoraLoaderModelOnly
runs) on the tiny fixture checkpoint gives a teacher whose predictions equal the patched model's, as ComfyUI's
samplers compute them, and differ from the raw checkpoint's; the teacher's UNet holds the patched weights as
plain tensors. The same holds for a stand-in of ComfyUI's dynamic-VRAM patcher (ModelPatcherDynamic, the
default on NVIDIA since ComfyUI 0.18; on the CPU ComfyUI never uses it): a ModelPatcher that reports
is_dynamic() and applies its patches only at cast time, leaving the module tensors the checkpoint's.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from training.fixtures import tiny_checkpoint
from training.fixtures.comfy_env import import_comfy

import_comfy()  # ComfyUI on sys.path, configured for the CPU, before any comfy import

import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402

from flash_core.denoiser import Conditioning  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dynamic_patcher import LORA_TARGETS, cast_time_twin, load_checkpoint, upstream_lora  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def comfy_denoiser(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.comfy_denoiser")


def inputs(seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn((2, 4, 8, 8), generator=generator)
    t = torch.tensor([899.0, 299.0])
    cond = Conditioning(torch.randn((2, 77, 768), generator=generator))
    return x_t, t, cond


def comfy_eps(model, x_t, t, cond) -> torch.Tensor:
    """eps of the MODEL as ComfyUI's samplers compute it: load_models_gpu, then BaseModel.apply_model on the
    VE sample (x = x_t sqrt(1 + sigma^2)); eps = (x - denoised) / sigma."""
    comfy.model_management.load_models_gpu([model])
    sigma = model.get_model_object("model_sampling").sigma(t)
    s = sigma.reshape(-1, 1, 1, 1)
    x = x_t * (s**2 + 1.0).sqrt()
    with torch.no_grad():
        denoised = model.model.apply_model(x, sigma, c_crossattn=cond.encoder_hidden_states)
    return (x - denoised) / s


def teacher_eps(den, x_t, t, cond) -> torch.Tensor:
    """The trainer's teacher: the denoiser with its (fresh) Flash LoRA switched off."""
    den.add_lora(4, 4, LORA_TARGETS)
    with den.teacher(), torch.no_grad():
        return den.predict(x_t, t, cond)


def patched_weight_keys(model) -> list[str]:
    return sorted(k.removeprefix("diffusion_model.") for k in model.patches if k.startswith("diffusion_model."))


def assert_plain(den, expected: dict[str, torch.Tensor]) -> None:
    """The teacher's UNet: plain tensors (no cast-time weight functions) equal to the patched weights."""
    for module in den.diffusion_model.modules():
        assert not getattr(module, "weight_function", []) and not getattr(module, "bias_function", [])
    state = den.diffusion_model.state_dict()
    for key, value in expected.items():
        got = state[key.replace(".weight", ".base_layer.weight")] if key not in state else state[key]
        torch.testing.assert_close(got.float(), value.float(), rtol=0, atol=0)


@pytest.fixture()
def models():
    """(raw MODEL, the same MODEL with an upstream LoRA, the patched weights of the LoRA's keys, path)."""
    path = str(tiny_checkpoint.build())
    raw = load_checkpoint(path)
    lora_model, _ = comfy.sd.load_lora_for_models(raw, None, upstream_lora(raw), 1.0, 0.0)
    comfy.model_management.load_models_gpu([lora_model], force_full_load=True)
    state = lora_model.model.diffusion_model.state_dict()
    patched = {k: state[k].detach().clone() for k in patched_weight_keys(lora_model)}
    return raw, lora_model, patched, path


def test_upstream_lora_is_the_teacher(models, comfy_denoiser):
    raw, lora_model, patched, _ = models
    x_t, t, cond = inputs()
    want = comfy_eps(lora_model, x_t, t, cond)
    unpatched = comfy_eps(raw, x_t, t, cond)
    assert (want - unpatched).abs().max() > 1e-2  # the LoRA matters

    with torch.inference_mode(False):
        den = comfy_denoiser.ComfyDenoiser(lora_model)
        got = teacher_eps(den, x_t, t, cond)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - unpatched).abs().max() > 1e-2
    assert_plain(den, patched)


def test_a_stack_of_loras_at_strengths_is_the_teacher(models, comfy_denoiser):
    """A user's stack (issue 12): two LoRAs at strengths 0.8 and 0.5 (LoraLoader twice) on the checkpoint."""
    raw, lora_model, _, _ = models
    stack, _ = comfy.sd.load_lora_for_models(raw, None, upstream_lora(raw), 0.8, 0.0)
    stack, _ = comfy.sd.load_lora_for_models(stack, None, upstream_lora(raw, seed=1), 0.5, 0.0)
    x_t, t, cond = inputs()
    want = comfy_eps(stack, x_t, t, cond)
    assert (want - comfy_eps(lora_model, x_t, t, cond)).abs().max() > 1e-2  # the second LoRA and strengths matter
    with torch.inference_mode(False):
        got = teacher_eps(comfy_denoiser.ComfyDenoiser(stack), x_t, t, cond)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dynamic_patcher_gives_plain_patched_weights(models, comfy_denoiser):
    _, lora_model, patched, path = models
    standin = cast_time_twin(lora_model, path)
    x_t, t, cond = inputs()
    want = comfy_eps(lora_model, x_t, t, cond)

    # the stand-in behaves like the dynamic patcher: ComfyUI's path through it is the patched model, while the
    # module's own tensors stay the checkpoint's
    torch.testing.assert_close(comfy_eps(standin, x_t, t, cond), want, rtol=1e-4, atol=1e-4)
    key = next(iter(patched))
    assert not torch.equal(standin.model.diffusion_model.state_dict()[key], patched[key])

    with torch.inference_mode(False):
        den = comfy_denoiser.ComfyDenoiser(standin)
        got = teacher_eps(den, x_t, t, cond)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert_plain(den, patched)
    assert den.diffusion_model is not standin.model.diffusion_model
    assert not torch.equal(standin.model.diffusion_model.state_dict()[key], patched[key])  # the graph's untouched


def test_dynamic_model_without_reload_factory_stops_with_a_fix(models, comfy_denoiser):
    _, lora_model, _, path = models
    standin = cast_time_twin(lora_model, path)
    standin.cached_patcher_init = None
    with torch.inference_mode(False), pytest.raises(comfy_denoiser.UnpatchableModelError, match="--disable-dynamic-vram"):
        comfy_denoiser.ComfyDenoiser(standin)
