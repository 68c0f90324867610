"""No code from model folders: custom pipelines and custom components are refused before diffusers runs them."""

from __future__ import annotations

import json

import pytest

from flash_core.model_folders import ModelFolderError, check_pipeline_folder

STANDARD = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.35.2",
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
    "feature_extractor": [None, None],
}


def folder_with(tmp_path, index: dict, files: dict[str, str] | None = None):
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    for name, text in (files or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_a_standard_pipeline_folder_passes(tmp_path):
    assert check_pipeline_folder(folder_with(tmp_path, STANDARD))["_class_name"] == "StableDiffusionPipeline"


@pytest.mark.parametrize(
    "index_change, files, fragments",
    [
        ({"_class_name": ["my_pipeline", "MyPipeline"]}, {"my_pipeline.py": "raise SystemExit('ran')"},
         ["'_class_name'", "custom pipeline"]),
        ({"_class_name": "NotADiffusersPipeline"}, {}, ["'NotADiffusersPipeline'", "not a pipeline"]),
        ({"unet": ["my_lib", "MyUNet"]}, {"unet/my_lib.py": "raise SystemExit('ran')"}, ["'unet'", "custom code"]),
        ({}, {"unet/diffusers.py": "raise SystemExit('ran')"}, ["diffusers.py", "Python code"]),
        ({}, {"pipeline.py": "raise SystemExit('ran')"}, ["pipeline.py", "Python code"]),
    ],
    ids=["custom-pipeline", "unknown-class", "custom-component", "shadowing-module", "top-level-script"],
)
def test_custom_code_is_refused_with_the_file_and_key(tmp_path, index_change, files, fragments):
    folder = folder_with(tmp_path, {**STANDARD, **index_change}, files)
    with pytest.raises(ModelFolderError) as error:
        check_pipeline_folder(folder)
    message = str(error.value)
    assert str(folder) in message and "never runs code from a model folder" in message
    for fragment in fragments:
        assert fragment in message


def test_unreadable_model_index_names_the_file(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="model_index.json.*is not valid JSON"):
        check_pipeline_folder(tmp_path)
