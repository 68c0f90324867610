"""What a Flash LoRA file says about sampling it: the reading side of the one metadata schema.

Every LoRA the pack writes carries kohya's ``ss_*`` keys and Flash's ``flash.*`` keys (written by
lora_metadata below). A loader reads the sampling keys back here, so it imports no training code.
Values are checked as they are read: a file whose metadata would make the sampler produce garbage (NaN or
negative cfg, a grid outside the model's timesteps or in the wrong order, steps outside 1-8) is refused with the
key, the value and what to do, never used. Metadata is only advice about a file, so a malformed *optional* key
(the stack the student was distilled from) is dropped with a warning instead of stopping the sampler.

    sampling_settings(metadata, source) -> SamplingSettings | None
    lora_metadata(distiller, settings, history, base_model=..., ...) -> dict[str, str]   # the writing side
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flash_core.backbones import get_backbone
from flash_core.schedules import MAX_SAMPLING_STEPS, flow_sigmas, trailing_timesteps

LOG = logging.getLogger("flash_core")

RECOMMENDED_CFG = 1.0  # Flash students are distilled with the teacher's guidance: one model call per step
# How a student takes guidance (DistillConfig.guidance_mode, recorded as flash.guidance_mode; absent = "baked";
# docs/architecture.md, "Guidance modes"):
#   "baked": the teacher's CFG at w ~ U[guidance_range] is distilled into one model call per step (cfg 1 at sampling:
#            the negative prompt is not used, guidance fixed), the published Flash recipe;
#   "cfg":   CFG-aware distillation: the student's own CFG w*s(x, positive) + (1-w)*s(x, negative) at the teacher's w
#            matches the teacher's guided solve at that w and negative, so at sampling the negative prompt and the cfg
#            dial mean what they mean for the teacher (2 model calls per step, batched as one by ComfyUI).
GUIDANCE_MODES = ("baked", "cfg")
MAX_CFG = 100.0  # far above any useful guidance scale: a larger recorded cfg is a broken file
MAX_TIMESTEP = 1000  # model timesteps: DDPM 0..999, flow sigma x 1000 in 0..1000
# ONE dtype policy: every LoRA file the pack writes holds exactly the trained float32 weights; ComfyUI / diffusers
# cast to the model's dtype when they apply it.
EXPORT_DTYPE = torch.float32


@dataclass(frozen=True)
class SamplingSettings:
    """What a Flash LoRA file says about sampling it (read from lora_metadata's flash.* keys)."""

    steps: int  # recommended sampling steps (flash.recommended_steps)
    cfg: float
    timesteps: tuple[int, ...]  # the grid of `steps` steps in model timesteps (trailing DDPM, or flow sigma * 1000)
    prediction_type: str | None
    trained_for: dict | None  # the stack the student was distilled from, None when not recorded (or unreadable)
    # "baked": guidance distilled in (cfg 1, the negative unused); "cfg": the student's own CFG, trained over
    # guidance_range (the cfg dial and the negative prompt act as on the teacher)
    guidance_mode: str = "baked"
    guidance_range: tuple[float, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "cfg": self.cfg, "timesteps": list(self.timesteps),
                "prediction_type": self.prediction_type, "trained_for": self.trained_for,
                "guidance_mode": self.guidance_mode,
                "guidance_range": list(self.guidance_range) if self.guidance_range else None}


def sampling_settings(metadata: Mapping[str, str], source: str = "the LoRA") -> SamplingSettings | None:
    """The sampling settings recorded in a Flash LoRA's metadata, or None for files without flash.* keys
    (official flash-sd / flash-sdxl / PixArt / SD3 releases: the sampler keeps its own defaults). Files written
    before recommended_steps existed use flash.nfe (read as an alias). An unreadable or out-of-range value
    raises ValueError naming the file, the key, the value and the fix."""
    if "flash.format_version" not in metadata:
        return None

    def refuse(key: str, raw: str, why: str):
        raise ValueError(f"{source}: metadata key '{key}' = {raw!r} {why}; re-export the LoRA, or remove the key "
                         "(the sampler then uses its defaults).")

    def parse(key: str, convert, default=None):
        raw = metadata.get(key, "")
        if raw == "":
            return default
        try:
            return convert(raw)
        except (TypeError, ValueError) as err:
            refuse(key, raw, f"cannot be read ({err})")

    steps_key = "flash.recommended_steps" if metadata.get("flash.recommended_steps", "") != "" else "flash.nfe"
    steps = parse(steps_key, int)
    if steps is None:
        return None
    if not 1 <= steps <= MAX_SAMPLING_STEPS:
        refuse(steps_key, metadata[steps_key], f"is outside 1-{MAX_SAMPLING_STEPS} sampling steps")

    cfg = parse("flash.recommended_cfg", float, RECOMMENDED_CFG)
    if not (math.isfinite(cfg) and 0.0 < cfg <= MAX_CFG):
        refuse("flash.recommended_cfg", metadata["flash.recommended_cfg"], f"is not a guidance scale in (0, {MAX_CFG:g}]")

    timesteps = parse("flash.timesteps", json.loads, [])
    if not isinstance(timesteps, list) or not all(isinstance(t, (int, float)) and not isinstance(t, bool)
                                                  and math.isfinite(t) and float(t).is_integer() for t in timesteps):
        refuse("flash.timesteps", metadata["flash.timesteps"], "is not a list of whole model timesteps")
    timesteps = [int(t) for t in timesteps]
    if timesteps and not all(0 <= t <= MAX_TIMESTEP for t in timesteps):
        refuse("flash.timesteps", metadata["flash.timesteps"], f"has timesteps outside 0-{MAX_TIMESTEP}")
    if any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        refuse("flash.timesteps", metadata["flash.timesteps"], "is not strictly decreasing (a sampler runs from noise to data)")

    mode = metadata.get("flash.guidance_mode", "") or "baked"
    if mode not in GUIDANCE_MODES:
        refuse("flash.guidance_mode", mode, f"is not one of {GUIDANCE_MODES}")
    guidance_range = parse("flash.guidance_range", json.loads, None)
    if guidance_range is not None and not (
            isinstance(guidance_range, list) and len(guidance_range) == 2
            and all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in guidance_range)
            and 0 <= guidance_range[0] <= guidance_range[1] <= MAX_CFG):
        refuse("flash.guidance_range", metadata["flash.guidance_range"], f"is not a range [low, high] in [0, {MAX_CFG:g}]")
    return SamplingSettings(steps=steps, cfg=cfg, timesteps=tuple(timesteps),
                            prediction_type=metadata.get("flash.prediction_type") or None,
                            trained_for=_trained_for(metadata.get("flash.trained_for", ""), source),
                            guidance_mode=mode, guidance_range=tuple(float(w) for w in guidance_range) if guidance_range else None)


