"""`make bench`: FlashSampler against stock samplers, side by side, in one run on one server and one model.

Three paths on the same checkpoint, prompt, size and seeds:
  flash       FlashSampler, 4 steps, cfg 1
  euler_cfg   stock KSampler, euler / normal, 25 steps, cfg 7.5   (the usual many-step path)
  lcm         stock KSampler, lcm / sgm_uniform, 4 steps, cfg 1  (the stock few-step path)

Wall time: each path is queued on a real ComfyUI server several times, interleaved, with a new seed each
time (only the sampler, decode and save re-run; loaders are cached); the time is ComfyUI's own
execution_start -> execution_success span. Model evaluations: counted in-process through ComfyUI's
model_function_wrapper (the wrapper every sampler calls), in rows of the UNet batch (cfg > 1 evaluates
cond and uncond). Prints a table and saves bench/results/speed.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from flash_core.files import write_json_atomic
from training.fixtures import tiny_checkpoint
from training.fixtures.comfy_env import REPO_ROOT, cache_dir, import_comfy, load_pack
from training.fixtures.comfy_server import ComfyServer

RESULTS = REPO_ROOT / "bench" / "results" / "speed.json"
PROMPT = "a raccoon reading a book in a lush forest, golden hour"
PATHS = {
    "flash": {"class_type": "FlashSampler", "steps": 4, "cfg": 1.0},
    "euler_cfg": {"class_type": "KSampler", "sampler_name": "euler", "scheduler": "normal", "steps": 25, "cfg": 7.5},
    "lcm": {"class_type": "KSampler", "sampler_name": "lcm", "scheduler": "sgm_uniform", "steps": 4, "cfg": 1.0},
}


def workflow(path: str, seed: int, size: int) -> dict:
    spec = PATHS[path]
    sampler_inputs = {"model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
                      "seed": seed, "steps": spec["steps"], "cfg": spec["cfg"], "denoise": 1.0}
    if spec["class_type"] == "KSampler":
        sampler_inputs.update(sampler_name=spec["sampler_name"], scheduler=spec["scheduler"])
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint.CHECKPOINT_NAME}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry, low quality"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": spec["class_type"], "inputs": sampler_inputs},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": f"flash_bench/{path}"}},
    }


def execution_seconds(entry: dict) -> float:
    stamps = {kind: data["timestamp"] for kind, data in entry["status"]["messages"] if "timestamp" in data}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def server_wall_times(size: int, repeats: int) -> dict[str, list[float]]:
    models_root = cache_dir() / "models"
    times: dict[str, list[float]] = {path: [] for path in PATHS}
    base = cache_dir() / "bench-comfy"
    with ComfyServer(models_root=models_root, base_dir=base, log_path=base / "comfyui.log") as server:
        for path in PATHS:  # warm-up: load the model, fill caches
            server.run(workflow(path, 0, size))
        for repeat in range(repeats):
            for path in PATHS:  # interleaved, so drift of the machine hits every path alike
                entry = server.run(workflow(path, 1000 + repeat, size))
                if entry["status"]["status_str"] != "success":
                    raise RuntimeError(f"{path} failed: {entry}")
                times[path].append(execution_seconds(entry))
                print(f"  {path:10s} run {repeat + 1}/{repeats}: {times[path][-1]:.3f}s", flush=True)
    return times


def model_evaluations(size: int) -> dict[str, int]:
    """UNet rows evaluated per image, counted through the wrapper ComfyUI gives every sampler."""
    import_comfy()
    import comfy.sd

    import nodes as comfy_nodes  # ComfyUI's nodes.py

    flash_sampler = load_pack().nodes.sampling.FlashSampler
    model, clip, _vae = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint.build()))[:3]
    positive = comfy_nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    negative = comfy_nodes.CLIPTextEncode().encode(clip, "blurry, low quality")[0]
    latent = comfy_nodes.EmptyLatentImage().generate(size, size, 1)[0]
    counts = {}
    for path, spec in PATHS.items():
        rows = []
        counted = model.clone()
        counted.set_model_unet_function_wrapper(lambda apply, args: rows.append(args["input"].shape[0]) or apply(args["input"], args["timestep"], **args["c"]))
        if spec["class_type"] == "FlashSampler":
            flash_sampler.execute(counted, positive, negative, latent, 0, spec["steps"], spec["cfg"], 1.0)
        else:
            comfy_nodes.common_ksampler(counted, 0, spec["steps"], spec["cfg"], spec["sampler_name"], spec["scheduler"], positive, negative, latent)
        counts[path] = sum(rows)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image size (the tiny SD1.5-family model)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    print(f"Counting model evaluations ({args.size}x{args.size})...", flush=True)
    evaluations = model_evaluations(args.size)
    print(f"Timing on a real ComfyUI server, {args.repeats} interleaved runs per path...", flush=True)
    times = server_wall_times(args.size, args.repeats)

    median = {path: statistics.median(values) for path, values in times.items()}
    results = {
        "size": args.size,
        "repeats": args.repeats,
        "model": tiny_checkpoint.CHECKPOINT_NAME,
        "paths": {path: {**PATHS[path], "median_seconds": median[path], "seconds": times[path],
                         "unet_rows_evaluated": evaluations[path]} for path in PATHS},
        "speedup_vs_euler_cfg": median["euler_cfg"] / median["flash"],
        "overhead_vs_lcm": median["flash"] / median["lcm"] - 1.0,
    }
    write_json_atomic(RESULTS, results)

    print("\n| path | sampler | steps | cfg | UNet evaluations | median s / image | vs flash |")
    print("|---|---|---|---|---|---|---|")
    for path, spec in PATHS.items():
        name = spec.get("sampler_name", "flash") + "/" + spec.get("scheduler", "trailing grid")
        print(f"| {path} | {name} | {spec['steps']} | {spec['cfg']} | {evaluations[path]} | {median[path]:.3f} | {median[path] / median['flash']:.2f}x |")
    print(f"\nFlashSampler is {results['speedup_vs_euler_cfg']:.1f}x faster than euler 25 steps cfg 7.5 "
          f"(goal >= 10x); overhead vs stock lcm 4 steps: {100 * results['overhead_vs_lcm']:+.1f}% (goal within 5%).")
    print(f"saved {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
