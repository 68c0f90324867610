"""Why the digits student is weaker at 4 NFE than at 2: ablations of the distillation on the quality benchmark.

Each variant distils one student from the shipped digits teacher with ONE change from the default (StudentSettings
and the sd15 recipe: both optimisers on every batch, 500 batches) and is scored like `make bench-quality` (the same
prompts, noise, classifier, held-out reference set, 200 images per row): accuracy and Frechet distance at 1 / 2 / 4
NFE. The default row is the committed bench/results/quality/results.json's Flash student when its settings are the
default's (else it is distilled here too). Results are written after every variant, so a run cut short keeps
what it finished.

    python -P -m training.digits.ablations [--only alternating more_updates ...]     (make bench-ablations)

writes bench/results/quality/ablations.json (rows: variant, change, nfe, accuracy, frechet_distance, train_s) and
ablations.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from flash_core.files import write_json_atomic, write_text_atomic
from training.digits.benchmark import (
    ABLATIONS,
    DEFAULT_OUT,
    STUDENT_NFES,
    StudentSettings,
    canonical_prompt,
    encode_prompts,
    student_generate,
    teacher_generate,
    train_student,
)
from training.digits.data import load_splits
from training.digits.evaluator import load_evaluator
from training.digits.teacher import (
    default_teacher_dir,
    load_teacher_pipeline,
    train_teacher,
)

# variant -> (what changes, StudentSettings overrides, per-phase loss weights, DistillConfig overrides)
VARIANTS: dict[str, tuple[str, dict, dict, dict]] = {
    "default": ("both optimisers on every batch, 500 batches", {}, {}, {}),
    "alternating": ("student and discriminator on alternate batches (the earlier default), the same 500 student updates",
                    {"total_steps": 1000}, {}, {"alternate_updates": True}),
    "distill_only": ("distillation loss only (no adversarial, no DMD)", {}, ABLATIONS["ablation_distill_only"], {}),
    "more_updates": ("1000 batches (twice the student updates)", {"total_steps": 1000}, {}, {}),
    "lower_lr": ("learning rate 3e-4 instead of 1e-3", {"lr": 3e-4}, {}, {}),
    "guidance_fixed": ("teacher guidance w = 3 (the evaluation's) instead of U[2, 4]", {"guidance_range": (3.0, 3.0)}, {}, {}),
    "lower_guidance": ("teacher guidance w ~ U[1, 2] instead of U[2, 4] (is guidance compounded over re-entries?)",
                       {"guidance_range": (1.0, 2.0)}, {}, {}),
}
OUT = DEFAULT_OUT / "ablations.json"


def committed_default(settings: StudentSettings) -> list[dict] | None:
    """The Flash student rows of the committed quality results when they were made with `settings`."""
    path = DEFAULT_OUT / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text(encoding="utf-8"))
    if results.get("settings", {}).get("student") != json.loads(json.dumps(asdict(settings))):
        return None
    rows = [m for m in results["methods"] if m["method"] == "flash"]
    return [{"nfe": m["nfe"], "accuracy": m["accuracy"], "frechet_distance": m["frechet_distance"],
             "train_s": m["train_s"], "source": "bench/results/quality/results.json"} for m in rows] or None


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | change | accuracy 1 / 2 / 4 NFE | Fréchet 1 / 2 / 4 NFE | 4 NFE <= 2 NFE |", "|---|---|---|---|---|"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        own = {r["nfe"]: r for r in rows if r["variant"] == variant}
        accuracy = " / ".join(f"{100 * own[n]['accuracy']:.1f} %" for n in STUDENT_NFES if n in own)
        frechet = " / ".join(f"{own[n]['frechet_distance']:.1f}" for n in STUDENT_NFES if n in own)
        holds = "yes" if own[4]["frechet_distance"] <= own[2]["frechet_distance"] else "no"  # the paper's students hold
        lines.append(f"| {variant} | {own[STUDENT_NFES[0]]['change']} | {accuracy} | {frechet} | {holds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=None, help="variants to run (default: all)")
    parser.add_argument("--per-digit", type=int, default=20, help="images per digit and row (make bench-quality: 20)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    pipe = load_teacher_pipeline(train_teacher(default_teacher_dir()))
    evaluator, (train, held_out) = load_evaluator(), load_splits()
    digits = torch.arange(10).repeat_interleave(args.per_digit)
    size = pipe.unet.config.sample_size
    noise = torch.randn(len(digits), pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    prompts = [canonical_prompt(int(d)) for d in digits]
    cond = encode_prompts(pipe, prompts)
    previous = json.loads(args.out.read_text(encoding="utf-8"))["rows"] if args.out.is_file() else []
    rows: list[dict] = []
    for nfe in STUDENT_NFES:  # the bar: the teacher's DPM-Solver++ with CFG 3 at the same steps (2 UNet calls each)
        images = teacher_generate(pipe, prompts, noise, nfe, 3.0)
        rows.append({"variant": "teacher DPM-Solver++ (CFG 3)", "change": "the teacher at the same steps, 2 UNet calls each",
                     "nfe": nfe, "accuracy": evaluator.accuracy(images, digits),
                     "frechet_distance": evaluator.frechet_distance(images, held_out.images), "train_s": None})
    for variant in args.only or list(VARIANTS):
        change, overrides, weights, config = VARIANTS[variant]
        settings = replace(StudentSettings(), **overrides)
        found = committed_default(settings) if variant == "default" and not config and not weights else None
        if found is None:
            start = time.perf_counter()
            distiller, train_s, _ = train_student(pipe, train, settings, weights, desc=f"ablation {variant}", config=config)
            found = []
            for nfe in STUDENT_NFES:
                images = student_generate(distiller, pipe, cond, noise, nfe, 1)  # the benchmark's sampling seed
                found.append({"nfe": nfe, "accuracy": evaluator.accuracy(images, digits),
                              "frechet_distance": evaluator.frechet_distance(images, held_out.images), "train_s": train_s})
            print(f"{variant}: {time.perf_counter() - start:.0f} s", flush=True)
        rows += [{"variant": variant, "change": change, **row} for row in found]
        kept = [r for r in previous if r["variant"] not in {r["variant"] for r in rows}]
        write_json_atomic(args.out, {"command": "python -P -m training.digits.ablations", "per_digit": args.per_digit,
                                     "rows": kept + rows})
        write_text_atomic(args.out.with_suffix(".md"), markdown(kept + rows) + "\n")
        print(markdown(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
