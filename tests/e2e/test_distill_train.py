"""FlashDistillTrain through a real ComfyUI server and the tiny SD1.5 checkpoint.

The shipped workflow (teacher-generated training latents -> FlashDistillTrain -> preview grid, loss graph,
Flash Sampler on the student) runs end to end; the written LoRA samples identically through
FlashLoRALoader and the stock LoraLoader without a single lost key; POST /interrupt mid-run leaves a
checkpoint and no LoRA file, and queuing again resumes from that step and finishes; bad input gets a clear
message in the error panel.
"""

from __future__ import annotations

import copy
import json
import threading
import uuid

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from flash_core.grid import GRID_MIN_CELL

from .conftest import TINY_CHECKPOINT, error_text, load_api_workflow

TRAIN_NODE = "6"


def training_workflow(name: str, steps: int = 3, preview_every: int = 3, shipped: str = "flash_distill_train") -> dict:
    """A shipped training workflow at test size: 4 latents of 8x8, 2-step data, K=4 teacher, rank 4, batch 2."""
    workflow = load_api_workflow(shipped)
    for node in workflow.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
    workflow["4"]["inputs"]["batch_size"] = 4
    workflow["5"]["inputs"]["steps"] = 2
    workflow[TRAIN_NODE]["inputs"].update(
        lora_name=name, steps=steps, rank=4, learning_rate=1e-4, teacher_steps=4, batch_size=2,
        preview_every=preview_every, overwrite=True, gradient_checkpointing=False)
    for node in workflow.values():
        if node["class_type"] == "FlashSampler":
            node["inputs"]["steps"] = 2
    for key, node in workflow.items():
        if node["class_type"] in ("SaveImage", "LossGraphNode"):
            node["inputs"]["filename_prefix"] = f"{name}/{key}"
    return workflow


def sampling_workflow(lora_name: str, loader: str) -> dict:
    """Checkpoint -> (Flash LoRA Loader | stock LoraLoader) -> Flash Sampler (2 steps) -> decode -> save."""
    loader_inputs = {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name, "strength_model": 1.0,
                     "strength_clip": 1.0}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CHECKPOINT}},
        "2": {"class_type": loader, "inputs": loader_inputs},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red fox in the snow"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "FlashSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0],
                                                       "latent_image": ["4", 0], "seed": 3, "steps": 2, "cfg": 1.0,
                                                       "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"loaders/{loader}"}},
    }


def lora_file(models_root, name: str):
    return models_root / "loras" / "flash" / f"{name}.safetensors"


