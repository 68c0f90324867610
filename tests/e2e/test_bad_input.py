"""Bad input: each case gets a clear message in ComfyUI's error panel, and the server keeps serving.

The message text is what the frontend's error panel shows: the /prompt validation answer or the
execution_error message of the run.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .conftest import TINY_LORA, error_text, load_api_workflow, small


def run_with_lora(server, lora_name: str) -> dict:
    workflow = small(load_api_workflow("flash_txt2img"))
    workflow["2"]["inputs"]["lora_name"] = lora_name
    return server.run(workflow)


def assert_failed_cleanly(server, entry: dict, *needles: str) -> str:
    assert entry["status"]["status_str"] in ("error", "rejected"), entry
    text = error_text(entry)
    for needle in needles:
        assert needle.lower() in text.lower(), f"{needle!r} not in error message: {text}"
    assert "Traceback" not in text and 'File "' not in text  # a message, not a stack dump
    # the server is still up and still generates
    assert server.alive()
    healthy = server.run(small(load_api_workflow("flash_txt2img")))
    assert healthy["status"]["status_str"] == "success"
    return text


def test_truncated_safetensors(server, models_root):
    good = (models_root / "loras" / TINY_LORA).read_bytes()
    path = models_root / "loras" / "truncated_lora.safetensors"
    path.write_bytes(good[: len(good) // 3])
    entry = run_with_lora(server, path.name)
    assert_failed_cleanly(server, entry, "truncated_lora.safetensors", "corrupt")


class _SideEffect:
    """Unpickling this object creates a marker file: proof that a loader unpickled the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_pickle_lora_is_refused_without_unpickling(server, models_root, tmp_path, suffix):
    marker = tmp_path / f"unpickled{suffix}.marker"
    path = models_root / "loras" / f"pickled_lora{suffix}"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": _SideEffect(str(marker))}, handle)
    entry = run_with_lora(server, path.name)
    assert_failed_cleanly(server, entry, path.name, ".safetensors")
    assert not marker.exists(), "the pickle file was unpickled"


def test_lora_for_another_architecture(server, models_root):
    # SDXL key names (input_blocks.7 / down_blocks.2 attentions exist only in SDXL) with 2048-wide cross-attention.
    tensors = {}
    for block in ("down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "mid_block.attentions.0"):
        for layer in range(2):
            prefix = f"unet.{block}.transformer_blocks.{layer}.attn2.to_k"
            tensors[f"{prefix}.lora_A.weight"] = torch.zeros(4, 2048)
            tensors[f"{prefix}.lora_B.weight"] = torch.zeros(1280, 4)
    path = models_root / "loras" / "sdxl_style_lora.safetensors"
    save_file(tensors, str(path))
    entry = run_with_lora(server, path.name)
    assert_failed_cleanly(server, entry, path.name, "SDXL")


def test_lora_with_zero_matching_keys(server, models_root):
    path = models_root / "loras" / "not_a_lora.safetensors"
    save_file({"some.random.tensor": torch.zeros(3, 3), "another.one": torch.ones(2)}, str(path))
    entry = run_with_lora(server, path.name)
    assert_failed_cleanly(server, entry, path.name, "LoRA")


@pytest.mark.parametrize("field,value", [("steps", 9), ("steps", -1), ("denoise", 1.5), ("denoise", -0.1)])  # steps 0 = from the LoRA
def test_steps_or_denoise_out_of_range(server, field, value):
    workflow = small(load_api_workflow("flash_txt2img"))
    workflow["6"]["inputs"][field] = value
    entry = server.run(workflow)
    assert_failed_cleanly(server, entry, field)

@pytest.mark.parametrize("node,field", [("6", "cfg"), ("2", "strength_model"), ("2", "strength_clip")])
def test_nan_numbers_through_prompt_are_refused(server, node, field):
    """/prompt's min/max checks let NaN through (JSON's NaN): the node refuses it instead of drawing a black image."""
    workflow = small(load_api_workflow("flash_txt2img"))
    workflow[node]["inputs"][field] = float("nan")
    entry = server.run(workflow)
    assert_failed_cleanly(server, entry, field, "nan")


# A wrong-channel latent is checked in-process (tests/nodes/test_sampling.py): through the server, an
# *empty* 16-channel latent is silently resized by ComfyUI's fix_empty_latent_channels before sampling.
