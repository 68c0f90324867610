"""The shared graph workflows (workflows/api/flash_*.json) through a real ComfyUI server on tiny fixtures.

Each workflow names the real models it is shared with (SD1.5, flash-sd, a canny ControlNet ...); the tests
substitute the tiny fixtures (training/fixtures/tiny_checkpoint.py, training/fixtures/tiny_controlnet.py) and 64 px latents,
and put generated input images into the server's input folder. The SDXL workflow cannot run on the SD1.5-
family tiny checkpoint: its only failures must be its two missing model files. The IP-Adapter workflow
needs the third-party ComfyUI_IPAdapter_plus pack: its node types must be exactly the documented allow-list.
"""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from training.fixtures import tiny_checkpoint, tiny_controlnet
from training.fixtures.comfy_env import comfyui_version

from .conftest import (
    REPO_ROOT,
    TINY_CHECKPOINT,
    TINY_LORA,
    error_text,
    load_api_workflow,
    small,
)

STYLE_LORA = "flash_tiny_style_kohya.safetensors"
INPUT_IMAGE = "flash_example.png"
INPAINT_IMAGE = "flash_example_inpaint.png"
SIZE = 64
HOLE = slice(16, 48)  # the inpainting hole (transparent square) of INPAINT_IMAGE, in pixels

RUNNABLE = [
    "flash_sd15_txt2img", "flash_sd15_lora_stack", "flash_img2img", "flash_hires_fix", "flash_inpaint_noise_mask",
    "flash_inpaint_vae_encode", "flash_inpaint_model_conditioning", "flash_controlnet",
]
NOT_RUNNABLE = {
    "flash_sdxl_txt2img": "SDXL graph: the tiny fixture checkpoint is SD1.5-family",
    "flash_ip_adapter": "needs the third-party ComfyUI_IPAdapter_plus node pack",
}
THIRD_PARTY_NODES = {"IPAdapterUnifiedLoader", "IPAdapterAdvanced"}  # cubiq/ComfyUI_IPAdapter_plus
NEW_WORKFLOWS = RUNNABLE + list(NOT_RUNNABLE)
# Shipped workflows that other test files run: workflow -> the test file.
TESTED_ELSEWHERE = {
    "flash_txt2img": "test_txt2img.py", "flash_distill_train": "test_distill_train.py",
    "flash_demo_distill": "test_demo.py", "flash_demo_compare": "test_demo.py",
    "flash_distill_my_stack": "test_distill_my_stack.py", "flash_distill_guidance": "test_distill_train.py",
}
TINY_NAMES = (TINY_CHECKPOINT, TINY_LORA, tiny_controlnet.CONTROLNET_NAME, STYLE_LORA)


# ---------------------------------------------------------------------------------------------------------
# Fixtures: extra fixture models and input images for the session's server
# ---------------------------------------------------------------------------------------------------------


