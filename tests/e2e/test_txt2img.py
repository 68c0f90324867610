"""flash_txt2img through a real ComfyUI server: comfy-cli for the UI file, /prompt for the API twin."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from .conftest import load_api_workflow, small


def test_api_workflow_produces_an_image(server):
    entry = server.run(small(load_api_workflow("flash_txt2img")))
    assert entry["status"]["status_str"] == "success", entry
    images = server.output_images(entry)
    assert len(images) == 1 and images[0].is_file()
    pixels = np.asarray(Image.open(images[0]))
    # EmptyLatentImage makes 64/8 = 8x8 latents; the tiny VAE upsamples 4x (ch_mult [1, 2, 4]) -> 32 px.
    assert pixels.shape == (32, 32, 3)
    assert pixels.std() > 0  # a decoded sample, not a blank canvas


def test_comfy_cli_runs_the_shared_workflow(server, tmp_path):
    workflow = small(load_api_workflow("flash_txt2img"))
    workflow["8"]["inputs"]["filename_prefix"] = "flash/cli"
    path = tmp_path / "flash_txt2img_small.json"
    path.write_text(json.dumps(workflow))
    result = server.comfy_cli_run(path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    written = sorted((server.output_dir() / "flash").glob("cli_*.png"))
    assert written, result.stdout


def test_same_seed_same_image_different_seed_different_image(server):
    def sample(seed: int) -> np.ndarray:
        workflow = small(load_api_workflow("flash_txt2img"))
        workflow["6"]["inputs"]["seed"] = seed
        entry = server.run(workflow)
        assert entry["status"]["status_str"] == "success", entry
        return np.asarray(Image.open(server.output_images(entry)[0]), dtype=np.float32)

    first, again, other = sample(7), sample(7), sample(8)
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 1.0

