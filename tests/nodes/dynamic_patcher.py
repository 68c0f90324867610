"""Stand-ins for ComfyUI's memory modes on the CPU (where ComfyUI itself never uses the dynamic patcher).

CastTimePatcher stands in for ModelPatcherDynamic (dynamic VRAM, the default on NVIDIA since ComfyUI 0.18): a
ModelPatcher that reports is_dynamic() and applies its patches only at cast time, leaving the module tensors
the checkpoint's, with ComfyUI 0.30's get_non_dynamic_delegate(). Used by test_comfy_denoiser (the distill
node's teacher) and test_dynamic_vram (the sampler).
"""

from __future__ import annotations

import copy

import torch

from training.fixtures.comfy_env import import_comfy

import_comfy()  # ComfyUI on sys.path, configured for the CPU, before any comfy import

import comfy.lora  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
HAS_DYNAMIC = hasattr(comfy.model_patcher.ModelPatcher, "is_dynamic")  # ComfyUI 0.18+


def load_checkpoint(path: str, disable_dynamic: bool = False):
    """The MODEL CheckpointLoaderSimple gives (UNet only); a plain ModelPatcher with disable_dynamic."""
    kwargs = {"disable_dynamic": True} if disable_dynamic and HAS_DYNAMIC else {}
    return comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False, **kwargs)[0]


def upstream_lora(model, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA (lora_unet_<ldm path>) on every attention projection, strong enough to matter."""
    generator = torch.Generator().manual_seed(seed)
    weights = model.model.state_dict()
    lora, done = {}, set()
    for lora_key, weight_key in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        module = weight_key.removesuffix(".weight") if isinstance(weight_key, str) else ""
        if not lora_key.startswith("lora_unet_") or not module.endswith(LORA_TARGETS) or weight_key in done:
            continue
        done.add(weight_key)
        out_features, in_features = weights[weight_key].shape[:2]
        lora[f"{lora_key}.lora_down.weight"] = torch.randn((rank, in_features), generator=generator) * 0.3
        lora[f"{lora_key}.lora_up.weight"] = torch.randn((out_features, rank), generator=generator) * 0.3
        lora[f"{lora_key}.alpha"] = torch.tensor(float(rank))
    assert done, "no attention projection found in the checkpoint's LoRA key map"
    return lora


class CastTimePatcher(comfy.model_patcher.ModelPatcher):
    """Stands in for ModelPatcherDynamic on the CPU: is_dynamic() and its patches applied only at cast time (the
    weight functions of ComfyUI's lowvram path on every layer); the module tensors stay the checkpoint's."""

    def is_dynamic(self):
        return True

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False, **kwargs):
        return super().load(device_to, lowvram_model_memory=1, force_patch_weights=False, full_load=False)

    if not HAS_DYNAMIC:  # ComfyUI < 0.18: what 0.30's ModelPatcher.clone does for a dynamic patcher

        def clone(self, disable_dynamic=False):
            if not disable_dynamic:
                return super().clone()
            if getattr(self, "cached_patcher_init", None) is None:
                raise RuntimeError("Cannot create non-dynamic delegate: cached_patcher_init is not initialized.")
            factory, args = self.cached_patcher_init[:2]
            plain = factory(*args, disable_dynamic=True)
            plain.patches = {k: list(v) for k, v in self.patches.items()}
            plain.patches_uuid = self.patches_uuid
            plain.object_patches = self.object_patches.copy()
            plain.model_options = copy.deepcopy(self.model_options)
            return plain

    def get_non_dynamic_delegate(self):
        """ModelPatcherDynamic.get_non_dynamic_delegate (ComfyUI 0.30; the sampler only uses it as the marker of
        a ComfyUI that has dynamic VRAM)."""
        delegate = self.clone(disable_dynamic=True, model_override=getattr(self, "_delegate_model", None))
        self._delegate_model = delegate.get_clone_model_override()
        return delegate


def cast_time_twin(lora_model, path: str) -> CastTimePatcher:
    """The LoRA MODEL as the dynamic patcher would hold it: a fresh load of the checkpoint (its own module
    tensors), the same patches, and the loader's reload factory (ComfyUI < 0.30's loaders register none)."""
    fresh = load_checkpoint(path)
    twin = CastTimePatcher(fresh.model, load_device=fresh.load_device, offload_device=fresh.offload_device)
    twin.patches = {k: list(v) for k, v in lora_model.patches.items()}
    twin.patches_uuid = lora_model.patches_uuid
    twin.cached_patcher_init = getattr(lora_model, "cached_patcher_init", None) or (load_checkpoint, (path,))
    return twin
