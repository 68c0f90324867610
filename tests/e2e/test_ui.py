"""The pack in the real ComfyUI frontend, in a real (headless) Chromium against the session's live server.

The node library shows the Flash nodes; every shipped UI workflow opens without missing nodes and converts
to exactly its API twin; the UI workflows carry the model downloads of workflows/downloads/models.json, and
opening one on a server without those files brings up the frontend's "Missing Models" report offering them
(the legacy dialogs of frontend 1.32, ComfyUI 0.3.75; the error panel of frontend 1.47+, ComfyUI 0.30);
pressing Run on flash_txt2img renders an image in the UI, and on flash_distill_guidance trains a guidance-mode
"cfg" student and samples it; /workflow_templates serves the UI workflows as this
pack's templates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from training.fixtures import tiny_checkpoint
from training.fixtures.browser import MISSING_MODELS_SETTING, Frontend

from .conftest import WORKFLOWS

PACK = "ComfyUI-Flash"  # our folder name under custom_nodes/, the key /workflow_templates lists
CATEGORY = "Flash Diffusion"
FLASH_NODES = ("FlashSampler", "FlashSamplerSelect", "FlashScheduler", "FlashLoRALoader", "FlashDistillTrain",
               "FlashDiffusersLoader")
UI_WORKFLOWS = sorted(WORKFLOWS.glob("*.json"))
# Node types of other packs that shipped workflows may use (the test server does not install them):
# any other unregistered type fails the load test, and for these the missing-nodes dialog must show.
THIRD_PARTY_NODES = {
    "IPAdapterUnifiedLoader": "cubiq/ComfyUI_IPAdapter_plus (flash_ip_adapter): install it from the Manager",
    "IPAdapterAdvanced": "cubiq/ComfyUI_IPAdapter_plus (flash_ip_adapter): install it from the Manager",
}
LATENT_SIZE = 64
# 64 px -> 8x8 latents; the tiny fixture VAE upsamples 2 ** (len(ch_mult) - 1) = 4x, so 32 px images.
DECODED_SIZE = LATENT_SIZE // 8 * 2 ** (len(tiny_checkpoint.TINY_VAE_DDCONFIG["ch_mult"]) - 1)
SCREENSHOT = Path("/tmp/flash_ui_txt2img.png")  # for a human look; not an assertion
MODELS_SIDECAR = WORKFLOWS / "downloads" / "models.json"


def _api_inputs(prompt: dict) -> dict:
    return {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]} for node_id, node in prompt.items()}


def _node_ids(workflow: dict, node_type: str) -> list[int]:
    return [node["id"] for node in workflow["nodes"] if node["type"] == node_type]


def _click_run(frontend: Frontend) -> tuple[dict, dict]:
    """Press Run: the API prompt the frontend queued and the server's reply (which has a prompt_id)."""
    with frontend.page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as answer:
        frontend.click_run()
    reply = answer.value.json()
    assert "prompt_id" in reply, reply
    return json.loads(answer.value.request.post_data)["prompt"], reply


def test_flash_nodes_are_in_the_node_library(frontend: Frontend, server):
    registered = frontend.registered_node_types()
    for node_type in FLASH_NODES:
        assert node_type in registered, f"{node_type} not registered in the frontend"
        assert registered[node_type]["category"] == CATEGORY, registered[node_type]

    # The node library sidebar, searched the way a user does, files them under "Flash Diffusion".
    frontend.toggle_sidebar("node-library")
    try:
        listed = frontend.node_library_search("Flash", CATEGORY)
    finally:
        frontend.toggle_sidebar("node-library")
    for node_type in FLASH_NODES:
        display_name = server.get(f"/object_info/{node_type}")[node_type]["display_name"]
        assert display_name in listed, (display_name, listed)


