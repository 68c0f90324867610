"""The one interface between the Flash algorithm and a model family: `Denoiser`.

A Denoiser wraps ONE network. The student is that network with its LoRA adapters enabled; the teacher is
the same network with the adapters disabled (peft), so the teacher's weights are never copied or changed.

Time convention: `t` is the model timestep, a float tensor of shape [B] on the 0..1000 scale —
the discrete DDPM timestep (0..999) for epsilon / v-prediction models, sigma*1000 for flow models (SD3).
Both are written as x_t = alpha_t x0 + sigma_t eps with (alpha, sigma) from `noise_coefficients`; the algebra
between the model outputs (eps / v / flow velocity) and x0 lives in flash_core.parameterization.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor, nn

from flash_core import parameterization
from flash_core.dependencies import require

PREDICTION_TYPES = parameterization.DENOISER_PREDICTION_TYPES
# The LoRA starts Denoiser.init_lora_weights draws (Recipe.lora_init): lora_A ~ N(0, 1/r^2) ("gaussian", peft's
# init_lora_weights="gaussian") or peft's default kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
LORA_INITS = ("gaussian", "kaiming_uniform")


def _module_seed(seed: int, path: str) -> int:
    """The init seed of one LoRA module: the run's seed and the module's diffusers path."""
    return (seed * 1_000_003 + zlib.crc32(path.encode())) % (2**63)


@dataclass
class Conditioning:
    """Per-backbone conditioning tensors, all batch-first.

    encoder_hidden_states: text tokens (SD1.5 CLIP-L, SDXL CLIP-L+G, PixArt T5, SD3 CLIP+T5).
    pooled: SDXL `text_embeds` / SD3 `pooled_projections`.
    time_ids: SDXL `time_ids` (original size, crop, target size).
    attention_mask: PixArt T5 token mask (`encoder_attention_mask`).
    extra: further batch-first tensors a backend needs (e.g. PixArt `resolution`, `aspect_ratio`).
    """

    encoder_hidden_states: Tensor
    pooled: Tensor | None = None
    time_ids: Tensor | None = None
    attention_mask: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.encoder_hidden_states.shape[0])

    def _map(self, fn) -> Conditioning:
        """Apply `fn` to every tensor (fields and extra)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        mapped = {k: (fn(v) if v is not None else None) for k, v in values.items()}
        return Conditioning(**mapped, extra={k: fn(v) for k, v in self.extra.items()})

    def __getitem__(self, index) -> Conditioning:
        """Select samples along the batch dimension (int, slice or index tensor); keeps the batch dim."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda v: v[index])

    def to(self, device=None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move to `device`; cast floating tensors (not masks / ids) to `dtype`."""
        def move(v: Tensor) -> Tensor:
            if dtype is not None and v.is_floating_point():
                return v.to(device=device, dtype=dtype)
            return v.to(device=device)
        return self._map(move)

    def expand_to(self, batch_size: int) -> Conditioning:
        """Repeat a batch-1 conditioning (e.g. the empty prompt) to `batch_size`."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot expand a conditioning of batch {self.batch_size} to {batch_size}")
        return self._map(lambda v: v.expand(batch_size, *v.shape[1:]))

    @staticmethod
    def cat(conds: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch (e.g. [uncond, cond] for one CFG forward)."""
        first = conds[0]
        out = {}
        for f in fields(first):
            if f.name == "extra":
                continue
            values = [getattr(c, f.name) for c in conds]
            if any(v is None for v in values):
                if not all(v is None for v in values):
                    raise ValueError(f"Conditioning.cat: field {f.name!r} is set in some conditionings only")
                out[f.name] = None
            else:
                out[f.name] = torch.cat(values, dim=0)
        extra = {k: torch.cat([c.extra[k] for c in conds], dim=0) for k in first.extra}
        return Conditioning(**out, extra=extra)


def zero_conditioning(cond: Conditioning) -> Conditioning:
    """The SDXL-style unconditional: zeroed text embeddings and pooled embeds, size/crop ids kept."""
    return replace(
        cond,
        encoder_hidden_states=torch.zeros_like(cond.encoder_hidden_states),
        pooled=torch.zeros_like(cond.pooled) if cond.pooled is not None else None,
    )


