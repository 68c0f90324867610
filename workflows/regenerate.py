"""Regenerate the UI-format workflows (workflows/<name>.json) from their API-format sources (workflows/api/).

The API files are the hand-written source of truth (tests queue them through /prompt). Their UI-format twins,
the files users open in ComfyUI and that /workflow_templates serves, are produced by the real frontend, so
they are exactly what ComfyUI itself saves: a ComfyUI server with this pack starts on a free port, Chromium
opens its frontend, and for each API workflow `app.loadApiJson` builds the graph (node ids = API ids, titles
from _meta.title, widgets set, `graph.arrange()` lays the nodes out left to right by dependency depth), then
`app.graphToPrompt()` exports it (the frontend's own Save/Export path, workflow version 0.4).

Before writing, the exported graph is converted back to API format by the same frontend and compared with
the source file, so a twin never drifts from its API workflow. Files are written atomically.

The model files a workflow needs come from workflows/downloads/models.json (the one source of truth): each
twin gets them as the frontend's top-level `models` list ({name, url, directory}), and each loader node whose
widget names one of them gets that entry in its `properties.models`. Frontend 1.32 reads both on load
(app.loadGraphData: `workflow.models`, plus the `properties.models` entries a node's widget values still
select) and offers the files it cannot find in the server's model folders in its "Missing Models" dialog,
with download buttons for https://huggingface.co/ or https://civitai.com/ URLs of .safetensors/.sft files.

    python -P workflows/regenerate.py                   # every workflows/api/*.json
    python -P workflows/regenerate.py flash_txt2img     # only these
    python -P workflows/regenerate.py --check           # exit 1 if a committed twin differs from a fresh export

Run it as a script with -P, like bench/: the repository root never goes on sys.path (our nodes/ package would
shadow ComfyUI's `nodes` module); flash_core and training come from the editable install of `make setup`.

Needs `make setup` (ComfyUI in .comfyui/, the venv with playwright, the system chromium). Nodes from other
packs are not installed in the server; their public signatures are in THIRD_PARTY_NODE_DEFS below.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

from flash_core.files import write_text_atomic
from training.fixtures import tiny_checkpoint
from training.fixtures.browser import Frontend, open_frontend
from training.fixtures.comfy_server import ComfyServer

REPO_ROOT = Path(__file__).resolve().parents[1]

WORKFLOWS_DIR = REPO_ROOT / "workflows"
API_DIR = WORKFLOWS_DIR / "api"
MODELS_SIDECAR = WORKFLOWS_DIR / "downloads" / "models.json"
# What the frontend's MissingModelsWarning dialog lets users download (others show only an error there).
DOWNLOAD_URL_PREFIXES = ("https://huggingface.co/", "https://civitai.com/")
DOWNLOAD_SUFFIXES = (".safetensors", ".sft")

# Seeds stay as written in the API file (a template reproduces its documented image); users switch the
# frontend's "control after generate" widget to randomize themselves.
SEED_CONTROL = "fixed"
# The view saved with the workflow: the whole graph fits a 1600x900 window beside the sidebar and menus.
VIEW_WINDOW = (1600, 900)
VIEW_MARGIN = (80, 130)

_IPADAPTER_WEIGHT_TYPES = [
    "linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output", "weak middle",
    "strong middle", "style transfer", "composition", "strong style transfer", "style and composition",
    "style transfer precise", "composition precise",
]
# Node types of other packs used by our workflows, as their /object_info entries (ComfyUI_IPAdapter_plus by
# cubiq, GPL-3.0). Registered in the page only for this export, so their widgets serialize in the right order.
THIRD_PARTY_NODE_DEFS: dict[str, dict] = {
    "IPAdapterUnifiedLoader": {
        "name": "IPAdapterUnifiedLoader", "display_name": "IPAdapter Unified Loader", "category": "ipadapter",
        "python_module": "custom_nodes.ComfyUI_IPAdapter_plus", "description": "", "output_node": False,
        "input": {
            "required": {
                "model": ["MODEL"],
                "preset": [[
                    "LIGHT - SD1.5 only (low strength)", "STANDARD (medium strength)", "VIT-G (medium strength)",
                    "PLUS (high strength)", "PLUS FACE (portraits)", "FULL FACE - SD1.5 only (portraits stronger)",
                ]],
            },
            "optional": {"ipadapter": ["IPADAPTER"]},
        },
        "input_order": {"required": ["model", "preset"], "optional": ["ipadapter"]},
        "output": ["MODEL", "IPADAPTER"], "output_is_list": [False, False], "output_name": ["model", "ipadapter"],
    },
    "IPAdapterAdvanced": {
        "name": "IPAdapterAdvanced", "display_name": "IPAdapter Advanced", "category": "ipadapter",
        "python_module": "custom_nodes.ComfyUI_IPAdapter_plus", "description": "", "output_node": False,
        "input": {
            "required": {
                "model": ["MODEL"],
                "ipadapter": ["IPADAPTER"],
                "image": ["IMAGE"],
                "weight": ["FLOAT", {"default": 1.0, "min": -1, "max": 5, "step": 0.05}],
                "weight_type": [_IPADAPTER_WEIGHT_TYPES],
                "combine_embeds": [["concat", "add", "subtract", "average", "norm average"]],
                "start_at": ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}],
                "end_at": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}],
                "embeds_scaling": [["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"]],
            },
            "optional": {"image_negative": ["IMAGE"], "attn_mask": ["MASK"], "clip_vision": ["CLIP_VISION"]},
        },
        "input_order": {
            "required": ["model", "ipadapter", "image", "weight", "weight_type", "combine_embeds", "start_at",
                         "end_at", "embeds_scaling"],
            "optional": ["image_negative", "attn_mask", "clip_vision"],
        },
        "output": ["MODEL"], "output_is_list": [False], "output_name": ["MODEL"],
    },
}


def api_workflows(names: list[str] | None = None) -> dict[str, dict]:
    """{name: API workflow} for workflows/api/<name>.json (all of them, or the named ones)."""
    paths = [API_DIR / f"{name}.json" for name in names] if names else sorted(API_DIR.glob("*.json"))
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"no such API workflow: {', '.join(missing)} (names are file stems in {API_DIR})")
    return {path.stem: json.loads(path.read_text()) for path in paths}


def fixture_models(root: Path) -> Path:
    """A model folder with the cached tiny checkpoint and LoRA, so the loader combos are not empty."""
    for folder, build in (("checkpoints", tiny_checkpoint.build), ("loras", tiny_checkpoint.build_lora)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        built = Path(build())
        (root / folder / built.name).symlink_to(built)
    return root


def register_third_party_nodes(frontend: Frontend, needed: set[str]) -> None:
    """Teach the page the node types of other packs that the server does not have."""
    registered = frontend.registered_node_types()
    for node_type in sorted(needed - set(registered)):
        if node_type not in THIRD_PARTY_NODE_DEFS:
            raise RuntimeError(
                f"node type {node_type!r} is neither registered by the server nor in THIRD_PARTY_NODE_DEFS of "
                f"{__file__}. If it is one of ours, the pack failed to load (see the ComfyUI log); if it comes "
                "from another pack, add its /object_info entry there."
            )
        frontend.page.evaluate("async ([type, def]) => { await window.app.registerNodeDef(type, def); }",
                               [node_type, THIRD_PARTY_NODE_DEFS[node_type]])


def fit_view(frontend: Frontend) -> None:
    """Scale and pan the canvas so the whole graph is in view; the export stores it as extra.ds."""
    frontend.page.evaluate(
        """([[width, height], [left, top]]) => {
            const nodes = window.app.graph.nodes, title = LiteGraph.NODE_TITLE_HEIGHT;
            const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - title));
            const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
            const scale = Math.min(1, (width - left - 40) / (x1 - x0), (height - top - 40) / (y1 - y0));
            window.app.canvas.ds.scale = Math.round(scale * 100) / 100;
            window.app.canvas.ds.offset = [Math.round(left / window.app.canvas.ds.scale - x0),
                                           Math.round(top / window.app.canvas.ds.scale - y0)];
            window.app.graph.setDirtyCanvas(true, true);
        }""",
        [list(VIEW_WINDOW), list(VIEW_MARGIN)],
    )


def export_ui_workflow(frontend: Frontend, name: str, api: dict) -> dict:
    """Build the graph from an API workflow in the frontend and return what the frontend saves for it."""
    frontend.load_api(api, name)
    built = frontend.graph_node_types()
    expected = {node_id: node["class_type"] for node_id, node in api.items()}
    if built != expected:
        raise RuntimeError(f"{name}: the frontend built {built}, expected {expected} (missing node types?)")
    frontend.page.evaluate(
        """(mode) => { for (const node of window.app.graph.nodes)
                           for (const widget of node.widgets ?? [])
                               if (widget.name === "control_after_generate") widget.value = mode; }""",
        SEED_CONTROL,
    )
    fit_view(frontend)
    exported = frontend.export()
    roundtrip = api_from_ui(exported["output"])
    source = {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]} for node_id, node in api.items()}
    if roundtrip != source:
        raise RuntimeError(f"{name}: the exported UI workflow does not convert back to {API_DIR / name}.json:\n"
                           f"{json.dumps(roundtrip, indent=1)}")
    return exported["workflow"]


def api_from_ui(prompt: dict) -> dict:
    """The frontend's API conversion, without _meta (titles live in the UI graph)."""
    return {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]} for node_id, node in prompt.items()}