def test_missing_node_detection_works(frontend: Frontend):
    """The checks below rely on spotting unregistered types and the frontend's missing-nodes report (the
    legacy dialog, or the error panel's missing node group naming the type)."""
    workflow = json.loads((WORKFLOWS / "flash_txt2img.json").read_text())
    workflow["nodes"][0]["type"] = "FlashNoSuchNode"
    frontend.load_graph(workflow)
    assert frontend.unregistered_graph_nodes() == ["FlashNoSuchNode"]
    reported = frontend.missing_nodes_reported(wait_ms=5_000)
    assert reported == ([] if not frontend.error_system else ["FlashNoSuchNode"]), reported
    frontend.close_dialogs()
    assert frontend.missing_nodes_reported() is None


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_ui_workflow_loads_with_no_missing_nodes(frontend: Frontend, path: Path):
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4
    frontend.load_graph(workflow)
    missing = set(frontend.unregistered_graph_nodes())
    assert missing <= set(THIRD_PARTY_NODES), f"{path.name}: unknown node types {missing - set(THIRD_PARTY_NODES)}"
    # the error system (frontend 1.47+) reports the workflow's absent model files too: wait for its overlay
    reported = frontend.missing_nodes_reported(wait_ms=5_000 if missing or frontend.error_system else 0)
    assert (reported is not None) == bool(missing), (path.name, reported)
    assert not frontend.error_system or sorted(reported or []) == sorted(missing), (path.name, reported)
    frontend.close_dialogs()
    if not frontend.error_system:
        assert frontend.missing_models() is None  # off in the test settings (the test below turns it on)
    assert sorted(frontend.graph_node_types().items()) == sorted((str(n["id"]), n["type"]) for n in workflow["nodes"])

    # What Run would queue from this graph is exactly the API twin (same ids, classes, inputs), apart from
    # the nodes of packs the server lacks. Out of date? Run `python -P workflows/regenerate.py`.
    api_path = WORKFLOWS / "api" / path.name
    if api_path.is_file():
        absent = {str(node["id"]) for node in workflow["nodes"] if node["type"] in missing}
        api = _api_inputs({k: v for k, v in json.loads(api_path.read_text()).items() if k not in absent})
        queued = _api_inputs({k: v for k, v in frontend.export()["output"].items() if k not in absent})
        assert queued == api, f"{path.name} differs from {api_path.name}: run python -P workflows/regenerate.py"


def _sidecar_models() -> dict[str, list[dict]]:
    """{workflow: [{"name", "url", "directory"}]} as workflows/downloads/models.json lists them."""
    sidecar = json.loads(MODELS_SIDECAR.read_text())
    return {name: [{"name": f, "url": sidecar["files"][f]["url"], "directory": sidecar["files"][f]["directory"]}
                   for f in files] for name, files in sidecar["workflows"].items()}


# The frontend of ComfyUI 0.30 (1.47) draws an input's display_name as its widget label; the one of 0.3.75 (1.32)
# draws the input id (both measured here): the server sends the display names to both.
INPUT_LABELS_VERSION = (1, 47)


def test_distill_train_shows_the_step_words_on_its_frozen_input_ids(frontend: Frontend, server):
    """Flash Distill Train's step inputs keep their ids (saved workflows) and show docs/architecture.md's words."""
    words = {"steps": "total_steps", "nfe": "recommended_steps", "teacher_steps": "teacher_grid_steps"}
    inputs = requests.get(f"{server.url}/object_info/FlashDistillTrain", timeout=30).json()["FlashDistillTrain"]["input"]
    assert {k: inputs["required"][k][1].get("display_name") for k in words} == words
    workflow = json.loads((WORKFLOWS / "flash_distill_train.json").read_text())
    frontend.load_graph(workflow)
    node = next(n["id"] for n in workflow["nodes"] if n["type"] == "FlashDistillTrain")
    labels = frontend.widget_labels(node)
    shown = words if frontend.version >= INPUT_LABELS_VERSION else {k: k for k in words}
    assert {k: labels.get(k) for k in words} == shown, labels


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_ui_workflow_lists_its_model_downloads(path: Path):
    """The top-level `models` list is the sidecar's entry for the workflow (none if it has none); each node
    whose widgets name one of those files has that file's entry in properties.models. Out of date? Run
    `python -P workflows/regenerate.py`."""
    workflow = json.loads(path.read_text())
    models = _sidecar_models().get(path.stem, [])
    assert workflow.get("models", []) == models, path.name
    by_name = {model["name"]: model for model in models}
    for node in workflow["nodes"]:
        values = node.get("widgets_values") or []
        named = [v for v in (values.values() if isinstance(values, dict) else values) if v in by_name]
        assert node.get("properties", {}).get("models", []) == [by_name[v] for v in named], (path.name, node["id"])


def test_missing_models_dialog_offers_the_downloads(frontend: Frontend):
    """flash_sd15_txt2img names SD1.5 and flash-sd, which the test server does not have: with the frontend's
    missing-models warning on, opening it lists both files with their Hugging Face download (the legacy
    dialog; the error panel of frontend 1.47+, which lists them whatever the setting)."""
    workflow = json.loads((WORKFLOWS / "flash_sd15_txt2img.json").read_text())
    frontend.set_setting(MISSING_MODELS_SETTING, True)
    try:
        frontend.load_graph(workflow)
        rows = frontend.missing_models(wait_ms=15_000)
    finally:
        frontend.close_dialogs()
        frontend.set_setting(MISSING_MODELS_SETTING, False)
    assert rows is not None, "no Missing Models report"
    assert frontend.missing_models() is None  # closed: it does not stay over the canvas
    listed = {row["label"]: row for row in rows}
    expected = {f"{m['directory']} / {m['name']}": m for m in _sidecar_models()["flash_sd15_txt2img"]}
    assert set(listed) == set(expected), rows
    assert "loras / flash-sd.safetensors" in listed
    for label, model in expected.items():
        row = listed[label]
        # legacy: the file's URL, also the Download button's hover title; error panel: "Copy URL" gives the
        # file's Hugging Face page (/blob/ for /resolve/), the Download button is "Download <file name>"
        url = model["url"] if not frontend.error_system else model["url"].replace("/resolve/", "/blob/")
        title = model["url"] if not frontend.error_system else f"Download {model['name']}"
        assert row["url"] == url and row["error"] is None, row
        (download,) = [b for b in row["buttons"] if b["text"].startswith("Download")]
        assert download["title"] == title and not download["disabled"], row


