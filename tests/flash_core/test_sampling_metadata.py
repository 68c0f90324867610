"""flash_core.lora_formats.metadata.sampling_settings: what a Flash LoRA's metadata tells the sampler (issue 12)."""

from __future__ import annotations

import json

import pytest

from flash_core.lora_formats.metadata import sampling_settings

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


@pytest.mark.parametrize("key,value,why", [
    ("flash.recommended_cfg", "nan", "guidance scale"),
    ("flash.recommended_cfg", "inf", "guidance scale"),
    ("flash.recommended_cfg", "-2", "guidance scale"),
    ("flash.recommended_cfg", "0", "guidance scale"),
    ("flash.timesteps", "[499, 999]", "strictly decreasing"),
    ("flash.timesteps", "[999, 999]", "strictly decreasing"),
    ("flash.timesteps", "[4999, 499]", "outside 0-1000"),
    ("flash.timesteps", "[999, -1]", "outside 0-1000"),
    ("flash.timesteps", '{"a": 1}', "list of whole model timesteps"),
    ("flash.timesteps", "[999.5, 499]", "list of whole model timesteps"),
    ("flash.timesteps", '["999", 499]', "list of whole model timesteps"),
    ("flash.timesteps", "[NaN, 499]", "list of whole model timesteps"),
    ("flash.recommended_steps", "0", "outside 1-8"),
    ("flash.recommended_steps", "-3", "outside 1-8"),
    ("flash.recommended_steps", "1000", "outside 1-8"),
])
def test_metadata_that_would_sample_garbage_is_refused_naming_file_key_and_value(key, value, why):
    """NaN / inf / negative cfg, reversed or out-of-range grids, impossible step counts: a clear error, never an
    all-black image reported as success."""
    with pytest.raises(ValueError) as error:
        sampling_settings({**OURS, key: value}, source="Flash LoRA Loader: 'bad.safetensors'")
    text = str(error.value)
    assert "bad.safetensors" in text and key in text and repr(value) in text and why in text and "re-export" in text


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", '{"base": "x"}', '{"base": null, "loras": [1]}',
                                 '{"base": null, "loras": [{"strength": "high"}]}', '{"base": null, "patches": 3}'])
def test_a_malformed_stack_record_is_dropped_with_a_warning_and_sampling_goes_on(raw, caplog):
    """flash.trained_for only feeds the stack-mismatch warning: a malformed one must not stop the sampler."""
    settings = sampling_settings({**OURS, "flash.trained_for": raw}, source="x.safetensors")
    assert settings is not None and settings.trained_for is None and settings.steps == 2
    assert "flash.trained_for" in caplog.text and "x.safetensors" in caplog.text