def _kohya_style_lora() -> dict[str, torch.Tensor]:
    """A second LoRA in kohya format (what style LoRAs ship as) from the tiny Flash LoRA's shapes, rescaled."""
    tensors = {}
    for key, value in load_file(str(tiny_checkpoint.build_lora())).items():
        module, _, kind = key.removeprefix("unet.").rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        tensors[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.flip(0) * 0.5
        tensors[f"{name}.alpha"] = torch.tensor(float(value.shape[0] if kind.startswith("A") else value.shape[1]))
    return tensors


def _structured_image() -> np.ndarray:
    """A 64x64 RGB picture with structure (gradient + a bright disc + stripes), uint8."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    disc = ((x - 0.35) ** 2 + (y - 0.4) ** 2 < 0.05).astype(float)
    stripes = (np.sin(x * 20) > 0).astype(float)
    rgb = np.stack([0.2 + 0.6 * x, 0.3 + 0.5 * disc, 0.2 + 0.4 * stripes * y], axis=-1)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def graph_server(server, models_root):
    """The session server with the tiny ControlNet, a kohya style LoRA and the input images in place."""
    controlnet = models_root / "controlnet" / tiny_controlnet.CONTROLNET_NAME
    controlnet.parent.mkdir(exist_ok=True)
    if not controlnet.exists():
        controlnet.symlink_to(tiny_controlnet.build())
    style = models_root / "loras" / STYLE_LORA
    if not style.exists():
        save_file(_kohya_style_lora(), str(style))
    inputs = server.base_dir / "input"
    inputs.mkdir(exist_ok=True)
    rgb = _structured_image()
    Image.fromarray(rgb).save(inputs / INPUT_IMAGE)
    alpha = np.full((SIZE, SIZE), 255, np.uint8)
    alpha[HOLE, HOLE] = 0  # LoadImage: MASK = 1 - alpha, the area to repaint
    Image.fromarray(np.dstack([rgb, alpha])).save(inputs / INPAINT_IMAGE)
    return server


def tiny(workflow: dict) -> dict:
    """Swap the shared workflow's real model names for the tiny fixtures and shrink it to 64 px."""
    workflow = small(copy.deepcopy(workflow), SIZE)
    for node in workflow.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = TINY_CHECKPOINT
        elif kind == "FlashLoRALoader":
            inputs["lora_name"] = TINY_LORA
        elif kind == "LoraLoader":
            inputs["lora_name"] = STYLE_LORA
        elif kind == "ControlNetLoader":
            inputs["control_net_name"] = tiny_controlnet.CONTROLNET_NAME
    return workflow


def expected_side(workflow: dict) -> int:
    """Decoded image side: the input image's for image-to-image graphs; for Empty Latent Image graphs
    SIZE / 8 latent cells (ComfyUI's fixed 8) times the tiny VAE's own scale (2 ** (levels - 1) = 4),
    times 1.5 after the hi-res fix's LatentUpscaleBy."""
    kinds = {node["class_type"] for node in workflow.values()}
    if "LoadImage" in kinds and "EmptyLatentImage" not in kinds:
        return SIZE
    side = SIZE // 8 * 2 ** (len(tiny_checkpoint.TINY_VAE_DDCONFIG["ch_mult"]) - 1)
    return side * 3 // 2 if "LatentUpscaleBy" in kinds else side


def _node_of(workflow: dict, class_type: str) -> str:
    (node_id,) = [k for k, v in workflow.items() if v["class_type"] == class_type]
    return node_id


def _nodes_of(workflow: dict, class_type: str) -> list[str]:
    return sorted((k for k, v in workflow.items() if v["class_type"] == class_type), key=int)


def _save_latent(workflow: dict, source: str, prefix: str) -> None:
    """Add a stock SaveLatent of node `source`'s LATENT output (to compare latents exactly)."""
    workflow[f"{900 + len(workflow)}"] = {"class_type": "SaveLatent",
                                          "inputs": {"samples": [source, 0], "filename_prefix": prefix}}


def _latents(server, entry: dict, prefix: str) -> torch.Tensor:
    for output in entry["outputs"].values():
        for item in output.get("latents", []):
            if item["filename"].startswith(prefix.rpartition("/")[2]) and item["subfolder"] == prefix.rpartition("/")[0]:
                return load_file(str(server.output_dir() / item["subfolder"] / item["filename"]))["latent_tensor"]
    raise AssertionError(f"no latent saved with prefix {prefix}: {entry['outputs']}")


def _run_ok(server, workflow: dict) -> dict:
    entry = server.run(workflow)
    assert entry["status"]["status_str"] == "success", error_text(entry) or entry
    return entry


# ---------------------------------------------------------------------------------------------------------
# The workflows as shared
# ---------------------------------------------------------------------------------------------------------


def test_every_new_workflow_is_listed_and_names_no_fixture():
    shipped = {p.stem for p in (REPO_ROOT / "workflows" / "api").glob("*.json")} - set(TESTED_ELSEWHERE)
    assert shipped == set(NEW_WORKFLOWS)
    for name in NEW_WORKFLOWS:
        text = json.dumps(load_api_workflow(name))
        assert not [n for n in TINY_NAMES if n in text], name
        assert "FlashSampler" in text and "FlashLoRALoader" in text, name


def test_every_model_file_has_a_download_entry():
    """workflows/downloads/models.json: what the UI twins' `models` lists (the frontend's download dialog) hold."""
    sidecar = json.loads((REPO_ROOT / "workflows" / "downloads" / "models.json").read_text())
    files, listed = sidecar["files"], sidecar["workflows"]
    assert set(listed) == set(NEW_WORKFLOWS)
    loaders = {"CheckpointLoaderSimple": "ckpt_name", "FlashLoRALoader": "lora_name", "ControlNetLoader": "control_net_name"}
    for name in NEW_WORKFLOWS:
        named = {node["inputs"][loaders[node["class_type"]]] for node in load_api_workflow(name).values()
                 if node["class_type"] in loaders}  # stock LoraLoader: the user's own style LoRA, no download
        assert named <= set(listed[name]), (name, named - set(listed[name]))
        assert set(listed[name]) <= set(files), name
    for file_name, entry in files.items():
        assert file_name.endswith(".safetensors") and entry["url"].startswith("https://huggingface.co/"), file_name
        assert entry["url"].endswith(".safetensors") and "/resolve/main/" in entry["url"], entry
        assert entry["directory"] in {"checkpoints", "loras", "controlnet", "ipadapter", "clip_vision"}, entry


def test_node_types_exist_or_are_documented_third_party(graph_server):
    known = set(graph_server.get("/object_info", timeout=120))
    gallery = (REPO_ROOT / "docs" / "usage.md").read_text()
    used_third_party = set()
    for name in NEW_WORKFLOWS:
        missing = {n["class_type"] for n in load_api_workflow(name).values()} - known
        assert missing <= THIRD_PARTY_NODES, (name, missing)
        used_third_party |= missing
    assert used_third_party == THIRD_PARTY_NODES
    for node_type in THIRD_PARTY_NODES:
        assert f"`{node_type}`" in gallery  # the allow-list the frontend test uses, with the install note
    assert "ComfyUI_IPAdapter_plus" in gallery


def _assert_one_image(server, entry: dict, workflow: dict) -> None:
    images = server.output_images(entry)
    assert len(images) == 1 and images[0].is_file()
    pixels = np.asarray(Image.open(images[0]))
    assert pixels.shape == (expected_side(workflow),) * 2 + (3,)
    assert pixels.std() > 0  # a decoded sample, not a blank canvas


# The other runnable graphs run to their image in the tests of what they promise, below.
@pytest.mark.parametrize("name", ["flash_sd15_txt2img", "flash_sd15_lora_stack", "flash_inpaint_vae_encode",
                                  "flash_inpaint_model_conditioning", "flash_controlnet"])
def test_workflow_runs_to_an_image(graph_server, name):
    workflow = tiny(load_api_workflow(name))
    log_start = graph_server.log_path.stat().st_size
    _assert_one_image(graph_server, _run_ok(graph_server, workflow), workflow)
    with open(graph_server.log_path, "rb") as log:
        log.seek(log_start)
        assert b"lora key not loaded" not in log.read()  # both LoRAs of the stack applied every key


def test_sdxl_workflow_fails_only_for_its_missing_model_files(graph_server):
    """The SDXL graph cannot run on the SD1.5-family fixture; supply its model files one by one (as fixture
    names) and check that each failure is exactly the next missing file, and that the graph then runs."""
    workflow = load_api_workflow("flash_sdxl_txt2img")
    assert workflow[_node_of(workflow, "EmptyLatentImage")]["inputs"]["width"] == 1024
    checkpoint, lora = _node_of(workflow, "CheckpointLoaderSimple"), _node_of(workflow, "FlashLoRALoader")

    # /prompt checks combo values: V1 nodes' (the stock loader) on every version, V3 nodes' (the Flash LoRA
    # Loader) on 0.30 but not on 0.3.75, where the Flash LoRA Loader fails when it runs instead.
    v3_checked = comfyui_version() > (0, 3, 75)
    expected = {checkpoint: "ckpt_name", lora: "lora_name"} if v3_checked else {checkpoint: "ckpt_name"}
    entry = graph_server.run(workflow)
    assert "rejected" in entry, entry
    errors = entry["rejected"]["node_errors"]
    assert sorted(errors) == sorted(expected), errors
    for node, input_name in expected.items():
        (error,) = errors[node]["errors"]
        assert error["type"] == "value_not_in_list" and error["extra_info"]["input_name"] == input_name, error

    workflow[checkpoint]["inputs"]["ckpt_name"] = TINY_CHECKPOINT
    entry = graph_server.run(small(workflow, SIZE))
    if v3_checked:
        assert "rejected" in entry and list(entry["rejected"]["node_errors"]) == [lora], entry
    else:
        assert entry["status"]["status_str"] == "error", entry
        failed = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
        assert [e["node_id"] for e in failed] == [lora], failed
    assert workflow[lora]["inputs"]["lora_name"] in error_text(entry)

    workflow[lora]["inputs"]["lora_name"] = TINY_LORA
    _run_ok(graph_server, workflow)


# ---------------------------------------------------------------------------------------------------------
# What the graphs promise
# ---------------------------------------------------------------------------------------------------------


def test_set_latent_noise_mask_keeps_the_latent_outside_the_mask(graph_server):
    workflow = tiny(load_api_workflow("flash_inpaint_noise_mask"))
    _save_latent(workflow, _node_of(workflow, "VAEEncode"), "graphs/mask_source")
    _save_latent(workflow, _node_of(workflow, "FlashSampler"), "graphs/mask_result")
    entry = _run_ok(graph_server, workflow)
    _assert_one_image(graph_server, entry, workflow)
    source = _latents(graph_server, entry, "graphs/mask_source")
    result = _latents(graph_server, entry, "graphs/mask_result")

    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., HOLE, HOLE] = 1.0
    # The mask at latent resolution as the sampler applies it (ComfyUI's comfy.utils.reshape_mask: bilinear).
    latent_mask = torch.nn.functional.interpolate(mask, size=source.shape[-2:], mode="bilinear").expand_as(source)
    outside, inside = latent_mask == 0, latent_mask == 1
    assert outside.sum() > 0 and inside.sum() > 0
    torch.testing.assert_close(result[outside], source[outside], rtol=1e-6, atol=1e-6)
    assert (result[inside] - source[inside]).abs().mean() > 0.1