# An <img>'s natural width once it has loaded (0 if it fails, or is still loading after 15 s: a hang guard only).
LOADED_WIDTH = """img => (img.complete && img.naturalWidth) ? img.naturalWidth : new Promise(done => {
    img.addEventListener("load", () => done(img.naturalWidth), {once: true});
    img.addEventListener("error", () => done(0), {once: true});
    setTimeout(() => done(img.naturalWidth), 15000);
})"""


def _open_at_test_size(frontend: Frontend, name: str) -> dict:
    """Open workflows/<name> in the UI (no missing nodes) with every Empty Latent Image set to the test size."""
    workflow = json.loads((WORKFLOWS / name).read_text())
    frontend.load_graph(workflow)
    assert frontend.missing_nodes_reported() is None
    for node_id in _node_ids(workflow, "EmptyLatentImage"):
        frontend.set_widget(node_id, "width", LATENT_SIZE)
        frontend.set_widget(node_id, "height", LATENT_SIZE)
    return workflow


def test_run_button_renders_an_image(frontend: Frontend, server):
    workflow = _open_at_test_size(frontend, "flash_txt2img.json")
    (save_node,) = _node_ids(workflow, "SaveImage")

    queued, reply = _click_run(frontend)
    assert {queued[str(i)]["inputs"]["width"] for i in _node_ids(workflow, "EmptyLatentImage")} == {LATENT_SIZE}

    entry = server.wait(reply["prompt_id"], timeout=150)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (image,) = server.output_images(entry)
    assert image.is_file()
    pixels = np.asarray(Image.open(image))
    assert pixels.shape == (DECODED_SIZE, DECODED_SIZE, 3) and pixels.std() > 0  # the 64 px edit took; not blank

    # The UI shows it: on the Save Image node, and as the job's thumbnail in the job list (Queue sidebar, or
    # the Job Queue overlay of frontend 1.47+).
    frontend.wait_for_node_image(save_node, image.name)
    frontend.toggle_job_queue()
    thumbnail = frontend.job_thumbnail(image.name)
    thumbnail.wait_for(state="visible", timeout=15_000)
    # the file itself, once the browser has it: the thumbnail can be visible before its bytes have loaded
    assert thumbnail.evaluate(LOADED_WIDTH) == pixels.shape[1]
    frontend.screenshot(SCREENSHOT)
    frontend.toggle_job_queue()


def test_guidance_workflow_runs_in_the_browser(frontend: Frontend, server, models_root):
    """The flash_distill_guidance template (issue 24) opened and run from the UI at test size: the queued prompt
    trains in guidance mode cfg and its two Flash Samplers (negative prompt; cfg 0 and 4) render."""
    from safetensors import safe_open

    workflow = _open_at_test_size(frontend, "flash_distill_guidance.json")
    for node_id in _node_ids(workflow, "KSampler") + _node_ids(workflow, "FlashSampler"):
        frontend.set_widget(node_id, "steps", 2)
    (train,) = _node_ids(workflow, "FlashDistillTrain")
    for name, value in {"lora_name": "ui_guidance", "steps": 3, "rank": 4, "learning_rate": 1e-4, "teacher_steps": 4,
                        "batch_size": 2, "preview_every": 3, "overwrite": True, "gradient_checkpointing": False}.items():
        frontend.set_widget(train, name, value)
    queued, reply = _click_run(frontend)
    assert queued[str(train)]["inputs"]["guidance_mode"] == "cfg"
    entry = server.wait(reply["prompt_id"], timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = _node_ids(workflow, "SaveImage")  # the preview grid and the two student samples
    assert len(saved) == 3 and all(entry["outputs"].get(str(i), {}).get("images") for i in saved), entry["outputs"]
    with safe_open(str(models_root / "loras" / "flash" / "ui_guidance.safetensors"), "pt") as handle:
        assert handle.metadata()["flash.guidance_mode"] == "cfg"


def test_workflow_templates_serve_the_ui_workflows(server):
    templates = server.get("/workflow_templates")
    # UI workflows only: workflows/api/ twins share their names, so any of them would show up as duplicates.
    assert sorted(templates[PACK]) == [path.stem for path in UI_WORKFLOWS]
    assert "flash_txt2img" in templates[PACK]
    served = server.get(f"/api/workflow_templates/{PACK}/flash_txt2img.json")
    assert served == json.loads((WORKFLOWS / "flash_txt2img.json").read_text())
