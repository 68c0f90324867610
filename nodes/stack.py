"""What a MODEL is made of, read from the workflow that built it: the base checkpoint and the LoRAs with strengths.

A ComfyUI MODEL does not know its file names, but the prompt that made it does. `describe_stack` walks the
API-format prompt upstream from a node's MODEL input through model-patching nodes (LoRA loaders, ModelSampling
patches ...) to the loader, and returns a plain dict that FlashDistillTrain stores in the student's metadata
("what this student was trained for") and that FlashSampler compares with the stack it samples
("what it is applied on"):

    {"base": {"name": "v1-5-pruned-emaonly.safetensors", "sha256": "...", "node": "CheckpointLoaderSimple"},
     "loras": [{"name": "style.safetensors", "sha256": "...", "strength": 0.8, "node": "LoraLoader"}]}

Files are identified by the SHA-256 of their content (cached per path, size and modification time), so a
renamed file still matches and a retrained one with the same name does not.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

LOADERS = {  # node type -> (input naming the file, model folder)
    "CheckpointLoaderSimple": ("ckpt_name", "checkpoints"),
    "CheckpointLoader": ("ckpt_name", "checkpoints"),
    "UNETLoader": ("unet_name", "diffusion_models"),
    "FlashDiffusersLoader": ("pipeline", "diffusers"),
}
LORA_LOADERS = {  # node type -> (input naming the LoRA file, input holding the model strength)
    "LoraLoader": ("lora_name", "strength_model"),
    "LoraLoaderModelOnly": ("lora_name", "strength_model"),
    "FlashLoRALoader": ("lora_name", "strength_model"),
}
STRENGTH_TOLERANCE = 1e-3
_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str | None:
    """SHA-256 of a file (a folder: of its weight files in order), cached per (path, size, mtime)."""
    if os.path.isdir(path):
        digest = hashlib.sha256()
        for root, _, names in sorted(os.walk(path)):
            for name in sorted(names):
                if name.endswith((".safetensors", ".json")):
                    digest.update((file_sha256(os.path.join(root, name)) or "").encode())
        return digest.hexdigest()
    try:
        stat = os.stat(path)
    except OSError:
        return None
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def _full_path(folder: str, name: Any) -> str | None:
    """The file (or, for diffusers pipelines, the folder) `name` in ComfyUI's model folder `folder`, else None."""
    try:
        import folder_paths

        roots = folder_paths.get_folder_paths(folder)
    except (ImportError, KeyError):  # not inside ComfyUI, or an unknown folder
        return None
    relative = os.path.relpath(os.path.join("/", str(name)), "/")  # no way out of the model folder
    for root in roots:
        candidate = os.path.join(root, relative)
        if os.path.isfile(candidate) or os.path.isdir(candidate):
            return candidate
    return None


def _link(value: Any) -> str | None:
    """The source node id of a linked input ([node_id, output_index]), else None."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], int):
        return str(value[0])
    return None


def describe_stack(prompt: dict | None, node_id: Any, input_name: str = "model", hashes: bool = True) -> dict:
    """The base model and LoRA stack feeding `input_name` of node `node_id` in an API-format prompt.

    LoRAs are listed base first. Nodes that patch the model in other ways are listed under "patches" by
    type; a chain that ends in an unknown node gives base {"node": <its type>}.
    """
    stack: dict[str, Any] = {"base": None, "loras": [], "patches": []}
    if not prompt or node_id is None:
        return stack
    source = _link(prompt.get(str(node_id), {}).get("inputs", {}).get(input_name))
    seen: set[str] = set()
    while source is not None and source not in seen and source in prompt:
        seen.add(source)
        node = prompt[source]
        kind, inputs = node.get("class_type", "?"), node.get("inputs", {})
        if kind in LOADERS:
            name_input, folder = LOADERS[kind]
            name = inputs.get(name_input)
            base = {"name": name, "node": kind}
            if hashes:
                path = _full_path(folder, name)
                base["sha256"] = file_sha256(path) if path else None
            stack["base"] = base
            break
        if kind in LORA_LOADERS:
            name_input, strength_input = LORA_LOADERS[kind]
            strength = inputs.get(strength_input, 1.0)
            lora = {"name": inputs.get(name_input), "strength": float(strength) if isinstance(strength, (int, float)) else None,
                    "node": kind}
            if hashes:
                path = _full_path("loras", lora["name"])
                lora["sha256"] = file_sha256(path) if path else None
            stack["loras"].insert(0, lora)
        elif "model" in inputs:
            stack["patches"].insert(0, kind)
        else:
            stack["base"] = {"name": None, "node": kind}
            break
        source = _link(inputs.get("model"))
    return stack


def _same_file(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None:
        return a is b
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    return a.get("name") == b.get("name")


def stack_differences(trained_for: dict, applied_on: dict, ignore_loras: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences between two stacks ([] when they match); LoRAs named in `ignore_loras`
    (the Flash LoRA itself) are left out of `applied_on`."""
    differences = []
    if not _same_file(trained_for.get("base"), applied_on.get("base")):
        differences.append(f"base {describe_file(trained_for.get('base'))} vs {describe_file(applied_on.get('base'))}")
    wanted = list(trained_for.get("loras", []))
    present = [lora for lora in applied_on.get("loras", []) if lora.get("name") not in ignore_loras]
    for lora in wanted:
        match = next((p for p in present if _same_file(p, lora)), None)
        if match is None:
            differences.append(f"missing LoRA {describe_file(lora)} at {lora.get('strength')}")
            continue
        present.remove(match)
        if lora.get("strength") is not None and match.get("strength") is not None and \
                abs(lora["strength"] - match["strength"]) > STRENGTH_TOLERANCE:
            differences.append(f"LoRA {lora.get('name')} at {match['strength']} instead of {lora['strength']}")
    differences += [f"extra LoRA {describe_file(p)} at {p.get('strength')}" for p in present]
    return differences