def test_img2img_keeps_the_structure_of_its_input(graph_server):
    img2img = tiny(load_api_workflow("flash_img2img"))
    _save_latent(img2img, _node_of(img2img, "VAEEncode"), "graphs/img2img_source")
    _save_latent(img2img, _node_of(img2img, "FlashSampler"), "graphs/img2img_result")
    entry = _run_ok(graph_server, img2img)
    _assert_one_image(graph_server, entry, img2img)
    source = _latents(graph_server, entry, "graphs/img2img_source")
    result = _latents(graph_server, entry, "graphs/img2img_result")

    txt2img = tiny(load_api_workflow("flash_sd15_txt2img"))
    txt2img[_node_of(txt2img, "EmptyLatentImage")]["inputs"].update(width=8 * source.shape[-1], height=8 * source.shape[-2])
    _save_latent(txt2img, _node_of(txt2img, "FlashSampler"), "graphs/txt2img_result")
    sample = _latents(graph_server, _run_ok(graph_server, txt2img), "graphs/txt2img_result")

    assert img2img[_node_of(img2img, "FlashSampler")]["inputs"]["denoise"] == 0.5
    assert source.shape == sample.shape
    assert (result - source).abs().mean() < 0.5 * (sample - source).abs().mean()


def test_hires_fix_second_pass_starts_from_the_upscaled_first_pass(graph_server):
    workflow = tiny(load_api_workflow("flash_hires_fix"))
    _, second = _nodes_of(workflow, "FlashSampler")  # first pass, hi-res pass
    assert workflow[second]["inputs"]["denoise"] < 1.0
    _save_latent(workflow, _node_of(workflow, "LatentUpscaleBy"), "graphs/hires_upscaled")
    _save_latent(workflow, second, "graphs/hires_result")
    entry = _run_ok(graph_server, workflow)
    _assert_one_image(graph_server, entry, workflow)
    upscaled = _latents(graph_server, entry, "graphs/hires_upscaled")
    result = _latents(graph_server, entry, "graphs/hires_result")
    assert result.shape == upscaled.shape == (1, 4, 12, 12)

    fresh = tiny(load_api_workflow("flash_sd15_txt2img"))
    fresh[_node_of(fresh, "EmptyLatentImage")]["inputs"].update(width=96, height=96)
    _save_latent(fresh, _node_of(fresh, "FlashSampler"), "graphs/hires_fresh")
    sample = _latents(graph_server, _run_ok(graph_server, fresh), "graphs/hires_fresh")
    assert (result - upscaled).abs().mean() < 0.5 * (sample - upscaled).abs().mean()


def test_gallery_documents_every_workflow():
    gallery = (REPO_ROOT / "docs" / "usage.md").read_text()
    for name in NEW_WORKFLOWS:
        assert re.search(rf"workflows/{name}\.json", gallery), name
