"""The demo's node-trained student sampled the quality benchmark's way (issue 9: the 4-step comparison).

Loads the LoRA that `make demo` distilled with FlashDistillTrain (<cache>/demo/models/loras/flash/
flash_digits_demo.safetensors, kohya keys) into a flash_core FlashDistiller over the digits teacher, samples
the benchmark's prompts and noise (`make bench-quality`: 20 per digit, seed 0) with flash_core's sampler at
1 / 2 / 4 steps, and scores them with the benchmark's classifier. Same student, benchmark's measurement: if the
rows match the flash_core-trained student's, the two training paths agree and any gap in the demo's own table
comes from how the demo measures.

    PYTHONPATH=.pypath python -P bench/demo_student_in_flash_core.py  ->  bench/results/demo/flash_core_sampling.json
"""
import sys
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from flash_core.files import write_json_atomic
from training.digits.demo_workflows import demo_dir
from training.digits import benchmark as b
from training.digits.teacher import TeacherConfig

OUT = Path(__file__).resolve().parent / "results" / "demo" / "flash_core_sampling.json"
PER_DIGIT, SEED = 20, 0


def kohya_to_peft(kohya: dict, peft_keys: dict, rank: int, alpha: float) -> dict:
    """kohya lora_unet_<path>.lora_down/up (+ .alpha) -> the distiller's peft keys, scale folded into lora_B."""
    out = {}
    for key, like in peft_keys.items():
        module, part = key.split(".lora_", 1)
        base = "lora_unet_" + module.replace(".", "_")
        tensor = kohya[base + (".lora_down.weight" if part.startswith("A") else ".lora_up.weight")]
        if part.startswith("B"):  # file scale alpha_file / r_file, distiller scale alpha / rank
            tensor = tensor * (float(kohya[base + ".alpha"]) / tensor.shape[1]) / (alpha / rank)
        out[key] = tensor.reshape(like.shape).to(like.dtype)
    return out


def main() -> int:
    lora = demo_dir() / "models" / "loras" / "flash" / "flash_digits_demo.safetensors"
    if not lora.is_file():
        print(f"{lora} is missing: run `make demo` first", file=sys.stderr)
        return 2
    torch.manual_seed(SEED)
    pipe = b.load_teacher_pipeline(b.train_teacher(b.default_teacher_dir(), TeacherConfig(seed=SEED)))
    evaluator, (_, held_out) = b.load_evaluator(), b.load_splits()
    digits = torch.arange(10).repeat_interleave(PER_DIGIT)
    size = pipe.unet.config.sample_size
    noise = torch.randn(len(digits), pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(SEED))
    cond = b.encode_prompts(pipe, [b.canonical_prompt(int(d)) for d in digits])
    settings = b.StudentSettings()
    distiller = b.student_session(pipe, None, settings, b.ABLATIONS["flash"]).student()  # sampling only
    own = distiller.denoiser.lora_state_dict()
    state = kohya_to_peft(load_file(lora), own, settings.lora_rank, float(distiller.config.lora_alpha))
    result = set_peft_model_state_dict(distiller.denoiser.lora_module, state)
    if result.unexpected_keys:
        raise SystemExit(f"{lora}: keys the student does not have: {result.unexpected_keys[:5]}")
    rows = []
    for nfe in (1, 2, 4):
        images = b.student_generate(distiller, pipe, cond, noise, nfe, SEED + 1)  # the benchmark's sampling seed
        rows.append({"nfe": nfe, "accuracy": evaluator.accuracy(images, digits),
                     "frechet_distance": evaluator.frechet_distance(images, held_out.images)})
        print(rows[-1], flush=True)
    write_json_atomic(OUT, {"command": "python -P bench/demo_student_in_flash_core.py", "lora": str(lora),
                            "lora_tensors_loaded": len(state), "per_digit": PER_DIGIT, "seed": SEED, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