def _trained_for(raw: str, source: str) -> dict | None:
    """flash.trained_for as {"base": {...} | None, "loras": [{...}], "patches": [...]}, or None (with a warning)
    when it is absent or not of that shape: the stack check is advice, it never stops sampling."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    shape_ok = (isinstance(value, dict) and isinstance(value.get("base"), (dict, type(None)))
                and isinstance(value.get("loras", []), list) and all(isinstance(x, dict) for x in value.get("loras", []))
                and all(isinstance(x.get("strength"), (int, float, type(None))) for x in value.get("loras", []))
                and isinstance(value.get("patches", []), list))
    if not shape_ok:
        LOG.warning("%s: metadata key 'flash.trained_for' is not a stack description (%.80r): the check of the stack "
                    "this student was distilled from is skipped.", source, raw)
        return None
    return value




# ---- the writing side -----------------------------------------------------------------------------
def recommended_cfg(guidance_mode: str, guidance_range: Sequence[float]) -> float:
    """FlashSampler's cfg for a student: 1 (one call per step) when guidance is baked in; for guidance mode "cfg"
    the middle of the trained range, rounded to 0.5 (SD1.5's 3-13: 8; the digits benchmark's 1-8: 4.5)."""
    if guidance_mode != "cfg":
        return RECOMMENDED_CFG
    return round(float(guidance_range[0] + guidance_range[1])) / 2.0  # (low + high) / 2 to the nearest 0.5


def sampling_timesteps(is_flow: bool, steps: int) -> list[int]:
    """The student's `steps`-step sampling grid in model timesteps (trailing DDPM, or flow sigmas * 1000)."""
    if is_flow:
        return [round(1000 * s) for s in flow_sigmas(steps)]
    return trailing_timesteps(steps)


