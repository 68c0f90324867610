"""Distil your own stack (issue 12) in-process on real ComfyUI classes: FlashDistillTrain records the stack it was
given (base checkpoint + hash, LoRAs + strengths) with the grid / steps / cfg; FlashLoRALoader hands that to
FlashSampler along the MODEL; FlashSampler at steps 0 / cfg 0 samples exactly as with the recorded values, keeps
today's defaults for LoRAs without metadata, and warns (log + UI event, never an error) on another stack."""

from __future__ import annotations

import importlib
import json
import logging

import pytest
import torch
from safetensors import safe_open

from training.fixtures.comfy_env import import_comfy, load_pack

import_comfy()

from .test_training import LATENT, MICRO_SD15, micro_model, node_inputs, prompt

STYLE = "style.safetensors"
CHECKPOINT = "micro_sd15.safetensors"
TRAIN_NODE, SAMPLER_NODE = "5", "9"


@pytest.fixture(scope="module")
def pack():
    return load_pack()


@pytest.fixture(scope="module")
def nodes(pack):
    return {name: importlib.import_module(f"{pack.__name__}.nodes.{name}") for name in ("training", "sampling", "loaders", "stack")}


def workflow(style_strength: float | None, sampler_model: list) -> dict:
    """The API prompt ComfyUI hands the nodes (hidden PROMPT): checkpoint -> LoraLoader(style) -> FlashDistillTrain,
    and a FlashSampler on `sampler_model` (FlashLoRALoader '8' of the student file over node '2' or '1')."""
    prompt_ = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "5": {"class_type": "FlashDistillTrain", "inputs": {"model": ["2" if style_strength is not None else "1", 0]}},
        "8": {"class_type": "FlashLoRALoader", "inputs": {"model": ["2" if style_strength is not None else "1", 0],
                                                          "lora_name": "flash/student.safetensors", "strength_model": 1.0}},
        SAMPLER_NODE: {"class_type": "FlashSampler", "inputs": {"model": sampler_model}},
    }
    if style_strength is not None:
        prompt_["2"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "lora_name": STYLE,
                                                               "strength_model": style_strength}}
    return prompt_


def with_hidden(node_class, prompt_: dict, node_id: str):
    """The node class as ComfyUI's executor prepares it: hidden PROMPT and UNIQUE_ID set."""
    from comfy_api.latest import io

    clone = type(node_class.__name__, (node_class,), {})
    clone.hidden = io.HiddenHolder.from_dict({io.Hidden.prompt: prompt_, io.Hidden.unique_id: node_id})
    return clone


@pytest.fixture(scope="module")
def trained(nodes, tmp_path_factory):
    """A 4-step run of FlashDistillTrain on a micro SD1.5 'checkpoint + style LoRA' stack, as ComfyUI calls it."""
    import folder_paths

    root = tmp_path_factory.mktemp("stack_models")
    for folder in ("loras", "checkpoints"):
        (root / folder).mkdir()
    (root / "checkpoints" / CHECKPOINT).write_bytes(b"micro checkpoint weights")  # hashed, not loaded
    (root / "loras" / STYLE).write_bytes(b"style lora weights")
    saved = {k: folder_paths.folder_names_and_paths[k] for k in ("loras", "checkpoints")}
    for folder in ("loras", "checkpoints"):
        folder_paths.folder_names_and_paths[folder] = ([str(root / folder)], set(folder_paths.supported_pt_extensions))
    try:
        generator = torch.Generator().manual_seed(3)
        prompts = [prompt(generator) for _ in range(4)]
        teacher = micro_model(MICRO_SD15, seed=1)
        node = with_hidden(nodes["training"].FlashDistillTrain, workflow(0.8, [TRAIN_NODE, 0]), TRAIN_NODE)
        with torch.inference_mode():
            output = node.execute(**node_inputs(teacher, torch.randn(4, *LATENT, generator=generator), prompts))
        student = (output.args if hasattr(output, "args") else output.result)[0]
        with safe_open(str(root / "loras" / "flash" / "student.safetensors"), "pt") as handle:
            metadata = handle.metadata()
        yield {"root": root, "teacher": teacher, "student": student, "metadata": metadata, "context": prompts[0]}
    finally:
        folder_paths.folder_names_and_paths.update(saved)


@pytest.fixture()
def model_folders(trained):
    import folder_paths

    saved = {k: folder_paths.folder_names_and_paths[k] for k in ("loras", "checkpoints")}
    for folder in ("loras", "checkpoints"):
        folder_paths.folder_names_and_paths[folder] = ([str(trained["root"] / folder)], set(folder_paths.supported_pt_extensions))
    yield trained["root"]
    folder_paths.folder_names_and_paths.update(saved)


