"""workflows/flash_distill_my_stack.json end to end on the digits model (issue 12), through a real ComfyUI server.

The shipped graph (checkpoint -> style LoRA -> training latents from that stack -> FlashDistillTrain -> Flash
Sampler at steps 0 / cfg 0) runs with the digits teacher (FlashDiffusersLoader in place of the checkpoint loader)
and its italic style LoRA (training/digits/style.py) at a test budget. The LoRA it writes records the stack (the
teacher folder's and the style file's sha256, the strength), and the real frontend in Chromium shows a warning
naming both stacks when that student is sampled without the style LoRA, and none when the stack matches.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from training.digits.style import StyleConfig, train_style_lora

from training.fixtures.browser import open_frontend
from .conftest import error_text, load_api_workflow

pytestmark = pytest.mark.timeout(1800)

TEACHER = "flash_digits_teacher"  # models/diffusers/<name>
STYLE = "italic_style_lora.safetensors"
LORA = "flash_my_stack_e2e"
TOAST = "Flash LoRA on another stack"


# The style LoRA at a test budget: the assertions read what the student records and what the UI warns, not how
# italic it draws (that is bench-stack's job, on the full StyleConfig)
TEST_STYLE = StyleConfig(steps=20, batch_size=16)


@pytest.fixture(scope="module")
def stack_files(digits_teacher, tmp_path_factory) -> tuple[Path, Path]:
    """(teacher folder, style LoRA file): the session's digits teacher and an italic style LoRA trained on it."""
    from training.digits.teacher import load_teacher_pipeline

    teacher, _ = digits_teacher
    return teacher, train_style_lora(load_teacher_pipeline(teacher), tmp_path_factory.mktemp("style"), TEST_STYLE)


@pytest.fixture(scope="module")
def digits_server(server, models_root, stack_files):
    """The session server with the digits teacher (diffusers folder) and its italic style LoRA."""
    for folder, name, target in zip(("diffusers", "loras"), (TEACHER, STYLE), stack_files):
        link = models_root / folder / name
        link.parent.mkdir(exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target.resolve(), target_is_directory=target.is_dir())
    return server


def digits_workflow() -> dict:
    """The shipped graph on the digits teacher at test size: 4 training latents (64 px), 4 distillation steps."""
    workflow = load_api_workflow("flash_distill_my_stack")
    workflow["1"] = {"class_type": "FlashDiffusersLoader", "inputs": {"pipeline": TEACHER}}
    workflow["2"]["inputs"]["lora_name"] = STYLE
    workflow["3"]["inputs"]["text"] = "a handwritten digit seven"
    for node in ("5", "9"):
        workflow[node]["inputs"].update(width=64, height=64)
    workflow["5"]["inputs"]["batch_size"] = 4
    workflow["6"]["inputs"].update(steps=8, cfg=3.0, scheduler="normal")
    workflow["7"]["inputs"].update(lora_name=LORA, steps=4, nfe=2, rank=4, learning_rate=1e-3, guidance_min=2.0,
                                   guidance_max=4.0, teacher_steps=4, batch_size=2, resume=False, overwrite=True,
                                   preview_every=4, gradient_checkpointing=False, mixed_precision="fp32")
    for node in ("8", "12"):
        workflow[node]["inputs"]["filename_prefix"] = f"my_stack/{node}"
    return workflow


def sampling_workflow(style_strength: float | None, label: str) -> dict:
    """Digits teacher [-> style LoRA] -> Flash LoRA Loader (the trained student) -> Flash Sampler (0 / 0) -> image."""
    below = ["1", 0]
    workflow = {"1": {"class_type": "FlashDiffusersLoader", "inputs": {"pipeline": TEACHER}}}
    if style_strength is not None:
        workflow["2"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": STYLE,
                                                               "strength_model": style_strength, "strength_clip": style_strength}}
        below = ["2", 0]
    workflow.update({
        "3": {"class_type": "FlashLoRALoader", "inputs": {"model": below, "lora_name": f"flash/{LORA}.safetensors",
                                                          "strength_model": 1.0, "strength_clip": 1.0}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a handwritten digit three"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "FlashSampler", "inputs": {"model": ["3", 0], "positive": ["4", 0], "negative": ["4", 0],
                                                       "latent_image": ["5", 0], "seed": 2, "steps": 0, "cfg": 0.0,
                                                       "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": f"my_stack/{label}"}},
    })
    return workflow


