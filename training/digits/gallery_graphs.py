"""The shipped graphs rewritten for the gallery: onto the digits teacher and its Flash student LoRA (see
gallery.py's docstring for each change), or onto the tiny random-weight test fixtures (ControlNet), and run on
the gallery's ComfyUI server (Runner: {SaveImage node: images})."""

from __future__ import annotations

import copy
import json

from training.digits.gallery_files import (
    CONTROL_IMAGE,
    FLASH_LORA,
    INPAINT_IMAGE,
    INPUT_IMAGE,
    STYLE_LORA,
    TEACHER_PIPELINE,
)
from training.fixtures.comfy_env import REPO_ROOT
from training.fixtures.comfy_server import ComfyServer

API_DIR = REPO_ROOT / "workflows" / "api"
LATENT_PX = 64  # Empty Latent Image side: 8x8 latent, 16x16 digits image
DIGIT_PX = 16  # the digits model's image side
SHIPPED_PIXELS = 512  # the SD1.5 graphs' image side, for pixel-sized settings


def load(name: str) -> dict:
    return json.loads((API_DIR / f"{name}.json").read_text())


def nodes_of(workflow: dict, class_type: str) -> list[str]:
    return sorted((k for k, v in workflow.items() if v["class_type"] == class_type), key=int)


def prompt(digit: int) -> str:
    from training.digits.data import canonical_prompt

    return canonical_prompt(digit)


def onto_digits(workflow: dict, name: str, digit: int) -> dict:
    """The shipped graph on the digits teacher + Flash student LoRA (see the module docstring)."""
    workflow = copy.deepcopy(workflow)
    for node_id, node in workflow.items():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":  # outputs MODEL, CLIP, VAE, as FlashDiffusersLoader's
            workflow[node_id] = {"class_type": "FlashDiffusersLoader", "inputs": {"pipeline": TEACHER_PIPELINE}}
        elif kind == "FlashLoRALoader":
            inputs["lora_name"] = FLASH_LORA
        elif kind == "LoraLoader":
            inputs["lora_name"] = STYLE_LORA
        elif kind == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = LATENT_PX
        elif kind == "CLIPTextEncode" and inputs["text"]:
            inputs["text"] = prompt(digit)
        elif kind == "LoadImage":
            inputs["image"] = INPAINT_IMAGE if "inpaint" in inputs["image"] else INPUT_IMAGE
        elif kind == "VAEEncodeForInpaint":  # pixels: 6 of 512 is 0 of 16; keep one pixel of growth
            inputs["grow_mask_by"] = max(1, round(inputs["grow_mask_by"] * DIGIT_PX / SHIPPED_PIXELS))
        elif kind == "SaveImage":
            inputs["filename_prefix"] = f"gallery/{name}"
    return workflow


def onto_fixtures(workflow: dict, name: str) -> dict:
    """The shipped graph on the tiny random-weight SD1.5-family fixtures (what tests/e2e/test_graphs.py runs)."""
    from training.fixtures import tiny_checkpoint, tiny_controlnet

    workflow = copy.deepcopy(workflow)
    for node in workflow.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = tiny_checkpoint.CHECKPOINT_NAME
        elif kind == "FlashLoRALoader":
            inputs["lora_name"] = tiny_checkpoint.LORA_NAME
        elif kind == "ControlNetLoader":
            inputs["control_net_name"] = tiny_controlnet.CONTROLNET_NAME
        elif kind == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = LATENT_PX
        elif kind == "LoadImage":
            inputs["image"] = CONTROL_IMAGE
        elif kind == "SaveImage":
            inputs["filename_prefix"] = f"gallery/{name}"
    return workflow


def save_node(workflow: dict, source: list, prefix: str) -> str:
    """Add a SaveImage of `source` (an IMAGE output); returns its node id."""
    node_id = str(900 + len(workflow))
    workflow[node_id] = {"class_type": "SaveImage", "inputs": {"images": source, "filename_prefix": prefix}}
    return node_id


class Runner:
    def __init__(self, server: ComfyServer):
        self.server = server
        self.runs = 0

    def run(self, workflow: dict) -> dict[str, list]:
        """Run a graph; returns {SaveImage node id: [PIL images]}."""
        from PIL import Image

        entry = self.server.run(workflow, timeout=300)
        self.runs += 1
        status = entry["status"].get("status_str")
        if status != "success":
            errors = [data for kind, data in entry["status"].get("messages", []) if kind == "execution_error"]
            detail = entry.get("rejected") or [(e.get("node_type"), e.get("exception_message")) for e in errors]
            raise RuntimeError(f"graph failed ({status}): {json.dumps(detail)[:3000]}")
        images = {}
        for node_id, output in entry.get("outputs", {}).items():
            files = [self.server.output_dir() / i.get("subfolder", "") / i["filename"]
                     for i in output.get("images", []) if i.get("type") == "output"]
            if files:
                images[node_id] = [Image.open(f).convert("RGB") for f in files]
        return images

    def one(self, workflow: dict, node_id: str | None = None):
        images = self.run(workflow)
        node_id = node_id or nodes_of(workflow, "SaveImage")[-1]
        return images[node_id][0]
