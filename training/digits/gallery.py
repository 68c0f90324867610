"""Render the gallery of docs/usage.md: one image per shipped workflow, made by real ComfyUI on the digits model.

The shipped graphs (workflows/api/flash_*.json) name SD1.5 / SDXL files that this project cannot download.
This script rewrites each graph onto the models `make demo` builds and runs it on a real ComfyUI server
(training/fixtures/comfy_server.py), changing only what the model needs:

  * Load Checkpoint          -> Flash Diffusers Pipeline `flash_digits_teacher` (same MODEL/CLIP/VAE slots);
  * Flash LoRA Loader        -> the distilled demo student `flash/flash_digits_demo.safetensors`;
  * stock Load LoRA (style)  -> a stand-in style LoRA of the digits UNet's shapes in kohya format (what
                                style LoRAs ship as): seeded random directions, 3x the size of the Flash
                                LoRA's update (see build_style_lora; no style LoRA exists for this model,
                                and training one takes far longer than this script may);
  * Empty Latent Image       -> 64 px (an 8x8 latent; the digits VAE decodes it to 16x16); the hi-res fix
                                keeps its Upscale Latent By 1.5 (24x24 output);
  * prompts                  -> "a handwritten digit <n>";
  * Load Image               -> a held-out digit written to the server's input folder (for inpainting an
                                RGBA PNG whose transparent lower half is the mask); pixel-sized settings
                                (grow_mask_by) shrink with the image, to 1 px;
  * Save Image               -> output/gallery/<workflow>.

Sampler settings (steps, cfg, denoise, seeds) stay as shipped. Each result is saved as a small strip of
labelled panels (inputs | outputs, upscaled with NEAREST so the 16 px images are visible) in
docs/gallery/<workflow>.png, and a markdown snippet (image + caption per workflow) is printed or written
with --snippet.

ControlNet needs an SD1.5 ControlNet of the digits UNet's shape, which does not exist: its graph runs on the
tiny random-weight fixtures of the test suite (training/fixtures/tiny_checkpoint.py, training/fixtures/tiny_controlnet.py), so
its image shows that the graph runs and that the hint changes the output, not image quality. SDXL (no SDXL
model here), IP-Adapter (third-party node pack), the training graphs (`make demo` runs the digits one) and
the test-fixture copy of the txt2img graph are skipped, each with its reason in the snippet.

Needs `make demo` first (the teacher and the student LoRA). Its own state lives in <cache>/gallery
(models: links to the demo's files and the tiny fixtures, plus the stand-in style LoRA; comfyui: the
server's base directory; comfyui.log). Nothing under <cache>/demo is written. About half a minute on a
2-core CPU; the server runs with OMP_NUM_THREADS=1 unless it is set (these models are tiny, and OpenMP
threads competing with another busy process slow every step down many times over).

    python -P -m training.digits.gallery [--only flash_img2img ...] [--out DIR] [--snippet PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flash_core.files import save_image_atomic, write_atomic, write_text_atomic
from training.fixtures.comfy_env import REPO_ROOT, cache_dir
from training.fixtures.comfy_server import ComfyServer

API_DIR = REPO_ROOT / "workflows" / "api"
GALLERY_DIR = REPO_ROOT / "docs" / "gallery"
TEACHER_PIPELINE = "flash_digits_teacher"
FLASH_LORA = "flash/flash_digits_demo.safetensors"
STYLE_LORA = "flash_digits_style_standin.safetensors"  # models/loras/<name>, kohya keys (build_style_lora)
STYLE_RANK = 4
STYLE_RELATIVE = 3.0  # its update's size, relative to the Flash LoRA's update of the same weight
INPUT_IMAGE = "flash_gallery_digit.png"
INPAINT_IMAGE = "flash_gallery_digit_inpaint.png"
CONTROL_IMAGE = "flash_gallery_digit_64.png"
LATENT_PX = 64  # Empty Latent Image side: 8x8 latent, 16x16 digits image
DIGIT_PX = 16  # the digits model's image side
SCALE = 6  # NEAREST upscale of the panels
SHIPPED_PIXELS = 512  # the SD1.5 graphs' image side, for pixel-sized settings

INPUT_DIGIT = 3  # the held-out digit the image-to-image graphs start from
INPAINT_DIGIT = 8  # the held-out digit whose lower half is repainted
INPAINT_PROMPTS = (8, 9, 2, 3)

# Snippet order: as docs/usage.md describes the graphs, then the demo's and the training graphs.
ORDER = [
    "flash_sd15_txt2img", "flash_sdxl_txt2img", "flash_txt2img", "flash_sd15_lora_stack", "flash_img2img",
    "flash_hires_fix", "flash_inpaint_noise_mask", "flash_inpaint_vae_encode", "flash_inpaint_model_conditioning",
    "flash_controlnet", "flash_ip_adapter", "flash_demo_compare", "flash_demo_distill", "flash_distill_train", "flash_distill_my_stack",
]

SKIPPED = {
    "flash_sdxl_txt2img": "not rendered: an SDXL graph; there is no SDXL-family model here (the digits model and the "
                          "tiny fixture are SD1.5-family), and tests/e2e/test_graphs.py only validates it.",
    "flash_ip_adapter": "not rendered: needs the third-party ComfyUI_IPAdapter_plus node pack and an SD1.5 IP-Adapter "
                        "with its CLIP vision encoder, none of which exist for the digits model.",
    "flash_distill_train": "not rendered: a training graph (2,000 distillation steps on an SD1.5 teacher); its digits "
                           "twin flash_demo_distill is what `make demo` runs, see flash_demo_compare for its student.",
    "flash_demo_distill": "not rendered here: `make demo` runs it (FlashDistillTrain, minutes on a CPU); the student "
                          "LoRA it trained makes every digits image in this gallery (see flash_demo_compare).",
    "flash_distill_my_stack": "not rendered: a training graph (the student of a checkpoint + style LoRA stack); "
                              "`make bench-stack` measures it on the digits model, see Benchmarks: Distil your own stack.",
    "flash_txt2img": "not rendered: the same graph as flash_sd15_txt2img with the test fixtures' file names; its "
                     "image would be identical to that one.",
}


@dataclass
class Panel:
    label: str
    image: object  # PIL.Image.Image
    scale: int = SCALE


@dataclass
class Rendered:
    rows: list[list[Panel]]
    caption: str
    seconds: float = 0.0
    runs: int = 0


# ---------------------------------------------------------------------------------------------------------
# Files: models, input images, the stand-in style LoRA
# ---------------------------------------------------------------------------------------------------------


def gallery_dir() -> Path:
    return cache_dir() / "gallery"


def demo_models() -> Path:
    return cache_dir() / "demo" / "models"


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.resolve() == target.resolve():
            return
        link.unlink()
    link.symlink_to(target.resolve(), target_is_directory=target.is_dir())


def prepare_models(models_root: Path, with_fixtures: bool) -> None:
    """models_root: links to the demo's teacher and student LoRA (and, for ControlNet, the tiny fixtures)."""
    teacher = demo_models() / "diffusers" / TEACHER_PIPELINE
    student = demo_models() / "loras" / FLASH_LORA
    missing = [str(p) for p in (teacher, student) if not p.exists()]
    if missing:
        raise SystemExit(f"run `make demo` first: missing {', '.join(missing)}")
    _link(models_root / "diffusers" / TEACHER_PIPELINE, teacher)
    _link(models_root / "loras" / FLASH_LORA, student)
    if with_fixtures:
        from training.fixtures import tiny_checkpoint, tiny_controlnet

        _link(models_root / "checkpoints" / tiny_checkpoint.CHECKPOINT_NAME, tiny_checkpoint.build())
        _link(models_root / "loras" / tiny_checkpoint.LORA_NAME, tiny_checkpoint.build_lora())
        _link(models_root / "controlnet" / tiny_controlnet.CONTROLNET_NAME, tiny_controlnet.build())