def lora_metadata(distiller, settings: Mapping[str, Any], history: Sequence[Mapping[str, float]], *,
                  base_model: str, teacher: str | None = None, recommended_steps: int | None = None,
                  trained_for: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The one metadata schema (the writing side; `distiller` is a flash_core.distill.FlashDistiller, duck-typed so
    that this module imports no training code): kohya's ss_* (LoRA managers show rank / alpha / base) and Flash's flash.* keys.

    `trained_for` is the stack the teacher was (base checkpoint name + sha256, LoRAs with strengths: what
    nodes/stack.describe_stack returns); lora_formats.sampling_settings reads the sampling keys back. `recommended_steps`:
    the sampling steps FlashSampler defaults to (default: the student grid the recipe trains, 4)."""
    recipe = distiller.recipe
    steps = recommended_steps or recipe.student_steps
    losses = [{k: v for k, v in h.items() if k.startswith("loss")} for h in history]
    last = losses[-1] if losses else {}
    window = {k: float(np.mean([h[k] for h in losses[-50:] if k in h])) for k in last}
    backbone = settings.get("backbone", recipe.backbone)
    mode = getattr(distiller.config, "guidance_mode", "baked")
    cfg = recommended_cfg(mode, recipe.guidance_range)
    calls = "cfg 1: one model call per step" if mode != "cfg" else (
        f"cfg {cfg:g} (trained {recipe.guidance_range[0]:g}-{recipe.guidance_range[1]:g}) with the negative prompt: "
        "two model calls per step")
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(recipe.lora_rank),
        "ss_network_alpha": str(recipe.lora_alpha),
        "ss_base_model_version": get_backbone(backbone).base_model_version,
        "ss_steps": str(distiller.step),
        "ss_learning_rate": str(recipe.lr),
        "ss_seed": str(settings.get("seed", "")),
        "flash.format_version": "1",
        "flash.backbone": backbone,
        "flash.base_model": base_model,
        "flash.base_fingerprint": teacher or "",
        "flash.rank": str(recipe.lora_rank),
        "flash.alpha": str(recipe.lora_alpha),
        "flash.trained_steps": str(distiller.step),  # training iterations done (= ss_steps)
        "flash.total_steps": str(settings.get("total_steps", distiller.config.total_steps)),
        "flash.student_steps": str(recipe.student_steps),  # the student grid the timestep mixture sits on
        "flash.timesteps": json.dumps(sampling_timesteps(distiller.denoiser.is_flow, steps)),
        "flash.sampling": f"FlashSampler (LCM-style few-step sampling on the trailing grid), {steps} steps, {calls}",
        "flash.prediction_type": distiller.denoiser.prediction_type,
        "flash.recommended_steps": str(steps),
        "flash.recommended_cfg": f"{cfg:g}",
        "flash.guidance_mode": mode,
        "flash.trained_for": json.dumps(dict(trained_for)) if trained_for else "",
        "flash.teacher_grid_steps": str(recipe.teacher_grid_steps),
        "flash.ema_decay": f"{getattr(distiller.config, 'ema_decay', 0.0):g}",  # 0: the LoRA as trained, else its EMA
        "flash.guidance_range": json.dumps(list(recipe.guidance_range)),
        "flash.loss_weights": json.dumps({"distill": list(recipe.distill_weights), "adversarial": list(recipe.adversarial_weights),
                                          "dmd": list(recipe.dmd_weights)}),
        "flash.learning_rate": str(recipe.lr),
        "flash.batch_size": str(recipe.batch_size),
        "flash.dtype": str(EXPORT_DTYPE).removeprefix("torch."),
        "flash.losses_last": json.dumps(last),
        "flash.losses_mean_last_50": json.dumps(window),
    }


__all__ = ["EXPORT_DTYPE", "GUIDANCE_MODES", "RECOMMENDED_CFG", "SamplingSettings", "lora_metadata", "recommended_cfg",
           "sampling_settings", "sampling_timesteps"]