@pytest.fixture(scope="module")
def trained(digits_server, models_root):
    entry = digits_server.run(digits_workflow(), timeout=1200)
    assert entry["status"]["status_str"] == "success", error_text(entry) or entry
    path = models_root / "loras" / "flash" / f"{LORA}.safetensors"
    with safe_open(str(path), "pt") as handle:
        return {"entry": entry, "metadata": handle.metadata()}


def test_the_student_records_the_stack_it_was_distilled_from(trained, digits_server, stack_files):
    from training.fixtures.comfy_env import load_pack

    stack = load_pack().nodes.stack
    trained_for = json.loads(trained["metadata"]["flash.trained_for"])
    assert trained_for["base"]["name"] == TEACHER and trained_for["base"]["node"] == "FlashDiffusersLoader"
    teacher, style_file = stack_files
    assert trained_for["base"]["sha256"] == stack.file_sha256(str(teacher))
    (style,) = trained_for["loras"]
    assert (style["name"], style["strength"], style["node"]) == (STYLE, 0.8, "LoraLoader")
    assert style["sha256"] == stack.file_sha256(str(style_file))
    assert trained["metadata"]["flash.recommended_steps"] == "2"
    assert trained["metadata"]["flash.prediction_type"] == "epsilon"
    names = sorted(p.name for p in digits_server.output_images(trained["entry"]))
    assert len(names) == 2 and any(n.startswith("12") for n in names)  # preview grid + the student's sample


def run_from_the_browser(frontend, server) -> None:
    """Press Run; the job the frontend queued (with its own client id) must succeed."""
    with frontend.page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as answer:
        frontend.click_run()
    reply = answer.value.json()
    assert "prompt_id" in reply, reply
    entry = server.wait(reply["prompt_id"], timeout=300)
    assert entry["status"]["status_str"] == "success", error_text(entry) or entry
    assert len(server.output_images(entry)) == 1


def _log_since(server, start: int) -> str:
    with open(server.log_path, "rb") as log:
        log.seek(start)
        return log.read().decode(errors="replace")


def test_the_browser_warns_when_the_student_runs_on_another_stack(trained, digits_server):
    try:
        _browser_warns(digits_server)
    except Exception as err:  # the server's side of a browser timeout is in its log
        raise AssertionError(f"{err}\n--- ComfyUI log ---\n{digits_server.log_tail(6000)}") from err


def _browser_warns(digits_server) -> None:
    with open_frontend(digits_server.url) as frontend:
        # the stack it was trained for: runs, no warning
        start = digits_server.log_path.stat().st_size
        frontend.load_api(sampling_workflow(0.8, "matching"), "flash_my_stack_matching")
        run_from_the_browser(frontend, digits_server)
        assert "was distilled for" not in _log_since(digits_server, start)
        assert frontend.page.get_by_text(TOAST).count() == 0
        # the same student without its style LoRA: a warning toast naming both stacks
        start = digits_server.log_path.stat().st_size
        frontend.load_api(sampling_workflow(None, "other"), "flash_my_stack_other")
        run_from_the_browser(frontend, digits_server)  # a warning, not an error: the image still comes
        toast = frontend.page.get_by_text(TOAST).first
        toast.wait_for(state="visible", timeout=120_000)
        message = frontend.page.locator(".p-toast-message, .flash-stack-mismatch", has_text=TOAST).first.inner_text()
        assert f"distilled for {TEACHER}" in message and f"{STYLE}@0.8" in message, message
        assert f"missing LoRA {STYLE}" in message, message
        log = _log_since(digits_server, start)
        assert "FlashSampler: Flash LoRA" in log and f"missing LoRA {STYLE}" in log
