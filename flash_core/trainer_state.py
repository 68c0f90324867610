"""The exact-resume state of a FlashDistiller (its state_dict / load_state_dict): LoRA (and its EMA) and discriminator weights,
both optimisers, the RNG states, the latest losses and the step. weights_only-loadable; the training draws are
counter-based (flash_core.draws), so the step is all a resume needs of them. The settings are not here:
flash_core.run stores them beside this state and compares them on resume (Run.differences), their one home.

    trainer_state(distiller) -> dict
    load_trainer_state(distiller, state)
"""

from __future__ import annotations

import random

import torch
from torch import nn


def trainer_state(distiller) -> dict:
    """Everything for an exact resume of `distiller` (a flash_core.distill.FlashDistiller, duck-typed)."""
    state = {
        "step": distiller.step,
        "lora": {n: p.detach().cpu().clone() for n, p in distiller.denoiser.named_lora_parameters()},
        "discriminator": {k: v.detach().cpu().clone() for k, v in unwrap(distiller.discriminator).state_dict().items()},
        "student_optimizer": distiller.student_optimizer.state_dict(),
        "discriminator_optimizer": distiller.discriminator_optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_random": random.getstate(),
        "student_logs": dict(distiller._student_logs),
        "discriminator_logs": dict(distiller._discriminator_logs),
    }
    if distiller.ema_lora is not None:
        state["ema_lora"] = {n: t.detach().cpu().clone() for n, t in distiller.ema_lora.items()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def load_trainer_state(distiller, state: dict) -> None:
    """Put a trainer_state back into `distiller`."""
    params = dict(distiller.denoiser.named_lora_parameters())
    missing = set(params) - set(state["lora"])
    if missing:
        raise KeyError(f"checkpoint lacks LoRA tensors, e.g. {sorted(missing)[:3]}: rank/targets differ?")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state["lora"][name])
    if distiller.ema_lora is not None:  # a checkpoint of ema_decay 0 (a resume that allows changes): EMA starts here
        averages = state.get("ema_lora") or state["lora"]
        with torch.no_grad():
            for name, average in distiller.ema_lora.items():
                average.copy_(averages[name])
    unwrap(distiller.discriminator).load_state_dict(state["discriminator"])
    distiller.student_optimizer.load_state_dict(state["student_optimizer"])
    distiller.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(_as_tuple(state["python_random"]))
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    distiller.step = int(state["step"])
    distiller._student_logs = dict(state.get("student_logs", {}))
    distiller._discriminator_logs = dict(state.get("discriminator_logs", {}))


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP / accelerate wrapper."""
    return getattr(module, "module", module)


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value
