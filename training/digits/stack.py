"""Stack benchmark (`make bench-stack`): a Flash student of the user's own stack vs a generic one.

The user's stack is the digits teacher + an italic style LoRA (training/digits/style.py). Rows, all on the
same prompts and the same initial noise:
  * reference: teacher + style LoRA, DPM-Solver++ 25 steps, CFG 3 (what the user gets without Flash);
  * generic:   the digits Flash LoRA distilled from the plain teacher, stacked with the style LoRA
               (W + delta_style + delta_flash, what stacking an accelerator LoRA does), 1 / 2 / 4 steps;
  * stack:     a Flash LoRA distilled from teacher + style LoRA itself (what FlashDistillTrain does with a
               LoRA loaded upstream), 1 / 2 / 4 steps.
Metrics: digit accuracy (the benchmark classifier), Fréchet distance to the reference's images in the
classifier's feature space, `style_ratio` = mean slant of the images / mean slant of the reference's (1.0 =
the style fully kept; slant is measured without any network, training/digits/style.py), time per image.

Writes bench/results/stack/results.json (a list of rows: method, nfe, accuracy, frechet_distance,
style_ratio, slant, ms_per_image, train_s), results.md and grid.png.

    python -m training.digits.stack [--per-digit N] [--total-steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import torch

from training.digits.benchmark import (
    STUDENT_NFES,
    StudentSettings,
    add_total_steps_flag,
    encode_prompts,
    student_generate,
    teacher_generate,
    train_student,
    write_grid,
)
from training.digits.data import canonical_prompt, load_splits
from training.digits.evaluator import load_evaluator
from training.digits.style import StyleConfig, mean_slant, styled_pipeline, train_style_lora
from training.digits.teacher import TeacherConfig, default_teacher_dir, load_teacher_pipeline, train_teacher

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "stack"
REFERENCE_STEPS = 25
GUIDANCE = 3.0


def stack_generic_with_style(distiller, styled_pipe) -> None:
    """Put the styled weights (W + delta_style) under the generic student's Flash LoRA: every non-LoRA weight
    of the student's network is copied from the style-fused UNet (peft keeps the base weight of a LoRA layer
    as `<module>.base_layer.weight`)."""
    styled = styled_pipe.unet.state_dict()
    with torch.no_grad():
        for name, tensor in distiller.denoiser.lora_module.state_dict().items():
            if "lora_" in name:
                continue
            tensor.copy_(styled[name.replace(".base_layer", "")])


def run(args: argparse.Namespace) -> list[dict]:
    from flash_core.files import write_json_atomic, write_text_atomic

    torch.manual_seed(args.seed)
    pipe = load_teacher_pipeline(train_teacher(default_teacher_dir(), TeacherConfig()))
    style_file = train_style_lora(pipe, config=StyleConfig())
    styled = styled_pipeline(pipe, style_file, args.style_strength)
    evaluator = load_evaluator()
    train, _ = load_splits()

    digits = torch.arange(10).repeat_interleave(args.per_digit)
    prompts = [canonical_prompt(int(d)) for d in digits]
    size = pipe.unet.config.sample_size
    noise = torch.randn(len(prompts), pipe.unet.config.in_channels, size, size,
                        generator=torch.Generator().manual_seed(args.seed))
    cond_embeds = encode_prompts(pipe, prompts)  # the style LoRA leaves the text encoder alone

    rows: list[dict] = []
    grid_rows: list[tuple[str, torch.Tensor]] = []
    start = time.perf_counter()
    reference = teacher_generate(styled, prompts, noise, REFERENCE_STEPS, GUIDANCE)
    reference_ms = 1000 * (time.perf_counter() - start) / len(prompts)
    reference_slant = mean_slant(reference)

    def record(method: str, label: str, nfe: int, images: torch.Tensor, ms: float, train_s: float | None) -> None:
        slant = mean_slant(images)
        row = {"method": method, "label": label, "nfe": nfe, "accuracy": evaluator.accuracy(images, digits),
               "frechet_distance": evaluator.frechet_distance(images, reference), "style_ratio": slant / reference_slant,
               "slant": slant, "ms_per_image": ms, "train_s": train_s}
        rows.append(row)
        grid_rows.append((f"{label} @{nfe}", images))
        print(f"  {label:<34} nfe {nfe:>2}: accuracy {100 * row['accuracy']:5.1f} %  Fréchet {row['frechet_distance']:6.1f}"
              f"  style {row['style_ratio']:.2f}  {ms:.1f} ms/image", flush=True)

    record("reference", f"teacher + style, CFG {GUIDANCE:g}", REFERENCE_STEPS, reference, reference_ms, None)
    base_slant = mean_slant(teacher_generate(pipe, prompts, noise, REFERENCE_STEPS, GUIDANCE))

    settings = StudentSettings(total_steps=args.total_steps, seed=args.seed)
    students = {
        "generic": ("generic Flash LoRA + style LoRA", pipe),
        "stack": ("stack-distilled Flash LoRA", styled),
    }
    for method, (label, teacher_pipe) in students.items():
        distiller, train_s, _ = train_student(teacher_pipe, train, settings, {}, desc=f"distil {method}")
        if method == "generic":
            stack_generic_with_style(distiller, styled)
        for nfe in STUDENT_NFES:
            start = time.perf_counter()
            images = student_generate(distiller, teacher_pipe, cond_embeds, noise, nfe, args.seed + 1)
            record(method, label, nfe, images, 1000 * (time.perf_counter() - start) / len(prompts), train_s)

    out: Path = args.out
    write_json_atomic(out / "results.json", rows)
    write_json_atomic(out / "settings.json", {
        "per_digit": args.per_digit, "seed": args.seed, "style": asdict(StyleConfig()), "style_strength": args.style_strength,
        "student": asdict(settings), "reference_steps": REFERENCE_STEPS, "guidance": GUIDANCE,
        "slant": {"reference": reference_slant, "teacher_without_style": base_slant,
                  "training_digits": mean_slant(train.images)},
    })
    write_grid(out / "grid.png", grid_rows, digits, args.per_digit)
    table = ["| method | steps | accuracy | Fréchet distance to reference | style (slant / reference's) | ms / image |",
             "|---|---:|---:|---:|---:|---:|"]
    table += [f"| {r['label']} | {r['nfe']} | {100 * r['accuracy']:.1f} % | {r['frechet_distance']:.1f} | "
              f"{r['style_ratio']:.2f} | {r['ms_per_image']:.1f} |" for r in rows]
    write_text_atomic(out / "results.md", "\n".join(table) + "\n")
    print("\n".join(table))
    print(f"slant: reference {reference_slant:.3f}, teacher without style {base_slant:.3f}; outputs in {out}")
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--per-digit", type=int, default=20, help="images per digit and row")
    add_total_steps_flag(parser, StudentSettings.total_steps, "distillation iterations of the student")
    parser.add_argument("--style-strength", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
