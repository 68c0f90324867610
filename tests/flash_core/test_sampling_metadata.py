"""flash_core.run.sampling_settings: what a Flash LoRA's metadata tells the sampler (issue 12)."""

from __future__ import annotations

import json

import pytest

from flash_core.run import sampling_settings

OURS = {"flash.format_version": "1", "flash.student_steps": "4", "flash.timesteps": "[999, 499]", "flash.recommended_steps": "2",
        "flash.recommended_cfg": "1", "flash.prediction_type": "epsilon",
        "flash.trained_for": json.dumps({"base": {"name": "base.safetensors"}, "loras": []})}


def test_our_files_give_steps_cfg_grid_and_stack():
    settings = sampling_settings(OURS)
    assert (settings.steps, settings.cfg, settings.timesteps) == (2, 1.0, (999, 499))
    assert settings.prediction_type == "epsilon" and settings.trained_for["base"]["name"] == "base.safetensors"


def test_official_files_without_flash_keys_give_none():
    assert sampling_settings({"ss_network_dim": "64"}) is None  # e.g. flash-sd: FlashSampler keeps its defaults
    assert sampling_settings({}) is None


def test_files_from_before_the_recommendation_keys_use_the_trained_nfe():
    legacy = {k: v for k, v in OURS.items() if k not in ("flash.recommended_steps", "flash.recommended_cfg",
                                                          "flash.trained_for", "flash.prediction_type")}
    legacy["flash.nfe"] = "2"  # the old name of flash.recommended_steps, read as an alias
    settings = sampling_settings(legacy)
    assert (settings.steps, settings.cfg, settings.trained_for) == (2, 1.0, None)


def test_an_unreadable_value_names_the_key():
    with pytest.raises(ValueError, match="'flash.recommended_cfg'.*re-export"):
        sampling_settings({**OURS, "flash.recommended_cfg": "one"}, source="x.safetensors")