def sample(nodes, model, context, steps, cfg, prompt_=None):
    """FlashSampler.execute as ComfyUI runs it (hidden PROMPT / UNIQUE_ID when a prompt is given)."""
    node = nodes["sampling"].FlashSampler
    if prompt_ is not None:
        node = with_hidden(node, prompt_, SAMPLER_NODE)
    with torch.inference_mode():
        output = node.execute(model, [[context, {}]], [[torch.zeros_like(context), {}]],
                              {"samples": torch.zeros(1, *LATENT)}, 5, steps, cfg, 1.0)
    return (output.args if hasattr(output, "args") else output.result)[0]["samples"]


def test_metadata_records_the_stack_grid_and_recommended_settings(trained, nodes):
    metadata = trained["metadata"]
    stack = json.loads(metadata["flash.trained_for"])
    sha = nodes["stack"].file_sha256
    assert stack["base"] == {"name": CHECKPOINT, "node": "CheckpointLoaderSimple",
                             "sha256": sha(str(trained["root"] / "checkpoints" / CHECKPOINT))}
    assert stack["loras"] == [{"name": STYLE, "strength": 0.8, "node": "LoraLoader",
                               "sha256": sha(str(trained["root"] / "loras" / STYLE))}]
    assert metadata["flash.prediction_type"] == "epsilon"
    assert metadata["flash.recommended_steps"] == "2" and metadata["flash.recommended_cfg"] == "1"
    assert json.loads(metadata["flash.timesteps"]) == [999, 499]


def test_saved_settings_reach_the_sampler_through_the_loader(trained, nodes, model_folders):
    with torch.inference_mode():
        output = nodes["loaders"].FlashLoRALoader.execute(trained["teacher"], "flash/student.safetensors", 1.0, 1.0, None)
    model = (output.args if hasattr(output, "args") else output.result)[0]
    carried = nodes["loaders"].flash_sampling_of(model)
    assert carried["steps"] == 2 and carried["cfg"] == 1.0 and carried["timesteps"] == [999, 499]
    assert carried["trained_for"]["loras"][0]["name"] == STYLE
    assert nodes["loaders"].flash_sampling_of(trained["student"])["steps"] == 2  # the node's own student too
    context = trained["context"]
    auto = sample(nodes, model, context, 0, 0.0)
    assert torch.equal(auto, sample(nodes, model, context, 2, 1.0))  # steps 0 / cfg 0 = the file's 2 steps, cfg 1
    assert not torch.equal(auto, sample(nodes, model, context, 4, 1.0))
    assert not torch.equal(auto, sample(nodes, model, context, 2, 2.0))
    # the student output of FlashDistillTrain samples like the saved file through the loader
    assert torch.equal(sample(nodes, trained["student"], context, 0, 0.0), auto)


def test_files_without_flash_metadata_keep_todays_defaults(trained, nodes):
    teacher = trained["teacher"]  # no Flash LoRA: nothing in model_options
    assert nodes["loaders"].flash_sampling_of(teacher) is None
    context = trained["context"]
    assert torch.equal(sample(nodes, teacher, context, 0, 0.0), sample(nodes, teacher, context, 4, 1.0))


def test_sampling_on_another_stack_warns_naming_both(trained, nodes, model_folders, caplog):
    with torch.inference_mode():
        output = nodes["loaders"].FlashLoRALoader.execute(trained["teacher"], "flash/student.safetensors", 1.0, 1.0, None)
    model = (output.args if hasattr(output, "args") else output.result)[0]
    context = trained["context"]
    with caplog.at_level(logging.WARNING):
        same = sample(nodes, model, context, 0, 0.0, workflow(0.8, ["8", 0]))
    assert "distilled for" not in caplog.text  # the stack it was trained for: no warning
    with caplog.at_level(logging.WARNING):
        other = sample(nodes, model, context, 0, 0.0, workflow(0.3, ["8", 0]))
    assert f"distilled for {CHECKPOINT}" in caplog.text and f"{STYLE}@0.8" in caplog.text
    assert f"applied on {CHECKPOINT}" in caplog.text and f"{STYLE}@0.3" in caplog.text
    assert f"LoRA {STYLE} at 0.3 instead of 0.8" in caplog.text
    assert torch.equal(same, other)  # a warning, not an error: the sampling itself is unchanged
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        sample(nodes, model, context, 0, 0.0, workflow(None, ["8", 0]))
    assert f"missing LoRA {STYLE}" in caplog.text