def held_out_digit(digit: int) -> np.ndarray:
    """The first held-out (never trained on) image of `digit`, 16x16x3 uint8."""
    from training.digits.data import load_splits, to_uint8

    _, held = load_splits()
    index = int((held.digits == digit).nonzero()[0, 0])
    return to_uint8(held.images[index:index + 1])[0]


def write_inputs(input_dir: Path) -> None:
    """The Load Image files: a digit, the same digit binarised and 4x larger (ControlNet on the 64 px fixture),
    a digit with a transparent lower half (inpainting)."""
    from PIL import Image

    input_dir.mkdir(parents=True, exist_ok=True)
    digit = held_out_digit(INPUT_DIGIT)
    save_image_atomic(Image.fromarray(digit), input_dir / INPUT_IMAGE)
    ink = np.where(digit >= 128, 255, 0).astype(np.uint8)  # crisp strokes: edges for Canny at 0.4 / 0.8
    save_image_atomic(Image.fromarray(ink).resize((64, 64), Image.NEAREST), input_dir / CONTROL_IMAGE)
    rgb = held_out_digit(INPAINT_DIGIT)
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[rgb.shape[0] // 2:, :] = 0  # LoadImage: MASK = 1 - alpha, the area to repaint
    save_image_atomic(Image.fromarray(np.dstack([rgb, alpha])), input_dir / INPAINT_IMAGE)


def build_style_lora(path: Path, flash_lora: Path, rank: int = STYLE_RANK, relative: float = STYLE_RELATIVE,
                     seed: int = 0) -> Path:
    """A stand-in style LoRA in kohya format for the digits UNet: seeded random rank-`rank` updates of the same
    attention projections the Flash LoRA patches, each scaled to `relative` times the Flash LoRA's own update
    there (norm of up @ down * alpha / rank). No style LoRA exists for the digits model, and training one
    (backpropagation through the UNet) takes minutes on this CPU, so this one only has the shapes, the key
    format and an effect of the Flash LoRA's order of size: it shows the stock Load LoRA stacking a second
    LoRA on the student, not a style."""
    import torch
    from safetensors.torch import load_file, save_file

    flash = load_file(str(flash_lora))
    generator = torch.Generator().manual_seed(seed)
    style = {}
    for key in sorted(k for k in flash if k.endswith(".lora_down.weight")):
        module = key.removesuffix(".lora_down.weight")
        down_f, up_f = flash[key].float(), flash[f"{module}.lora_up.weight"].float()
        alpha_f = float(flash.get(f"{module}.alpha", torch.tensor(float(down_f.shape[0]))))
        target = (up_f @ down_f).norm() * alpha_f / down_f.shape[0] * relative
        down = torch.randn(rank, down_f.shape[1], generator=generator) / down_f.shape[1] ** 0.5
        up = torch.randn(up_f.shape[0], rank, generator=generator)
        up *= target / (up @ down).norm()  # alpha = rank: the update is exactly up @ down
        style[key] = down.half().contiguous()
        style[f"{module}.lora_up.weight"] = up.half().contiguous()
        style[f"{module}.alpha"] = torch.tensor(float(rank))
    metadata = {"flash_gallery": "stand-in style LoRA, random directions", "seed": str(seed)}
    write_atomic(path, lambda tmp: save_file(style, tmp, metadata=metadata))
    return path


# ---------------------------------------------------------------------------------------------------------
# Rewriting the shipped graphs
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# The workflows
# ---------------------------------------------------------------------------------------------------------


def input_panel(path: Path, label: str = "input", mask_tint: bool = False, scale: int = SCALE) -> Panel:
    """A Load Image file as a panel; with mask_tint the transparent (repainted) area is tinted red."""
    from PIL import Image

    image = Image.open(path)
    if mask_tint:
        pixels = np.asarray(image.convert("RGBA")).astype(np.float32)
        hole = pixels[..., 3:] < 128
        rgb = np.where(hole, 0.5 * pixels[..., :3] + 0.5 * np.array([200.0, 30.0, 30.0]), pixels[..., :3])
        image = Image.fromarray(rgb.round().astype(np.uint8))
    return Panel(label, image.convert("RGB"), scale)


def render_txt2img(runner: Runner, name: str, inputs: Path) -> Rendered:
    shipped = load(name)
    row = [Panel(f'"{d}"', runner.one(onto_digits(shipped, name, d))) for d in range(10)]
    return Rendered([row], "Flash digits student (teacher + demo LoRA), 4 steps, cfg 1.0, seed 0: one run per prompt "
                           "\"a handwritten digit zero\" ... \"nine\" (16x16 px).")


def render_lora_stack(runner: Runner, name: str, inputs: Path) -> Rendered:
    shipped = load(name)
    (style,) = nodes_of(shipped, "LoraLoader")
    strength = shipped[style]["inputs"]["strength_model"]
    rows = []
    for label, value in (("Flash", 0.0), (f"+style {strength:g}", strength)):
        row = []
        for d in (0, 2, 4, 5, 7):
            workflow = onto_digits(shipped, name, d)
            workflow[style]["inputs"].update(strength_model=value, strength_clip=value)
            row.append(Panel(f"{d}: {label}", runner.one(workflow)))
        rows.append(row)
    return Rendered(rows, f"Top: the Flash digits student with the style LoRA at 0; bottom: the same seeds with the "
                          f"stock Load LoRA stacking a stand-in style LoRA at {strength:g} (kohya keys, the digits "
                          f"UNet's shapes, seeded random directions {STYLE_RELATIVE:g}x the size of the Flash LoRA's "
                          "own update; no real style LoRA exists for this model), 4 steps, cfg 1.0. It shows that both "
                          "LoRAs apply, not a style.")


def render_img2img(runner: Runner, name: str, inputs: Path) -> Rendered:
    shipped = load(name)
    sampler = shipped[nodes_of(shipped, "FlashSampler")[0]]["inputs"]
    row = [input_panel(inputs / INPUT_IMAGE, f"input ({INPUT_DIGIT})")]
    for d in (INPUT_DIGIT, 8, 9):
        row.append(Panel(f'"{d}"', runner.one(onto_digits(shipped, name, d))))
    return Rendered([row], f"img2img on the digits student: a held-out handwritten {INPUT_DIGIT} (left) re-sampled "
                           f"with {sampler['steps']} Flash steps at denoise {sampler['denoise']:g} for the prompts "
                           f"\"{INPUT_DIGIT}\", \"8\" and \"9\": the pose and strokes of the input stay, the prompt "
                           "reshapes the digit.")


def render_hires_fix(runner: Runner, name: str, inputs: Path) -> Rendered:
    shipped = load(name)
    first, second = nodes_of(shipped, "FlashSampler")
    (upscale,) = nodes_of(shipped, "LatentUpscaleBy")
    (decode,) = nodes_of(shipped, "VAEDecode")
    factor = shipped[upscale]["inputs"]["scale_by"]
    row = []
    for d in (2, 5, 6):
        workflow = onto_digits(shipped, name, d)
        vae = workflow[decode]["inputs"]["vae"]
        workflow["901"] = {"class_type": "VAEDecode", "inputs": {"samples": [first, 0], "vae": vae}}
        pass_one = save_node(workflow, ["901", 0], f"gallery/{name}_first_pass")
        images = runner.run(workflow)
        final = images[nodes_of(shipped, "SaveImage")[0]][0]
        row += [Panel(f"{d}: pass 1", images[pass_one][0]), Panel(f"{d}: x{factor:g} pass 2", final)]
    s2 = shipped[second]["inputs"]
    return Rendered([row], f"Hi-res fix on the digits student: first pass at 16x16 (4 steps), Upscale Latent By "
                           f"{factor:g} (nearest-exact), second Flash pass ({s2['steps']} steps, denoise "
                           f"{s2['denoise']:g}, seed 1) decoded at 24x24; same zoom for both. The digits model only "
                           "ever saw 16x16 images, so the second pass adds stray strokes: the graph works, the model "
                           "does not generalise to the larger size.")


def render_inpaint(runner: Runner, name: str, inputs: Path) -> Rendered:
    shipped = load(name)
    row = [input_panel(inputs / INPAINT_IMAGE, f"input ({INPAINT_DIGIT}), mask", mask_tint=True)]
    for d in INPAINT_PROMPTS:
        row.append(Panel(f'"{d}"', runner.one(onto_digits(shipped, name, d))))
    how = {
        "flash_inpaint_noise_mask": "VAE Encode + Set Latent Noise Mask",
        "flash_inpaint_vae_encode": "VAE Encode (for Inpainting), grow_mask_by 1 px (6 px at 512)",
        "flash_inpaint_model_conditioning": "InpaintModelConditioning (noise_mask on)",
    }[name]
    note = {
        "flash_inpaint_noise_mask": " Outside the mask the latent is kept; only the VAE round trip touches those "
                                    "pixels.",
        "flash_inpaint_vae_encode": " The masked pixels are greyed out before encoding (denoise 1.0).",
        "flash_inpaint_model_conditioning": " The digits UNet is a regular (4-channel) one, which ignores the "
                                            "masked-image conditioning: the result is the noise-mask graph's, pixel "
                                            "for pixel.",
    }[name]
    return Rendered([row], f"Inpainting with {how}, 4 Flash steps on the digits student: the lower half (red) of a "
                           f"held-out {INPAINT_DIGIT} is repainted for the prompts "
                           + ", ".join(f'\"{d}\"' for d in INPAINT_PROMPTS) + "." + note)


def render_controlnet(runner: Runner, name: str, inputs: Path) -> Rendered:
    from PIL import Image

    shipped = load(name)
    (canny,) = nodes_of(shipped, "Canny")
    (apply,) = nodes_of(shipped, "ControlNetApplyAdvanced")
    (save,) = nodes_of(shipped, "SaveImage")
    row = [input_panel(inputs / CONTROL_IMAGE, "input", scale=2)]
    outputs = {}
    for strength in (0.0, 1.0):
        workflow = onto_fixtures(shipped, name)
        workflow[apply]["inputs"]["strength"] = strength
        hint = save_node(workflow, [canny, 0], f"gallery/{name}_canny")
        images = runner.run(workflow)
        if not strength:
            row.append(Panel("Canny hint", images[hint][0], 2))
        outputs[strength] = images[save][0]
    row += [Panel(f"strength {s:g}", image, 4) for s, image in outputs.items()]
    diff = np.abs(np.asarray(outputs[1.0], np.int16) - np.asarray(outputs[0.0], np.int16)).max(axis=-1)
    row.append(Panel("|difference| x4", Image.fromarray(np.clip(diff * 4, 0, 255).astype(np.uint8)).convert("RGB"), 4))
    return Rendered([row], "ControlNet graph on the tiny random-weight SD1.5-family test fixtures (checkpoint, Flash "
                           "LoRA, ControlNet; no ControlNet exists for the digits UNet): the input, its Canny hint, "
                           "the output with the ControlNet at strength 0 and at 1 (end_percent 0.6), and their "
                           "difference. It shows the graph runs and the hint changes the sample, not image quality.")


def render_demo_compare(runner: Runner, name: str, inputs: Path) -> Rendered:
    from training.digits.demo import PATHS

    shipped = load(name)
    labels = {"teacher_25": "teacher 25", "teacher_2": "teacher 2", "student_1": "Flash 1",
              "student_2": "Flash 2", "student_4": "Flash 4"}
    (text,) = [k for k, v in shipped.items() if v["class_type"] == "CLIPTextEncode" and v["inputs"]["text"]]
    (latent,) = nodes_of(shipped, "EmptyLatentImage")
    rows = []
    for d in (2, 7):
        workflow = copy.deepcopy(shipped)
        workflow[text]["inputs"]["text"] = prompt(d)
        workflow[latent]["inputs"]["batch_size"] = 1
        for path in PATHS:
            workflow[path.save_node]["inputs"]["filename_prefix"] = f"gallery/{name}_{path.key}"
        images = runner.run(workflow)
        rows.append([Panel(f"{d}: {labels[p.key]}", images[p.save_node][0]) for p in PATHS])
    return Rendered(rows, "The demo's comparison graph, unchanged but for the prompt and batch size: digits teacher "
                          "(KSampler, 25 and 2 steps, CFG 3) and its Flash student (1, 2, 4 steps, cfg 1) on the same "
                          "noise, for \"2\" and \"7\".")


RENDERERS = {
    "flash_sd15_txt2img": render_txt2img,
    "flash_sd15_lora_stack": render_lora_stack,
    "flash_img2img": render_img2img,
    "flash_hires_fix": render_hires_fix,
    "flash_inpaint_noise_mask": render_inpaint,
    "flash_inpaint_vae_encode": render_inpaint,
    "flash_inpaint_model_conditioning": render_inpaint,
    "flash_controlnet": render_controlnet,
    "flash_demo_compare": render_demo_compare,
}


# ---------------------------------------------------------------------------------------------------------
# Composing and the snippet
# ---------------------------------------------------------------------------------------------------------

BACKGROUND = (24, 24, 24)
TEXT = (230, 230, 230)
GAP = 4
LABEL_HEIGHT = 16


def compose(rows: list[list[Panel]]):
    """Rows of labelled panels (each upscaled with NEAREST by its scale) on a dark canvas."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(11)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    scaled = [[(p.label, p.image.resize((p.image.width * p.scale, p.image.height * p.scale), Image.NEAREST))
               for p in row] for row in rows]
    widths = [sum(max(im.width, int(font.getlength(label)) + 2) for label, im in row) + GAP * (len(row) + 1)
              for row in scaled]
    heights = [LABEL_HEIGHT + max(im.height for _, im in row) + GAP for row in scaled]
    canvas = Image.new("RGB", (max(widths), sum(heights) + GAP), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = GAP
    for row, height in zip(scaled, heights):
        x = GAP
        for label, im in row:
            cell = max(im.width, int(font.getlength(label)) + 2)
            draw.text((x, y + 1), label, fill=TEXT, font=font)
            canvas.paste(im, (x + (cell - im.width) // 2, y + LABEL_HEIGHT))
            x += cell + GAP
        y += height
    return canvas


def snippet_lines(done: dict[str, Rendered], order: list[str]) -> list[str]:
    lines = []
    for name in order:
        if name in done:
            lines += [f"![{name}](gallery/{name}.png)", f"*{name}*: {done[name].caption}", ""]
        elif name in SKIPPED:
            lines += [f"*{name}*: {SKIPPED[name]}", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", metavar="WORKFLOW", help="render only these workflows")
    parser.add_argument("--out", type=Path, default=GALLERY_DIR, help="where the PNGs go (default docs/gallery)")
    parser.add_argument("--snippet", type=Path, help="write the markdown snippet here (default: print it)")
    parser.add_argument("--port", type=int)
    args = parser.parse_args(argv)

    started = time.monotonic()
    # One thread per process: the models are tiny, and on a shared 2-core machine OpenMP threads spinning
    # against another process's make each step up to 100x slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    shipped = sorted(p.stem for p in API_DIR.glob("flash_*.json"))
    unknown = set(shipped) - set(RENDERERS) - set(SKIPPED)
    if unknown:
        raise SystemExit(f"workflows with neither a renderer nor a reason to skip: {sorted(unknown)}")
    todo = [n for n in shipped if n in RENDERERS and (not args.only or n in args.only)]

    work = gallery_dir()
    models_root, base = work / "models", work / "comfyui"
    prepare_models(models_root, with_fixtures="flash_controlnet" in todo)
    inputs = base / "input"
    write_inputs(inputs)
    if "flash_sd15_lora_stack" in todo:
        build_style_lora(models_root / "loras" / STYLE_LORA, models_root / "loras" / FLASH_LORA)
    shutil.rmtree(base / "output" / "gallery", ignore_errors=True)

    server = ComfyServer(models_root=models_root, base_dir=base, port=args.port, log_path=work / "comfyui.log")
    print(f"starting ComfyUI (log: {server.log_path}) ...", flush=True)
    server.start()
    done: dict[str, Rendered] = {}
    try:
        print(f"ComfyUI up after {time.monotonic() - started:.0f} s", flush=True)
        runner = Runner(server)
        args.out.mkdir(parents=True, exist_ok=True)
        for name in todo:
            t0, runs = time.monotonic(), runner.runs
            result = RENDERERS[name](runner, name, inputs)
            result.seconds, result.runs = time.monotonic() - t0, runner.runs - runs
            image = compose(result.rows)
            write_atomic(args.out / f"{name}.png", lambda tmp, image=image: image.save(tmp, format="PNG", optimize=True))
            done[name] = result
            print(f"{name}: {result.runs} runs, {result.seconds:.1f} s -> {args.out / f'{name}.png'}", flush=True)
    finally:
        server.stop()

    order = [n for n in ORDER if n in shipped] + [n for n in shipped if n not in ORDER]
    if args.only:
        order = [n for n in order if n in todo]
    text = "\n".join(snippet_lines(done, order)).rstrip() + "\n"
    if args.snippet:
        write_text_atomic(args.snippet, text)
        print(f"snippet: {args.snippet}")
    else:
        print(text)
    skipped = [n for n in order if n in SKIPPED]
    print(f"rendered {len(done)}, skipped {len(skipped)}; total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