def describe_file(entry: dict | None) -> str:
    if not entry:
        return "(unknown)"
    name = entry.get("name") or entry.get("node") or "(unknown)"
    return f"{name} ({entry['sha256'][:10]})" if entry.get("sha256") else str(name)


def describe(stack: dict) -> str:
    """One line: 'base + lora@strength + ...'."""
    parts = [describe_file(stack.get("base"))]
    parts += [f"{lora.get('name')}@{lora.get('strength')}" for lora in stack.get("loras", [])]
    return " + ".join(parts)


# --------------------------------------------------------------------------------------------------
# The mismatch warning: a Flash LoRA sampled on another stack than the one it was distilled for
# --------------------------------------------------------------------------------------------------

MISMATCH_EVENT = "flash.stack_mismatch"  # the websocket event web/flash_stack.js shows as a warning toast


def stack_mismatch(settings: dict | None, prompt: dict | None, node_id: Any, input_name: str = "model") -> dict | None:
    """{"lora", "trained_for", "applied_on", "differences"} when the stack feeding `input_name` of `node_id`
    is not the one the Flash LoRA was trained for; None when it is, or when either is unknown."""
    trained_for = (settings or {}).get("trained_for")
    if not trained_for or not trained_for.get("base") or not prompt or node_id is None:
        return None
    applied_on = describe_stack(prompt, node_id, input_name)
    if applied_on.get("base") is None:
        return None
    lora = settings.get("lora_name")
    differences = stack_differences(trained_for, applied_on, ignore_loras=(lora,) if lora else ())
    if not differences:
        return None
    shown = {"base": applied_on["base"], "loras": [x for x in applied_on["loras"] if x.get("name") != lora]}
    return {"lora": lora, "trained_for": describe(trained_for), "applied_on": describe(shown), "differences": differences}


def mismatch_message(mismatch: dict) -> str:
    return (f"Flash LoRA '{mismatch['lora'] or '(trained in this graph)'}' was distilled for "
            f"{mismatch['trained_for']} but is applied on {mismatch['applied_on']} "
            f"({'; '.join(mismatch['differences'])}). It will still sample, but expect weaker style or artefacts: "
            "distil a student of this stack with Flash Distill Train.")


def warn_mismatch(mismatch: dict, node_id: Any, node: str, log) -> None:
    """Log the mismatch and show it in the UI (a warning toast through web/flash_stack.js; not an error)."""
    message = mismatch_message(mismatch)
    log.warning("%s: %s", node, message)
    try:
        from server import PromptServer

        server = PromptServer.instance
    except (ImportError, AttributeError):  # not inside the ComfyUI server (in-process use)
        return
    server.send_sync(MISMATCH_EVENT, {"node": str(node_id), "node_type": node, "message": message, **mismatch},
                     getattr(server, "client_id", None))
