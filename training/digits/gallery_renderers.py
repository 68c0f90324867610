"""One renderer per rendered workflow: it runs the rewritten graph (with the prompts, strengths or extra
SaveImage nodes that show what the graph does) and returns the rows of labelled panels and the caption of its
gallery image (RENDERERS: workflow name -> renderer)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.digits.gallery_files import (
    CONTROL_IMAGE,
    INPAINT_DIGIT,
    INPAINT_IMAGE,
    INPUT_DIGIT,
    INPUT_IMAGE,
    STYLE_RELATIVE,
)
from training.digits.gallery_graphs import Runner, load, nodes_of, onto_digits, onto_fixtures, prompt, save_node

SCALE = 6  # NEAREST upscale of the panels
INPAINT_PROMPTS = (8, 9, 2, 3)


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
    from training.digits.demo_workflows import PATHS

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