def model_downloads(sidecar_path: Path = MODELS_SIDECAR) -> dict[str, list[dict]]:
    """{workflow name: its `models` list} from the sidecar: {"name", "url", "directory"} per file, in the
    sidecar's order. Raises if an entry is one the frontend would refuse to download."""
    sidecar = json.loads(sidecar_path.read_text())
    files = sidecar["files"]
    downloads = {}
    for workflow, names in sidecar["workflows"].items():
        unknown = [name for name in names if name not in files]
        if unknown:
            raise ValueError(f"{sidecar_path}: {workflow} lists {unknown}, which have no entry in `files`")
        downloads[workflow] = [{"name": name, "url": files[name]["url"], "directory": files[name]["directory"]}
                               for name in names]
    for name, entry in files.items():
        if not (entry["url"].startswith(DOWNLOAD_URL_PREFIXES) and name.endswith(DOWNLOAD_SUFFIXES)):
            raise ValueError(f"{sidecar_path}: {name} ({entry['url']}): the frontend downloads only "
                             f"{'/'.join(DOWNLOAD_SUFFIXES)} files from {', '.join(DOWNLOAD_URL_PREFIXES)}")
    return downloads


def with_models(workflow: dict, models: list[dict]) -> dict:
    """The UI workflow with its model downloads: the top-level `models` list, and on each node whose widget
    values name a file, that file's entry in `properties.models` (what the frontend filters by the current
    widget values, so a node switched to another file no longer asks for this one)."""
    workflow = copy.deepcopy(workflow)
    for node in workflow["nodes"]:
        values = node.get("widgets_values") or []
        values = values.values() if isinstance(values, dict) else values
        named = [dict(model) for model in models if model["name"] in values]
        if named:
            node.setdefault("properties", {})["models"] = named
    if models:
        workflow["models"] = [dict(model) for model in models]
    return workflow