class Denoiser(ABC):
    """A denoising network plus its LoRA adapters (student) that can be switched off (teacher).

    Subclasses set `prediction_type`, `alphas_cumprod` (discrete models; None for flow),
    `encoder_feature_channels`, `lora_module` (the nn.Module that carries the peft adapters) and implement
    `predict` and `encoder_features`. LoRA handling is shared here.
    """

    prediction_type: str
    alphas_cumprod: Tensor | None
    encoder_feature_channels: int
    lora_module: nn.Module

    @abstractmethod
    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Raw model output (eps / v / flow velocity), same shape as x_t."""

    @abstractmethod
    def encoder_features(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Feature map [B, encoder_feature_channels, h, w] of the network (discriminator backbone)."""

    # ---- LoRA (peft adapters on lora_module) ------------------------------------------------------
    @property
    def is_flow(self) -> bool:
        return self.prediction_type == "flow"

    def add_lora(
        self, rank: int, alpha: int | float, targets: Sequence[str], seed: int = 0, init: str = "gaussian"
    ) -> None:
        """Inject a peft LoRA (adapter "default") on the `targets` modules, in float32, initialised once by
        init_lora_weights(seed, init) (`init`: Recipe.lora_init): the same start on every backend.

        Mixed precision as in accelerate / Lightning "bf16-mixed": the frozen base weights may be bf16, the
        trainable adapters (and so their optimiser state) are always float32. peft would create them in the
        base layer's dtype, where Adam's ~lr-sized updates (1e-5) fall below half a bf16 ulp and vanish.
        peft casts each adapter's input to the adapter's dtype and its output back, so float32 adapters on
        bf16 layers run with or without autocast.
        """
        require("peft", "Training a Flash LoRA student (Denoiser.add_lora)")
        from peft import LoraConfig, inject_adapter_in_model

        if self.has_lora:
            raise RuntimeError("this denoiser already carries a LoRA adapter")
        if init not in LORA_INITS:
            raise ValueError(f"LoRA init must be one of {LORA_INITS}, got {init!r}")
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
        with torch.random.fork_rng(devices=[]):  # peft's own draws (overwritten below) leave no trace
            inject_adapter_in_model(config, self.lora_module)
        for name, param in self.lora_module.named_parameters():
            param.requires_grad_("lora_" in name)
            if "lora_" in name and param.dtype != torch.float32:
                param.data = param.data.float()  # float32 master weights of the student
        self.init_lora_weights(seed, init)

    def identity(self) -> dict:
        """What besides the network's weights makes this teacher what it is (fingerprints.teacher_fingerprint):
        the prediction type and the noise schedule; backends add the patches and wrappers they apply."""
        return {"prediction_type": self.prediction_type, "alphas_cumprod": self.alphas_cumprod}

    def lora_path(self, module: str) -> str:
        """A LoRA module's path in diffusers' layout: the name the LoRA file carries and the per-module init seed
        is drawn from. The diffusers backends are that layout; ComfyDenoiser maps ComfyUI's LDM paths."""
        return module

    def init_lora_weights(self, seed: int, init: str = "gaussian") -> None:
        """The student's LoRA start, lora_B = 0 and lora_A by `init` (LORA_INITS): "gaussian" N(0, 1/r^2) (peft's
        "gaussian" init, the reference's UNets) or "kaiming_uniform" U(+-1/sqrt(fan_in)) (peft's default, the
        reference's DiTs). Each module draws from its own generator seeded by (seed, lora_path(module)): peft draws
        in module order, which differs between backends (ComfyUI's LDM UNet vs diffusers'); this start is the same
        on every backend."""
        if init not in LORA_INITS:
            raise ValueError(f"LoRA init must be one of {LORA_INITS}, got {init!r}")
        with torch.no_grad():
            for name, param in self.named_lora_parameters():
                module = name.split(".lora_")[0]
                if ".lora_A." in name:
                    generator = torch.Generator().manual_seed(_module_seed(seed, self.lora_path(module)))
                    if init == "gaussian":
                        rank = param.shape[0]
                        values = torch.randn(param.shape, generator=generator, dtype=torch.float32) / rank  # std 1/r
                    else:  # kaiming_uniform_(a=sqrt(5)): bound = sqrt(6 / ((1 + a^2) fan_in)) = 1/sqrt(fan_in)
                        values = torch.empty(param.shape, dtype=torch.float32)
                        torch.nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
                    param.copy_(values.to(param.device, param.dtype))
                elif ".lora_B." in name:
                    param.zero_()

    @property
    def has_lora(self) -> bool:
        return any("lora_" in name for name, _ in self.lora_module.named_parameters())

    def named_lora_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.lora_module.named_parameters() if "lora_" in n]

    def lora_parameters(self) -> list[nn.Parameter]:
        """The trainable student parameters (deterministic order)."""
        return [p for _, p in self.named_lora_parameters()]

    def base_parameters(self) -> list[nn.Parameter]:
        """The frozen teacher parameters."""
        return [p for n, p in self.lora_module.named_parameters() if "lora_" not in n]

    def set_lora_enabled(self, enabled: bool) -> None:
        """Student (True) or teacher (False). Enabling restores requires_grad on the adapters."""
        for layer in self._lora_layers():
            layer.enable_adapters(enabled)

    def _lora_layers(self) -> list[nn.Module]:
        """The peft tuner layers of lora_module (found once; a network walk costs ms on SD-size models)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        cached = self.__dict__.get("_lora_layer_cache")
        if not cached:
            cached = [m for m in self.lora_module.modules() if isinstance(m, BaseTunerLayer)]
            self.__dict__["_lora_layer_cache"] = cached
        return cached

    @contextlib.contextmanager
    def teacher(self) -> Iterator[Denoiser]:
        """Run as the teacher (adapters off); the student's adapters (and their grads) are back on exit.

        Adapters must be on again before backward: autograd drops grads of leaves with requires_grad off.
        Gradient checkpointing is paused inside: a backward recomputation would run with the adapters on.
        """
        checkpointing = self.gradient_checkpointing
        if checkpointing:
            self.set_gradient_checkpointing(False)
        self.set_lora_enabled(False)
        try:
            yield self
        finally:
            self.set_lora_enabled(True)
            if checkpointing:
                self.set_gradient_checkpointing(True)

    @contextlib.contextmanager
    def merged_lora(self) -> Iterator[Denoiser]:
        """Run the student with its LoRA merged into the base weights (inference without per-call adapter cost).

        peft's merge adds scale * B @ A to each target weight; on exit every merged weight is restored bit for
        bit from a copy taken on entry (peft's unmerge subtracts the delta again, which rounds, badly in bf16).
        Costs one copy of the target layers' weights while inside. For no-grad sampling only: do not train or
        enter teacher() inside (peft would unmerge by subtraction).
        """
        layers = [layer for layer in self._lora_layers() if not layer.merged]
        saved = [layer.get_base_layer().weight.detach().clone() for layer in layers]
        try:
            with torch.no_grad():
                for layer in layers:
                    layer.merge()  # W <- W + scale * B A
            yield self
        finally:
            with torch.no_grad():
                for layer, weight in zip(layers, saved):
                    layer.get_base_layer().weight.copy_(weight)
                    layer.merged_adapters.clear()  # peft's "merged" flag: adapters run per call again

    def lora_state_dict(self) -> dict[str, Tensor]:
        """peft-named LoRA tensors (`<module>.lora_A.weight`, ...), detached CPU copies."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.lora_module)
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    gradient_checkpointing: bool = False

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the network's block activations in backward (diffusers models)."""
        model = self.lora_module
        if enabled and hasattr(model, "enable_gradient_checkpointing"):
            model.enable_gradient_checkpointing()
        elif not enabled and hasattr(model, "disable_gradient_checkpointing"):
            model.disable_gradient_checkpointing()
        self.gradient_checkpointing = bool(enabled) and hasattr(model, "enable_gradient_checkpointing")


# ---- output conversions at a Denoiser's noise schedule (the algebra: flash_core.parameterization) --------
def noise_coefficients(denoiser: Denoiser, t: Tensor, ndim: int = 4) -> tuple[Tensor, Tensor]:
    """(alpha_t, sigma_t) with x_t = alpha_t x0 + sigma_t eps, broadcastable to an ndim tensor.

    Discrete: alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t). Flow: sigma = t/1000, alpha = 1 - sigma.
    """
    return parameterization.noise_coefficients(t, denoiser.is_flow, denoiser.alphas_cumprod, ndim)


def add_noise(denoiser: Denoiser, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """z_t = alpha_t x0 + sigma_t eps (DDPM forward process; flow: sigma eps + (1-sigma) x0)."""
    alpha, sigma = noise_coefficients(denoiser, t, x0.ndim)
    return parameterization.add_noise(x0, noise, alpha, sigma)


def output_to_x0_eps(denoiser: Denoiser, raw: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Convert a raw model output (eps / v / flow velocity) to (x0, eps) at (x_t, t)."""
    alpha, sigma = noise_coefficients(denoiser, t, x_t.ndim)
    return parameterization.x0_and_eps(raw, x_t, alpha, sigma, denoiser.prediction_type)
