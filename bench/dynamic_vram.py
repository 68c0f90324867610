"""GPU only: few-step sampling under ComfyUI 0.30's dynamic VRAM (issue 10), through the nodes on a real server.

An SD1.5-architecture checkpoint (ComfyUI's own UNetModel / AutoencoderKL / CLIP-L with SD1.5's configs, random
weights, fp16; ComfyUI detects it as SD15) and a rank-64 LoRA in the flash-sd format on every attention
projection are built once into the cache (no download). Three paths, as bench/speed.py, at 512 px:
  flash      Flash LoRA Loader -> Flash Sampler, 4 steps, cfg 1
  euler_cfg  KSampler euler / normal, 25 steps, cfg 7.5 (no LoRA)
  lcm        KSampler lcm / sgm_uniform, 4 steps, cfg 1 (no LoRA)
at batch 1 and 4, and two diagnostic paths at batch 1:
  flash_custom  the same LoRA + Flash sampler through SamplerCustom (FlashSamplerSelect + FlashScheduler), which
                samples the MODEL as it is: dynamic, without FlashSampler's resident delegate
  lcm_lora      KSampler lcm 4 steps with the Flash LoRA (the LoRA's own cost)
each on its own server with ComfyUI's defaults (dynamic VRAM on NVIDIA) and with --disable-dynamic-vram. Time:
ComfyUI's execution_start -> execution_success span (sampling, VAE decode, PNG save) of a block of runs per
path after one warm-up run, as a user re-running a workflow with new seeds (ComfyUI's cache keeps the loaders'
outputs within a block; interleaving graphs would re-run the LoRA loader every time). Writes bench/results/dynamic_vram.json with the GPU's name.

`--teacher-check` (its own process: dynamic VRAM initialised as ComfyUI's main.py does) compares the distill
node's teacher with the MODEL carrying an upstream LoRA and with the raw checkpoint; writes
bench/results/dynamic_vram_teacher.json.

    python -P bench/dynamic_vram.py [--repeats 3]      # needs CUDA and ComfyUI 0.30 (make setup)
    python -P bench/dynamic_vram.py --teacher-check    # after a first run built the checkpoint
    python -P bench/dynamic_vram.py --smoke            # the plumbing on the CPU with the tiny fixture checkpoint
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from flash_core.files import write_atomic, write_json_atomic
from training.fixtures import tiny_checkpoint
from training.fixtures.comfy_env import REPO_ROOT, cache_dir, comfyui_path, comfyui_version, import_comfy
from training.fixtures.comfy_server import ComfyServer

RESULTS = REPO_ROOT / "bench" / "results" / "dynamic_vram.json"
TEACHER_RESULTS = REPO_ROOT / "bench" / "results" / "dynamic_vram_teacher.json"
CHECKPOINT = "flash_bench_sd15_random.safetensors"
LORA = "flash_bench_sd15_random_lora.safetensors"
SD15_UNET = dict(  # SD1.5's UNet as ComfyUI's model detection describes it
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 2, 4, 4], num_heads=8, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], transformer_depth_middle=1, context_dim=768,
    use_spatial_transformer=True, use_linear_in_transformer=False, legacy=False,
)
SD_VAE = {**tiny_checkpoint.TINY_VAE_DDCONFIG, "ch_mult": [1, 2, 4, 4]}
PROMPT = "a raccoon reading a book in a lush forest, golden hour"
PATHS = {
    "flash": {"class_type": "FlashSampler", "steps": 4, "cfg": 1.0, "lora": True},
    "euler_cfg": {"class_type": "KSampler", "sampler_name": "euler", "scheduler": "normal", "steps": 25, "cfg": 7.5},
    "lcm": {"class_type": "KSampler", "sampler_name": "lcm", "scheduler": "sgm_uniform", "steps": 4, "cfg": 1.0},
}
# Where the per-run cost comes from (batch 1): the same Flash sampler through SamplerCustom, which samples the
# MODEL as it is (dynamic), and the stock lcm sampler with the Flash LoRA (the LoRA's cast-time cost alone).
DIAGNOSTIC_PATHS = {
    "flash_custom": {"class_type": "SamplerCustom", "steps": 4, "cfg": 1.0, "lora": True},
    "lcm_lora": {"class_type": "KSampler", "sampler_name": "lcm", "scheduler": "sgm_uniform", "steps": 4, "cfg": 1.0,
                 "lora": True},
}
ALL_PATHS = {**PATHS, **DIAGNOSTIC_PATHS}


def build_models(folder: Path, rank: int = 64) -> None:
    """The SD1.5-architecture checkpoint and its LoRA (diffusers `unet.*.lora_A/B` keys), unless cached."""
    from safetensors.torch import save_file

    import_comfy()
    import comfy.sd1_clip
    import comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    checkpoint, lora = folder / "checkpoints" / CHECKPOINT, folder / "loras" / LORA
    generator = torch.Generator().manual_seed(0)
    if not checkpoint.is_file():
        state = {}
        for prefix, module in (("model.diffusion_model.", UNetModel(**SD15_UNET)),
                               ("first_stage_model.", AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)),
                               ("cond_stage_model.", comfy.sd1_clip.SDClipModel())):
            tiny_checkpoint._randomise(module, generator)
            state.update({prefix + k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()})
            del module
        write_atomic(checkpoint, lambda tmp: save_file(state, tmp))
    if not lora.is_file():
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in UNetModel(**SD15_UNET).state_dict().items()}
        tensors = {}
        for diffusers_key, ldm_key in sorted(comfy.utils.unet_to_diffusers(SD15_UNET).items()):
            module = diffusers_key.removesuffix(".weight")
            if diffusers_key.endswith(".weight") and module.endswith(tiny_checkpoint.ATTENTION_PROJECTIONS):
                out_features, in_features = shapes[ldm_key][:2]
                tensors[f"unet.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
                tensors[f"unet.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
        write_atomic(lora, lambda tmp: save_file(tensors, tmp))


def workflow(path: str, seed: int, size: int, batch: int, checkpoint: str, lora: str) -> dict:
    spec = ALL_PATHS[path]
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry, low quality"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": f"flash_bench/{path}"}},
    }
    model = ["1", 0]
    if spec.get("lora"):
        graph["2"] = {"class_type": "FlashLoRALoader", "inputs": {"model": model, "clip": ["1", 1], "lora_name": lora,
                                                                  "strength_model": 1.0, "strength_clip": 1.0}}
        model = ["2", 0]
    inputs = {"model": model, "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": seed,
              "steps": spec["steps"], "cfg": spec["cfg"], "denoise": 1.0}
    if spec["class_type"] == "KSampler":
        inputs.update(sampler_name=spec["sampler_name"], scheduler=spec["scheduler"])
    if spec["class_type"] == "SamplerCustom":  # the Flash SAMPLER + SIGMAS on the MODEL as it is
        graph["9"] = {"class_type": "FlashSamplerSelect", "inputs": {}}
        graph["10"] = {"class_type": "FlashScheduler", "inputs": {"model": model, "steps": spec["steps"], "denoise": 1.0}}
        inputs = {"model": model, "add_noise": True, "noise_seed": seed, "cfg": spec["cfg"], "positive": ["3", 0],
                  "negative": ["4", 0], "sampler": ["9", 0], "sigmas": ["10", 0], "latent_image": ["5", 0]}
    graph["6"] = {"class_type": spec["class_type"], "inputs": inputs}
    return graph


def execution_seconds(entry: dict) -> float:
    stamps = {kind: data["timestamp"] for kind, data in entry["status"]["messages"] if "timestamp" in data}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def run_mode(models: Path, mode: str, args, checkpoint: str, lora: str) -> dict:
    base = cache_dir() / "bench-dynamic-vram" / mode
    extra = ["--disable-dynamic-vram"] if mode == "dynamic_vram_off" else []
    results = {}
    with ComfyServer(models_root=models, base_dir=base, log_path=base / "comfyui.log", cpu=args.smoke,
                     extra_args=extra) as server:
        for batch in args.batches:
            paths = list(PATHS) + (list(DIAGNOSTIC_PATHS) if batch == 1 else [])
            times: dict[str, list[float]] = {path: [] for path in paths}
            for path in paths:  # one block per path, as a user re-running a workflow with new seeds
                entry = server.run(workflow(path, 0, args.size, batch, checkpoint, lora))  # warm-up: loaders, staging
                if entry["status"]["status_str"] != "success":
                    raise RuntimeError(f"{mode} {path} batch {batch} failed:\n{server.log_tail()}")
                for repeat in range(args.repeats):
                    entry = server.run(workflow(path, 1000 + repeat, args.size, batch, checkpoint, lora))
                    times[path].append(execution_seconds(entry))
            median = {path: statistics.median(values) for path, values in times.items()}
            results[f"batch_{batch}"] = {
                "median_seconds": median, "seconds": times,
                "euler_cfg_over_flash": median["euler_cfg"] / median["flash"],
                "flash_over_lcm": median["flash"] / median["lcm"],
                **({"flash_custom_over_flash": median["flash_custom"] / median["flash"]} if "flash_custom" in median else {}),
            }
            print(f"{mode:17s} batch {batch}: " + ", ".join(f"{p} {m * 1000:.0f} ms" for p, m in median.items())
                  + f"; euler_cfg / flash = {results[f'batch_{batch}']['euler_cfg_over_flash']:.2f}x", flush=True)
    return results


def teacher_check(models: Path, checkpoint: str = CHECKPOINT, dynamic: bool = True) -> dict:
    """Issue 10 item 4 on the GPU: under dynamic VRAM (initialised as ComfyUI's main.py does), the distill node's
    teacher (nodes/comfy_denoiser.ComfyDenoiser) equals the MODEL with an upstream LoRA, not the raw checkpoint.
    eps is compared on the same noisy latents at t = 899 and 299; run in its own process (--teacher-check)."""
    sys.path.append(str(comfyui_path()))
    import comfy_aimdo.control

    if dynamic:
        try:  # before CUDA starts, as ComfyUI's main.py (comfy-aimdo 0.4.11 protocol, then older)
            comfy_aimdo.control.init(simple_vram_headroom=None, nvml_pressure=True)
        except TypeError:
            comfy_aimdo.control.init()
    import_comfy(cpu=not dynamic)
    import comfy.lora
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd

    if dynamic:
        if not comfy_aimdo.control.init_devices(d.index for d in comfy.model_management.get_all_torch_devices()):
            raise RuntimeError("comfy-aimdo found no device: dynamic VRAM is not available here")
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    from training.fixtures.comfy_env import load_pack

    comfy_denoiser = load_pack().nodes.comfy_denoiser

    raw = comfy.sd.load_checkpoint_guess_config(str(models / "checkpoints" / checkpoint), output_vae=False,
                                                output_clip=False)[0]
    generator = torch.Generator().manual_seed(0)
    weights, lora = raw.model.state_dict(), {}
    for lora_key, weight_key in comfy.lora.model_lora_keys_unet(raw.model, {}).items():
        if (lora_key.startswith("lora_unet_") and isinstance(weight_key, str)
                and weight_key.removesuffix(".weight").endswith(tiny_checkpoint.ATTENTION_PROJECTIONS)):
            out_features, in_features = weights[weight_key].shape[:2]
            lora[f"{lora_key}.lora_down.weight"] = torch.randn((64, in_features), generator=generator) * 0.05
            lora[f"{lora_key}.lora_up.weight"] = torch.randn((out_features, 64), generator=generator) * 0.05
            lora[f"{lora_key}.alpha"] = torch.tensor(64.0)
    patched = comfy.sd.load_lora_for_models(raw, None, lora, 1.0, 0.0)[0]  # what LoraLoaderModelOnly does

    device = comfy.model_management.get_torch_device()
    x_t = torch.randn((2, 4, 64, 64), generator=generator).to(device)
    t = torch.tensor([899.0, 299.0], device=device)
    context = torch.randn((2, 77, 768), generator=generator).to(device)

    def comfy_eps(model) -> torch.Tensor:  # as ComfyUI's samplers: apply_model on x = x_t sqrt(1 + sigma^2)
        comfy.model_management.load_models_gpu([model])
        sigma = model.get_model_object("model_sampling").sigma(t).to(device)
        s = sigma.reshape(-1, 1, 1, 1)
        x = x_t * (s**2 + 1.0).sqrt()
        with torch.no_grad():
            return ((x - model.model.apply_model(x, sigma, c_crossattn=context)) / s).float()

    want, unpatched = comfy_eps(patched), comfy_eps(raw)
    from flash_core.denoiser import Conditioning
    from flash_core.distill import DistillConfig
    from flash_core.session import TrainingSession

    with torch.inference_mode(False):
        den = comfy_denoiser.ComfyDenoiser(patched)
        TrainingSession(den, DistillConfig(backbone="sd15", lora_rank=4), dataset=None).student()  # the node's student
        with den.teacher(), torch.no_grad():
            teacher = den.predict(x_t, t, Conditioning(context)).float()

    def relative(a, b) -> float:
        return float((a - b).norm() / b.norm())

    return {
        "dynamic": bool(raw.is_dynamic()), "device": str(device),
        "teacher_vs_patched_relative": relative(teacher, want),
        "teacher_vs_unpatched_relative": relative(teacher, unpatched),
        "patched_vs_unpatched_relative": relative(want, unpatched),
        "max_abs_teacher_minus_patched": float((teacher - want).abs().max()),
        "max_abs_teacher_minus_unpatched": float((teacher - unpatched).abs().max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny fixture checkpoint, 64 px, 1 repeat; no results file")
    parser.add_argument("--teacher-check", action="store_true", help="GPU: the distill teacher under dynamic VRAM (issue 10 item 4)")
    args = parser.parse_args(argv)
    if args.teacher_check:
        check = teacher_check(cache_dir() / "models")
        print(f"teacher check: {check}", flush=True)
        write_json_atomic(TEACHER_RESULTS, {"gpu": torch.cuda.get_device_name(0), **check})
        return 0
    if args.smoke:
        args.size, args.batches, args.repeats = 64, [1], 1
    elif not torch.cuda.is_available():
        print("bench/dynamic_vram.py measures GPU memory management: it needs CUDA (use --smoke on a CPU).")
        return 2
    if comfyui_version() < (0, 30, 0):
        print(f"ComfyUI {'.'.join(map(str, comfyui_version()))} has no dynamic VRAM: run make setup (0.30.0).")
        return 2

    models = cache_dir() / "models"
    if args.smoke:
        checkpoint, lora = tiny_checkpoint.CHECKPOINT_NAME, tiny_checkpoint.LORA_NAME
        tiny_checkpoint.build(), tiny_checkpoint.build_lora()
    else:
        checkpoint, lora = CHECKPOINT, LORA
        build_models(models)
    modes = ["defaults"] if args.smoke else ["defaults", "dynamic_vram_off"]
    results = {mode: run_mode(models, mode, args, checkpoint, lora) for mode in modes}
    if args.smoke:
        return 0
    report = {
        "gpu": torch.cuda.get_device_name(0),
        "comfyui": ".".join(map(str, comfyui_version())),
        "size": args.size, "repeats": args.repeats, "checkpoint": "SD1.5 architecture, random weights, fp16",
        "lora_rank": 64, "paths": {p: {k: v for k, v in s.items() if k != "lora"} | {"lora": bool(s.get("lora"))}
                                   for p, s in ALL_PATHS.items()},
        "modes": results,
        "goal": "euler_cfg / flash >= 5.9x at batch 1 under the defaults (the model-call limit is 25 / 4 = 6.25x)",
    }
    write_json_atomic(RESULTS, report)
    print(f"saved {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
