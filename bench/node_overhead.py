"""The cost of distilling inside ComfyUI: FlashDistillTrain against the headless flash_core trainer.

The same teacher (the cached digits teacher), the same settings (the demo's: LoRA rank 16, lr 1e-3, batch
16, K = 8, CFG 2-4) and the same number of steps, each path in its own process so peak memory is its own:
  * node:     nodes.training.train (the body of FlashDistillTrain) on the MODEL / CLIP / VAE that
              FlashDiffusersLoader builds, with latents and prompts encoded by ComfyUI (VAE Encode, CLIP Text
              Encode), previews off;
  * headless: flash_core.run on the diffusers UNet (training/digits/benchmark.py's student_session, the same
              run the flash-distill CLI and the node drive).
Reports seconds per step (the whole loop / steps, as the node logs it) and the process's peak RSS; prints a table
and saves bench/results/node_overhead.json.

    python -P bench/node_overhead.py [--steps N]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import resource
import subprocess
import sys
import tempfile
import time

import torch

from flash_core.files import write_json_atomic
from training.fixtures.comfy_env import REPO_ROOT

RESULTS = REPO_ROOT / "bench" / "results" / "node_overhead.json"
IMAGES = 256  # training digits encoded for the node path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_headless(steps: int) -> dict:
    from training.digits.benchmark import StudentSettings, student_session
    from training.digits.data import load_splits
    from training.digits.teacher import default_teacher_dir, load_teacher_pipeline

    pipe = load_teacher_pipeline(default_teacher_dir())
    session = student_session(pipe, load_splits()[0], StudentSettings(total_steps=steps), {})
    session.start()
    start = time.perf_counter()
    session.train()
    return {"s_per_step": (time.perf_counter() - start) / steps, "peak_rss_mib": peak_rss_mib()}


def run_node(steps: int) -> dict:
    from training.fixtures.comfy_env import import_comfy, load_pack

    import_comfy()
    import folder_paths

    pack = load_pack()
    from training.digits.data import canonical_prompt, load_splits
    from training.digits.teacher import default_teacher_dir

    model, clip, vae = pack.nodes.diffusers_build.load_pipeline(default_teacher_dir())
    train = load_splits()[0]
    images = (train.images[:IMAGES].permute(0, 2, 3, 1) + 1) / 2  # ComfyUI IMAGE: (N, H, W, C) in [0, 1]
    with torch.no_grad():  # what ComfyUI's VAE Encode / CLIP Text Encode nodes give: plain tensors
        latents = [{"samples": vae.encode(images)}]
        positive = [clip.encode_from_tokens_scheduled(clip.tokenize(canonical_prompt(int(d))))
                    for d in train.digits[:IMAGES]]
        negative = [clip.encode_from_tokens_scheduled(clip.tokenize(""))]
    training = pack.nodes.training
    reports: list[str] = []

    class Report(logging.Handler):  # the node logs "N steps in T s (S s/step)" when it finishes
        def emit(self, record: logging.LogRecord) -> None:
            reports.append(record.getMessage())

    training.LOG.addHandler(Report())
    training.LOG.setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as loras:
        folder_paths.folder_names_and_paths["loras"] = ([loras], folder_paths.supported_pt_extensions)
        with torch.inference_mode(False), torch.enable_grad():
            training.train(model, latents, positive, negative, lora_name="bench", total_steps=steps,
                           recommended_steps=2, rank=16, learning_rate=1e-3, guidance_min=2.0, guidance_max=4.0,
                           teacher_grid_steps=8,
                           distill_weights="", adversarial_weights="", dmd_weights="", seed=0, batch_size=16,
                           resume=False, overwrite=True, preview_every=0, gradient_checkpointing=False,
                           mixed_precision="fp32")
    rate = next(float(m) for text in reports for m in re.findall(r"\(([0-9.]+) s/step\)", text))
    return {"s_per_step": rate, "peak_rss_mib": peak_rss_mib()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--path", choices=("node", "headless"), help=argparse.SUPPRESS)  # one path, in a child
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the same single thread for both paths: comparable, and steady on a busy machine
    if args.path:
        print(json.dumps((run_node if args.path == "node" else run_headless)(args.steps)))
        return 0
    results = {}
    for path in ("headless", "node"):
        child = subprocess.run([sys.executable, "-P", __file__, "--path", path, "--steps", str(args.steps)],
                               capture_output=True, text=True, check=True)
        results[path] = json.loads(child.stdout.strip().splitlines()[-1])
    ratio = results["node"]["s_per_step"] / results["headless"]["s_per_step"]
    extra_mib = results["node"]["peak_rss_mib"] - results["headless"]["peak_rss_mib"]
    write_json_atomic(RESULTS, {"steps": args.steps, **results, "time_ratio": ratio, "extra_rss_mib": extra_mib})
    print("| path | s / step | peak RSS (MiB) |\n|---|---:|---:|")
    for path, row in results.items():
        print(f"| {path} | {row['s_per_step']:.3f} | {row['peak_rss_mib']:.0f} |")
    print(f"\nFlashDistillTrain costs {100 * (ratio - 1):+.1f} % time per step and {extra_mib:+.0f} MiB peak RSS "
          f"against the headless trainer (ComfyUI's own process footprint included).\nsaved {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
