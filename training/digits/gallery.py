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

The parts: gallery_files.py (models, input images, the style LoRA), gallery_graphs.py (the rewritten
graphs and running them), gallery_renderers.py (one renderer per workflow); this module composes the
images and the snippet.

    python -P -m training.digits.gallery [--only flash_img2img ...] [--out DIR] [--snippet PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from flash_core.files import write_atomic, write_text_atomic
from training.digits.gallery_files import (
    FLASH_LORA,
    STYLE_LORA,
    build_style_lora,
    gallery_dir,
    prepare_models,
    write_inputs,
)
from training.digits.gallery_graphs import API_DIR, Runner
from training.digits.gallery_renderers import RENDERERS, Panel, Rendered
from training.fixtures.comfy_env import REPO_ROOT
from training.fixtures.comfy_server import ComfyServer

GALLERY_DIR = REPO_ROOT / "docs" / "gallery"


# Snippet order: as docs/usage.md describes the graphs, then the demo's and the training graphs.
ORDER = [
    "flash_sd15_txt2img", "flash_sdxl_txt2img", "flash_txt2img", "flash_sd15_lora_stack", "flash_img2img",
    "flash_hires_fix", "flash_inpaint_noise_mask", "flash_inpaint_vae_encode", "flash_inpaint_model_conditioning",
    "flash_controlnet", "flash_ip_adapter", "flash_demo_compare", "flash_demo_distill", "flash_distill_train", "flash_distill_my_stack",
    "flash_distill_guidance",
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
    "flash_distill_guidance": "not rendered: a training graph (a student of guidance mode cfg on an SD1.5 teacher, "
                              "then Flash Sampler with a negative prompt at the LoRA's cfg and at cfg 4); `make "
                              "bench-guidance` measures the mode on the digits model.",
    "flash_txt2img": "not rendered: the same graph as flash_sd15_txt2img with the test fixtures' file names; its "
                     "image would be identical to that one.",
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
