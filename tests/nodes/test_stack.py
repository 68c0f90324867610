"""nodes/stack.py: the base checkpoint and LoRA stack of a MODEL, read from the API-format prompt that built it."""

from __future__ import annotations

import importlib

import pytest


@pytest.fixture(scope="module")
def stack(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.stack")


PROMPT = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "base.safetensors"}},
    "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "style.safetensors",
                                                 "strength_model": 0.8, "strength_clip": 1.0}},
    "3": {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["2", 0], "sampling": "eps", "zsnr": False}},
    "4": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["3", 0], "lora_name": "detail.safetensors",
                                                          "strength_model": 0.5}},
    "5": {"class_type": "FlashDistillTrain", "inputs": {"model": ["4", 0]}},
}


def test_walks_up_through_loras_and_patches_to_the_checkpoint(stack):
    found = stack.describe_stack(PROMPT, "5", hashes=False)
    assert found["base"] == {"name": "base.safetensors", "node": "CheckpointLoaderSimple"}
    assert [(lora["name"], lora["strength"]) for lora in found["loras"]] == [("style.safetensors", 0.8),
                                                                            ("detail.safetensors", 0.5)]
    assert found["patches"] == ["ModelSamplingDiscrete"]
    assert stack.describe(found) == "base.safetensors + style.safetensors@0.8 + detail.safetensors@0.5"


def test_files_are_identified_by_content(stack, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a.write_bytes(b"same weights")
    b.write_bytes(b"same weights")
    c.write_bytes(b"other weights")
    assert stack.file_sha256(str(a)) == stack.file_sha256(str(b)) != stack.file_sha256(str(c))


def test_differences_name_what_changed(stack):
    trained = {"base": {"name": "base.safetensors", "sha256": "aa"},
               "loras": [{"name": "style.safetensors", "sha256": "bb", "strength": 0.8}]}
    same_renamed = {"base": {"name": "renamed.safetensors", "sha256": "aa"},
                    "loras": [{"name": "style2.safetensors", "sha256": "bb", "strength": 0.8},
                              {"name": "flash.safetensors", "sha256": "ff", "strength": 1.0}]}
    assert stack.stack_differences(trained, same_renamed, ignore_loras=("flash.safetensors",)) == []
    other = {"base": {"name": "base.safetensors", "sha256": "cc"},
             "loras": [{"name": "style.safetensors", "sha256": "bb", "strength": 0.3},
                       {"name": "extra.safetensors", "sha256": "dd", "strength": 1.0}]}
    differences = stack.stack_differences(trained, other)
    assert differences[0].startswith("base base.safetensors (aa) vs base.safetensors (cc)")
    assert "LoRA style.safetensors at 0.3 instead of 0.8" in differences
    assert "extra LoRA extra.safetensors (dd) at 1.0" in differences
    assert stack.stack_differences(trained, {"base": trained["base"], "loras": []}) == ["missing LoRA style.safetensors (bb) at 0.8"]
