"""`make demo`: the main job on an embedded default model, end to end through a real ComfyUI.

1. builds the embedded default (a tiny SD1.5-family checkpoint and a Flash-format LoRA, cached, no
   download), 2. starts ComfyUI with the Flash nodes on loopback, 3. runs workflows/api/flash_txt2img.json
   through comfy-cli, 4. prints the images it saved and the URL to open. Interactive runs keep serving
   until Ctrl-C so the workflows can be opened in the browser.

The default model is untrained (random weights): the images show that the graph runs, not a picture.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from training import tiny_checkpoint
from training.comfy_env import REPO_ROOT, cache_dir
from training.comfy_server import ComfyServer

WORKFLOW = REPO_ROOT / "workflows" / "api" / "flash_txt2img.json"


def demo_workflow(size: int, batch: int, seed: int) -> dict:
    workflow = json.loads(WORKFLOW.read_text())
    workflow["1"]["inputs"]["ckpt_name"] = tiny_checkpoint.CHECKPOINT_NAME
    workflow["2"]["inputs"]["lora_name"] = tiny_checkpoint.LORA_NAME
    workflow["5"]["inputs"].update(width=size, height=size, batch_size=batch)
    workflow["6"]["inputs"]["seed"] = seed
    workflow["8"]["inputs"]["filename_prefix"] = "flash/demo_txt2img"
    return workflow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the Flash demo in a real ComfyUI.")
    parser.add_argument("--size", type=int, default=128, help="image size in pixels (the tiny model is slow above 256)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--serve", action=argparse.BooleanOptionalAction, default=sys.stdin.isatty(),
                        help="keep ComfyUI running after the demo (default: when run from a terminal)")
    args = parser.parse_args(argv)

    print("[1/3] building the embedded default model (cached after the first run)...", flush=True)
    tiny_checkpoint.build()
    tiny_checkpoint.build_lora()
    models_root = cache_dir() / "models"

    print("[2/3] starting ComfyUI with the Flash nodes...", flush=True)
    server = ComfyServer(models_root=models_root, port=args.port, log_path=cache_dir() / "demo-comfyui.log")
    server.start()
    try:
        workflow_file = cache_dir() / "demo_flash_txt2img.json"
        workflow_file.write_text(json.dumps(demo_workflow(args.size, args.batch, args.seed), indent=1))
        print(f"[3/3] comfy run --workflow {workflow_file} (FlashSampler, 4 steps, cfg 1)...", flush=True)
        started = time.monotonic()
        result = server.comfy_cli_run(workflow_file, timeout=600)
        elapsed = time.monotonic() - started
        if result.returncode != 0:
            print(result.stdout[-3000:], result.stderr[-3000:], sep="\n", file=sys.stderr)
            print(f"the demo workflow failed; ComfyUI log: {server.log_path}", file=sys.stderr)
            return 1
        images = sorted((server.output_dir() / "flash").glob("demo_txt2img_*.png"), key=lambda p: p.stat().st_mtime)[-args.batch:]
        print(f"\nFlash txt2img: {len(images)} images in {elapsed:.1f}s (comfy-cli wall time, including queueing)")
        for image in images:
            print(f"  {image}")
        print(f"\nOpen {server.url} and load a workflow from the template browser (Workflow > Browse Templates > ComfyUI-Flash).")
        if args.serve:
            print("ComfyUI keeps running; press Ctrl-C to stop.", flush=True)
            try:
                while server.alive():
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