def write_json_atomically(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def regenerate(names: list[str] | None = None, check: bool = False) -> list[str]:
    """Write workflows/<name>.json for each API workflow; with check, only compare. Returns the changed names."""
    workflows = api_workflows(names)
    downloads = model_downloads()
    changed = []
    with tempfile.TemporaryDirectory(prefix="flash-regenerate-") as tmp:
        state = Path(tmp)
        server = ComfyServer(models_root=fixture_models(state / "models"), base_dir=state / "comfy",
                             log_path=state / "comfyui.log")
        with server, open_frontend(server.url) as frontend:
            register_third_party_nodes(frontend, {node["class_type"] for api in workflows.values() for node in api.values()})
            for name, api in workflows.items():
                ui = with_models(export_ui_workflow(frontend, name, api), downloads.get(name, []))
                target = WORKFLOWS_DIR / f"{name}.json"
                current = json.loads(target.read_text()) if target.is_file() else None
                if current == ui:
                    status = "up to date"
                else:
                    changed.append(name)
                    status = "out of date" if check else "wrote"
                    if not check:
                        write_json_atomically(target, ui)
                print(f"{status}: {target.relative_to(REPO_ROOT)}")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="workflow names (stems of workflows/api/*.json); default all")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if any twin is out of date")
    args = parser.parse_args(argv)
    changed = regenerate(args.names or None, check=args.check)
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