def test_shipped_workflow_trains_saves_and_samples(server, models_root):
    entry = server.run(training_workflow("e2e_student"), timeout=600)
    assert entry["status"]["status_str"] == "success", error_text(entry) or entry
    path = lora_file(models_root, "e2e_student")
    with safe_open(str(path), "pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
    assert metadata["flash.trained_steps"] == "3" and metadata["flash.rank"] == "4" and metadata["flash.base_model"] == "SD15"
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    images = {p.parent.name + "/" + p.name.split("_")[0]: p for p in server.output_images(entry)}
    grid = np.asarray(Image.open(images["e2e_student/7"]))
    student = np.asarray(Image.open(images["e2e_student/12"]))
    assert entry["outputs"]["8"]["images"]  # Plot Loss Graph drew the LOSS_MAP
    assert entry["outputs"][TRAIN_NODE]["images"]  # the node shows its preview grid itself
    tile = student.shape[0]  # decoded 64x64 latent -> the tiny VAE's image size
    cell = tile * -(-GRID_MIN_CELL // tile)  # small samples are nearest-enlarged to a readable cell
    assert grid.shape[0] == 4 * cell  # rows: teacher, student 1 / 2 / 4 steps
    assert grid.shape[1] > 4 * cell  # label strip + the 4 training prompts/seeds
    assert grid.std() > 0 and student.std() > 0


def test_saved_lora_samples_identically_through_flash_and_stock_loaders(server, models_root):
    if not lora_file(models_root, "e2e_student").exists():  # independent of test order
        assert server.run(training_workflow("e2e_student"))["status"]["status_str"] == "success"
    log_before = len(server.log_tail(10**9))
    pixels = {}
    for loader in ("FlashLoRALoader", "LoraLoader"):
        entry = server.run(sampling_workflow("flash/e2e_student.safetensors", loader))
        assert entry["status"]["status_str"] == "success", error_text(entry) or entry
        pixels[loader] = np.asarray(Image.open(server.output_images(entry)[0]))
    assert np.array_equal(pixels["FlashLoRALoader"], pixels["LoraLoader"])
    assert "lora key not loaded" not in server.log_tail(10**9)[log_before:]


def test_guidance_workflow_trains_a_cfg_student_that_samples_at_its_cfg_with_the_negative(server, models_root):
    """workflows/flash_distill_guidance.json (issue 24): Flash Distill Train in guidance mode "cfg", then Flash
    Sampler at cfg 0 (the LoRA's recommended cfg) and at cfg 4, both with a negative prompt."""
    workflow = training_workflow("e2e_guidance", shipped="flash_distill_guidance")
    assert workflow[TRAIN_NODE]["inputs"]["guidance_mode"] == "cfg"
    explicit = copy.deepcopy(workflow["13"])  # a third sampler at cfg 8, the middle of the recipe's 3-13, by hand
    explicit["inputs"]["cfg"] = 8.0
    workflow["20"], workflow["21"] = explicit, {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["1", 2]}}
    workflow["22"] = {"class_type": "SaveImage", "inputs": {"images": ["21", 0], "filename_prefix": "e2e_guidance/22"}}
    entry = server.run(workflow, timeout=600)
    assert entry["status"]["status_str"] == "success", error_text(entry) or entry
    with safe_open(str(lora_file(models_root, "e2e_guidance")), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["flash.guidance_mode"] == "cfg" and metadata["flash.recommended_cfg"] == "8"
    images = {p.parent.name + "/" + p.name.split("_")[0]: np.asarray(Image.open(p)) for p in server.output_images(entry)}
    recommended, dial, by_hand = images["e2e_guidance/12"], images["e2e_guidance/15"], images["e2e_guidance/22"]
    assert np.array_equal(recommended, by_hand)  # cfg 0 took the LoRA's cfg 8
    assert not np.array_equal(recommended, dial)  # the dial acts


class ProgressWatcher:
    """Listens on /ws for the training node's progress messages of one client id."""

    def __init__(self, server):
        import websocket

        self.client_id = uuid.uuid4().hex
        self.values: list[int] = []
        self.reached = threading.Event()
        self.threshold = 1
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}", timeout=600)
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        while True:
            try:
                message = self.ws.recv()
            except Exception:
                return
            if not message:  # the connection closed
                return
            if isinstance(message, bytes):  # binary preview frames
                continue
            data = json.loads(message)
            if data.get("type") == "progress" and data["data"].get("node") == TRAIN_NODE:
                self.values.append(int(data["data"]["value"]))
                if self.values[-1] >= self.threshold:
                    self.reached.set()

    def close(self) -> None:
        self.ws.close()


def test_interrupt_leaves_checkpoint_and_the_resumed_run_finishes(server, models_root):
    """Cancel through the server's /interrupt once step 2 or later was reported. ComfyUI throttles plain progress
    updates by time but always sends the first one, every one with a preview and the last: with a preview every 4
    steps the trigger fires at step 4 at the latest, whatever the machine's speed, and the run still has 8 steps
    (two of them with a preview) to honour the Cancel."""
    name, steps = "e2e_interrupted", 12
    workflow = training_workflow(name, steps=steps, preview_every=4)
    workflow[TRAIN_NODE]["inputs"]["resume"] = False
    checkpoints = models_root / "loras" / "flash" / ".checkpoints" / name
    watcher = ProgressWatcher(server)
    try:
        watcher.threshold = 2
        answer = server.post("/prompt", {"prompt": workflow, "client_id": watcher.client_id})
        assert "prompt_id" in answer, answer
        assert watcher.reached.wait(timeout=400), "training never reported step 2"
        server.post("/interrupt", {})
        entry = server.wait(answer["prompt_id"], timeout=300)
        assert entry["status"]["status_str"] == "error"
        assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])
        assert not lora_file(models_root, name).exists()  # no partial LoRA
        assert not [p for p in (models_root / "loras" / "flash").rglob(".tmp-*")]
        latest = checkpoints / (checkpoints / "latest").read_text().strip()
        stopped_at = torch.load(latest / "state.flashckpt", weights_only=True)["step"]
        assert 2 <= stopped_at < steps  # Cancel stopped within a step of the request

        watcher.values.clear()
        watcher.threshold = steps
        workflow[TRAIN_NODE]["inputs"]["resume"] = True  # queue the same node again, resume on
        answer = server.post("/prompt", {"prompt": workflow, "client_id": watcher.client_id})
        entry = server.wait(answer["prompt_id"], timeout=600)
        assert entry["status"]["status_str"] == "success", error_text(entry) or entry
        assert watcher.values and watcher.values[0] == stopped_at + 1  # continued, not restarted
        with safe_open(str(lora_file(models_root, name)), "pt") as handle:
            assert handle.metadata()["flash.trained_steps"] == str(steps)
    finally:
        watcher.close()


def test_bad_inputs_get_clear_messages(server, models_root):
    bad_name = training_workflow("../escape")
    entry = server.run(bad_name)
    text = error_text(entry)
    assert entry["status"]["status_str"] == "error" and "path separator" in text, text
    assert not (models_root / "loras" / "escape.safetensors").exists()

    taken = training_workflow("e2e_taken")
    lora_file(models_root, "e2e_taken").parent.mkdir(parents=True, exist_ok=True)
    lora_file(models_root, "e2e_taken").write_bytes(b"keep me")
    taken[TRAIN_NODE]["inputs"]["overwrite"] = False
    entry = server.run(taken)
    assert "already exists" in error_text(entry) and "overwrite" in error_text(entry)
    assert lora_file(models_root, "e2e_taken").read_bytes() == b"keep me"

    mismatch = training_workflow("e2e_mismatch")  # two prompts in one CONDITIONING for four latents
    mismatch["13"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["2", 0], "conditioning_2": ["2", 0]}}
    mismatch[TRAIN_NODE]["inputs"]["positive"] = ["13", 0]
    entry = server.run(mismatch)
    text = error_text(entry)
    assert "2 positive conditionings for 4 latents" in text and "Traceback" not in text, text
    assert server.alive()
