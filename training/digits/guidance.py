"""Guidance benchmark on the digits teacher (`make bench-guidance`): does a student of guidance mode "cfg" honour a
negative prompt and a guidance dial at few steps, as the teacher does with CFG?

Three methods, the same prompts and initial noise for all (flash_core.distill_config.GUIDANCE_MODES):
  * teacher:  DPM-Solver++ 25 steps with CFG at w (2 UNet calls per step);
  * student:  a Flash student distilled with guidance_mode "cfg" over w ~ U[1, 8], sampled as FlashSampler samples
              it: its own CFG at the same w and negative (2 UNet calls per step), deterministic re-noise;
  * baseline: today's student (guidance_mode "baked", w ~ U[2, 4] baked in), sampled at cfg 1 as FlashSampler
              samples it: the negative prompt and w do nothing (1 UNet call per step), fresh re-noise (LCM).
Two experiments (classifier: training/digits/evaluator.py):
  * negative prompt: positive "" (unconditional), negative "a handwritten digit seven" / "... zero", at w = 3:
    the share of images read as the negated digit, with and without the negative. Goal: at 4 and 2 steps the
    student removes at least 80 % of the effect the teacher shows, the effect being the drop of that share in points
    (with one standard error); beside it, not a goal, the fraction of each method's own images of the digit removed.
  * guidance dial: the canonical prompt of every digit at w in {1.5, 3, 5, 8}: Frechet distance (classifier
    features) of the student's and the baseline's images to the teacher's at that w, and the accuracy. Goals (the
    issue's): at every w and step count the student is nearer the teacher than the baseline, and the student's
    accuracy moves with w the way the teacher's does (the same sign from the smallest to the largest w). Reported
    beside them, not a goal: whether the accuracy is within 10 points of the teacher's at every w.
    Beside the dial (summary.json, not goals): "renoise_ablation", each student with the other one's re-noise rule
    (flash_core.sampling.RENOISE_OF_GUIDANCE_MODE), to tell the guidance mode's share from the sampler's; and
    "dmd_ablation", a cfg student with the recipe's DMD weights x DMD_ABLATION_SCALE (the change that closed the
    accuracy gap at small w in exploration), its dial rows and the same checks. With --ema-decay D (> 0) the cfg
    student exports and samples the moving average of its LoRA (DistillConfig.ema_decay; `make bench-guidance-ema`
    writes bench/results/guidance/ema/), and the ablation beside it is "ema_ablation" instead: the same student
    without the average (ema_decay 0), its dial rows and the same checks. And "unconditional", each method's
    samples without a negative (positive and negative ""): the share of every digit and the total variation distance
    to the teacher's, the fidelity a ratio in points also carries.

Writes bench/results/guidance/: results.json (rows: method, nfe, w, negative, negated_share,
negated_share_without, accuracy, frechet_to_teacher; plus settings and goals), results.md, grid.png (the dial at
4 steps), negatives.png.

    python -P -m training.digits.guidance [--per-digit N] [--negative-images N] [--total-steps N] [--seed N]
                                          [--goals-only] [--ema-decay D]
                                          (bench-guidance-seeds: training/digits/guidance_seeds.py)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from flash_core.files import write_json_atomic, write_text_atomic
from flash_core.recipes import get_recipe
from training.digits.benchmark import (
    DEFAULT_OUT,
    StudentSettings,
    add_total_steps_flag,
    canonical_prompt,
    encode_prompts,
    student_generate,
    teacher_generate,
    train_student,
    write_grid,
)
from training.digits.data import DIGIT_WORDS, load_splits
from training.digits.evaluator import load_evaluator
from training.digits.teacher import (
    default_teacher_dir,
    load_teacher_pipeline,
    train_teacher,
)

OUT = DEFAULT_OUT.parent / "guidance"
TEACHER_STEPS = 25
STUDENT_NFES = (4, 2)
DIAL = (1.5, 3.0, 5.0, 8.0)
NEGATIVE_W = 3.0
NEGATED_DIGITS = (7, 0)
NEGATIVE_IMAGES = 4000  # per row: a share of ~6 % to +-0.4 point (one standard error), the points ratio to 0.06-0.09
STUDENT_GUIDANCE_RANGE = (1.0, 8.0)  # the cfg student's training range: covers the dial
SAMPLING_SEED = 1  # the few-step samplers' re-noising (make bench-quality's)
# the re-noise ablation: each method with the rule of the other guidance mode (flash_core.sampling.renoise_rule)
OTHER_RENOISE = {"student": "fresh", "baseline": "deterministic"}
REMOVED_SHARE_GOAL = 0.8
ACCURACY_TOLERANCE = 0.10  # reported beside the goals: |student - teacher| accuracy at every w
DMD_ABLATION_SCALE = 3.0  # the dmd_ablation student: the recipe's DMD weights per phase x 3
# what marks each ablation student's rows in summary.json: the one setting it changes
ABLATION_MARKS = {"dmd_ablation": {"dmd_scale": DMD_ABLATION_SCALE}, "ema_ablation": {"ema_decay": 0.0}}


def calls_per_image(method: str, nfe: int) -> int:
    """UNet calls per image: CFG (teacher, cfg student) evaluates positive and negative at every step."""
    return nfe if method == "baseline" else 2 * nfe


def negative_rows(pipe, evaluator, students: dict, count: int, seed: int) -> tuple[list[dict], dict]:
    """The negative-prompt experiment: positive "" at w = NEGATIVE_W, with and without each negated digit. Returns
    (rows, each method's unconditional samples: the share of every digit and the total variation to the teacher's,
    the fidelity a points ratio also carries)."""
    noise = _noise(pipe, count, seed)
    empty = encode_prompts(pipe, [""] * count)

    def generate(method: str, nfe: int, negative: str, negative_embeds: torch.Tensor) -> torch.Tensor:
        if method == "teacher":
            return teacher_generate(pipe, [""] * count, noise, TEACHER_STEPS, NEGATIVE_W, [negative] * count)
        if method == "student":
            return student_generate(students["student"], pipe, empty, noise, nfe, SAMPLING_SEED, negative_embeds,
                                    NEGATIVE_W)
        return student_generate(students["baseline"], pipe, empty, noise, nfe, SAMPLING_SEED)  # cfg 1: no negative

    methods = [("teacher", TEACHER_STEPS)] + [(m, nfe) for nfe in STUDENT_NFES for m in ("student", "baseline")]
    # without a negative (negative "" under positive "": the unconditional samples) once per method, for both digits
    without = {(method, nfe): evaluator.predict(generate(method, nfe, "", empty)) for method, nfe in methods}
    rows = []
    for digit in NEGATED_DIGITS:
        negative = canonical_prompt(digit)
        negative_embeds = encode_prompts(pipe, [negative] * count)
        teacher_images = None  # the teacher runs first: the others' distances are to its images with the negative
        for method, nfe in methods:
            with_negative = generate(method, nfe, negative, negative_embeds)
            rows.append({"method": method, "nfe": nfe, "w": NEGATIVE_W if method != "baseline" else 1.0,
                         "negative": negative,
                         "negated_share": float((evaluator.predict(with_negative) == digit).float().mean()),
                         "negated_share_without": float((without[(method, nfe)] == digit).float().mean()),
                         "accuracy": None, "frechet_to_teacher": None if teacher_images is None
                         else evaluator.frechet_distance(with_negative, teacher_images),
                         "calls_per_image": calls_per_image(method, nfe), "images": with_negative})
            teacher_images = with_negative if method == "teacher" else teacher_images
            print(f"  negative {DIGIT_WORDS[digit]:<6} {method:<8} nfe {nfe:>2}: share {rows[-1]['negated_share']:.3f}"
                  f" (without {rows[-1]['negated_share_without']:.3f})", flush=True)
    return rows, unconditional_mix({f"{method}@{nfe}": predicted for (method, nfe), predicted in without.items()},
                                   f"teacher@{TEACHER_STEPS}")


def unconditional_mix(predicted: dict[str, torch.Tensor], teacher: str) -> dict:
    """Per method (name -> the classifier's digits of its unconditional samples): the share of every digit and the
    total variation distance to the `teacher` entry's shares (half the L1 distance: the share of images to relabel)."""
    shares = {name: torch.bincount(digits, minlength=10).double() / len(digits) for name, digits in predicted.items()}
    return {name: {"digit_shares": [round(float(v), 5) for v in share],
                   "total_variation_to_teacher": float(0.5 * (share - shares[teacher]).abs().sum())}
            for name, share in shares.items()}


def dial_rows(pipe, evaluator, students: dict, per_digit: int, seed: int,
              renoise_ablation: bool = True) -> tuple[list[dict], list[dict], list[dict]]:
    """The guidance dial: every digit's canonical prompt at each w; distances to the teacher's images at that w.
    Returns (rows, the re-noise ablation's rows: each student with the other re-noise rule, when `renoise_ablation`,
    the ablation student's rows: students["dmd_ablation"] or students["ema_ablation"], when there is one)."""
    digits = torch.arange(10).repeat_interleave(per_digit)
    prompts = [canonical_prompt(int(d)) for d in digits]
    noise = _noise(pipe, len(prompts), seed)
    cond, empty = encode_prompts(pipe, prompts), encode_prompts(pipe, [""] * len(prompts))
    baseline = {(nfe, renoise): student_generate(students["baseline"], pipe, cond, noise, nfe, SAMPLING_SEED,
                                                 renoise=renoise)
                for nfe in STUDENT_NFES
                for renoise in (None, OTHER_RENOISE["baseline"]) if renoise is None or renoise_ablation}
    rows, ablation, ablated = [], [], []  # ablated: the ablation student's rows (dmd_ablation or ema_ablation)
    for w in DIAL:
        teacher = teacher_generate(pipe, prompts, noise, TEACHER_STEPS, w)
        rows.append(_dial_row("teacher", TEACHER_STEPS, w, teacher, evaluator, digits, None))
        for nfe in STUDENT_NFES:
            student = student_generate(students["student"], pipe, cond, noise, nfe, SAMPLING_SEED, empty, w)
            rows.append(_dial_row("student", nfe, w, student, evaluator, digits, teacher))
            rows.append(_dial_row("baseline", nfe, w, baseline[(nfe, None)], evaluator, digits, teacher))
            for name, marks in ABLATION_MARKS.items():
                if name in students:
                    images = student_generate(students[name], pipe, cond, noise, nfe, SAMPLING_SEED, empty, w)
                    row = _dial_row("student", nfe, w, images, evaluator, digits, teacher)
                    ablated.append(_ablation_row(row) | marks)
            if not renoise_ablation:
                continue
            other = {"student": student_generate(students["student"], pipe, cond, noise, nfe, SAMPLING_SEED, empty, w,
                                                 renoise=OTHER_RENOISE["student"]),
                     "baseline": baseline[(nfe, OTHER_RENOISE["baseline"])]}
            for method, images in other.items():
                ablation.append(_ablation_row(_dial_row(method, nfe, w, images, evaluator, digits, teacher))
                                | {"renoise": OTHER_RENOISE[method]})
        print("  w " + f"{w:g}: " + "  ".join(f"{r['method']}@{r['nfe']} acc {100 * r['accuracy']:.1f} "
                                             f"FD {r['frechet_to_teacher'] or 0:.1f}" for r in rows[-5:]), flush=True)
    return rows, ablation, ablated


def _dial_row(method, nfe, w, images, evaluator, digits, teacher_images) -> dict:
    return {"method": method, "nfe": nfe, "w": w, "negative": "", "negated_share": None, "negated_share_without": None,
            "accuracy": evaluator.accuracy(images, digits),
            "frechet_to_teacher": None if teacher_images is None else evaluator.frechet_distance(images, teacher_images),
            "calls_per_image": calls_per_image(method, nfe), "images": images}


def _ablation_row(row: dict) -> dict:
    """A dial row as summary.json's ablations keep it: no images, no negative-prompt columns."""
    return {k: row[k] for k in ("method", "nfe", "w", "accuracy", "frechet_to_teacher")}


def _noise(pipe, count: int, seed: int) -> torch.Tensor:
    size = pipe.unet.config.sample_size
    return torch.randn(count, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))


def goals(rows: list[dict], negative_images: int) -> dict:
    """The issue's two goals, checked on the rows (`negative_images`: images per negative row)."""
    checks: dict = {"negative": {}, "dial": {}}
    for negative in dict.fromkeys(r["negative"] for r in rows if r["negative"]):
        of = {(r["method"], r["nfe"]): r for r in rows if r["negative"] == negative}
        teacher = of[("teacher", TEACHER_STEPS)]
        removed_by_teacher = teacher["negated_share_without"] - teacher["negated_share"]
        for nfe in STUDENT_NFES:
            student = of[("student", nfe)]
            removed = student["negated_share_without"] - student["negated_share"]
            # the effect of the negative: the drop in the share of the negated digit, in points; the goal: the
            # student's drop >= 80 % of the teacher's. Beside it, the fraction of each method's own images of the digit
            # the negative removes (blind to how many of the digit each one draws without a negative)
            points_ratio = removed / removed_by_teacher if removed_by_teacher > 0 else None
            teacher_fraction = _fraction(removed_by_teacher, teacher["negated_share_without"])
            student_fraction = _fraction(removed, student["negated_share_without"])
            checks["negative"][f"{negative} @{nfe}"] = {
                "teacher_removed_points": removed_by_teacher, "student_removed_points": removed,
                "points_ratio": points_ratio,
                "points_ratio_standard_error": _ratio_standard_error(student, teacher, points_ratio, negative_images),
                "met": points_ratio is not None and points_ratio >= REMOVED_SHARE_GOAL,
                "beside_the_goal": {
                    "teacher_share_without": teacher["negated_share_without"],
                    "student_share_without": student["negated_share_without"],
                    "teacher_removed_fraction": teacher_fraction, "student_removed_fraction": student_fraction}}
    checks["dial"] = dial_checks([r for r in rows if not r["negative"]])
    checks["met"] = all(c["met"] for part in ("negative", "dial") for c in checks[part].values())
    return checks


def dial_checks(dial: list[dict], students: list[dict] | None = None) -> dict:
    """The dial's goal per step count on the rows (`students`: other student rows in place of the "student" ones):
    nearer the teacher than the baseline at every w, accuracy moving the teacher's way; beside it (not in "met"),
    the accuracy within ACCURACY_TOLERANCE of the teacher's at every w and the largest gap."""
    teacher_accuracy = {r["w"]: r["accuracy"] for r in dial if r["method"] == "teacher"}
    low, high = min(DIAL), max(DIAL)
    checks = {}
    for nfe in STUDENT_NFES:
        of = {(r["method"], r["w"]): r for r in dial if r["nfe"] == nfe}
        if students is not None:
            of |= {("student", r["w"]): r for r in students if r["nfe"] == nfe}
        nearer = {w: of[("student", w)]["frechet_to_teacher"] < of[("baseline", w)]["frechet_to_teacher"] for w in DIAL}
        accuracy = {w: of[("student", w)]["accuracy"] for w in DIAL}
        same_direction = np.sign(accuracy[high] - accuracy[low]) == np.sign(teacher_accuracy[high] - teacher_accuracy[low])
        gap = max(abs(accuracy[w] - teacher_accuracy[w]) for w in DIAL)
        checks[f"@{nfe}"] = {"nearer_than_baseline": {str(w): v for w, v in nearer.items()},
                             "accuracy_same_direction": bool(same_direction),
                             "met": all(nearer.values()) and bool(same_direction),
                             "beside_the_goal": {"accuracy_within_10_points": gap <= ACCURACY_TOLERANCE,
                                                 "largest_accuracy_gap": gap}}
    return checks


def _fraction(removed: float, without: float) -> float | None:
    return removed / without if without > 0 else None


def _ratio_standard_error(student: dict, teacher: dict, ratio: float | None, count: int) -> float | None:
    """One standard error of the points ratio R = (s_without - s_with) / (t_without - t_with), by the delta method
    with each share an independent binomial over the row's `count` images (conservative: the rows share their noise)."""
    if ratio is None:
        return None

    def variance(row: dict) -> float:
        return sum(p * (1 - p) / count for p in (row["negated_share_without"], row["negated_share"]))

    drop = teacher["negated_share_without"] - teacher["negated_share"]
    return float(np.sqrt(variance(student) + ratio**2 * variance(teacher)) / drop)


def markdown(rows: list[dict]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f} %"

    lines = ["| method | steps | UNet calls / image | w | negative | negated share (without) | accuracy | Fréchet to teacher |",
             "|---|---:|---:|---:|---|---|---:|---:|"]
    for r in rows:
        share = "-" if r["negated_share"] is None else f"{pct(r['negated_share'])} ({pct(r['negated_share_without'])})"
        fd = "-" if r["frechet_to_teacher"] is None else f"{r['frechet_to_teacher']:.1f}"
        lines.append(f"| {r['method']} | {r['nfe']} | {r['calls_per_image']} | {r['w']:g} | {r['negative'] or '-'} | "
                     f"{share} | {pct(r['accuracy'])} | {fd} |")
    return "\n".join(lines)


def write_grids(out: Path, rows: list[dict], per_digit: int) -> None:
    digits = torch.arange(10).repeat_interleave(per_digit)
    dial = [(f"{r['method']} @{r['nfe']} w {r['w']:g}", r["images"]) for r in rows
            if not r["negative"] and r["nfe"] in (TEACHER_STEPS, 4) and (r["method"] != "baseline" or r["w"] == DIAL[0])]
    write_grid(out / "grid.png", dial, digits, per_digit)
    negatives = [(f"{r['method']} @{r['nfe']} not {r['negative'].split()[-1]}", r["images"][:20]) for r in rows
                 if r["negative"]]
    write_grid(out / "negatives.png", negatives, torch.arange(10).repeat_interleave(2), 2, digit_labels=False)


def students_of_run(base: StudentSettings, ema_decay: float = 0.0, goals_only: bool = False) -> dict:
    """name -> (StudentSettings, more DistillConfig settings) of the students a run trains: the baseline, the cfg
    student (with its LoRA average when ema_decay > 0) and, unless goals_only, the ablation beside it: without the
    average when there is one ("ema_ablation"), else with the DMD weights x DMD_ABLATION_SCALE ("dmd_ablation")."""
    cfg = replace(base, guidance_range=STUDENT_GUIDANCE_RANGE)
    settings = {"baseline": (base, {}),
                "student": (cfg, {"guidance_mode": "cfg", **({"ema_decay": ema_decay} if ema_decay else {})})}
    if goals_only:
        return settings
    if ema_decay:
        settings["ema_ablation"] = (cfg, {"guidance_mode": "cfg"})
    else:
        settings["dmd_ablation"] = (cfg, {"guidance_mode": "cfg", "dmd_weights": tuple(
            DMD_ABLATION_SCALE * w for w in get_recipe("sd15").dmd_weights)})
    return settings


def main(argv: list[str] | None = None) -> dict:
    base = StudentSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-digit", type=int, default=50, help="dial: images per digit and row")
    parser.add_argument("--negative-images", type=int, default=NEGATIVE_IMAGES, help="negative prompt: images per row")
    add_total_steps_flag(parser, base.total_steps, "distillation iterations of each student")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0, help="the students' training draws and the initial noise")
    parser.add_argument("--goals-only", action="store_true",
                        help="the goals' rows only: no renoise_ablation, no ablation student (a seed replicate)")
    parser.add_argument("--ema-decay", type=float, default=0.0,
                        help="the cfg student's LoRA average (DistillConfig.ema_decay; 0: none, the default)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    pipe = load_teacher_pipeline(train_teacher(default_teacher_dir()))
    evaluator, (train, _) = load_evaluator(), load_splits()
    settings = students_of_run(replace(base, total_steps=args.total_steps, seed=args.seed), args.ema_decay,
                                args.goals_only)
    students, train_s = {}, {}
    for name, (student_settings, config) in settings.items():
        start = time.perf_counter()
        students[name], _, _ = train_student(pipe, train, student_settings, {}, desc=f"distil {name}", config=config)
        train_s[name] = time.perf_counter() - start
        print(f"  distilled {name} in {train_s[name]:.0f} s", flush=True)
    rows, unconditional = negative_rows(pipe, evaluator, students, args.negative_images, args.seed)
    dial, renoise_ablation, ablation_rows = dial_rows(pipe, evaluator, students, args.per_digit, args.seed,
                                                         renoise_ablation=not args.goals_only)
    rows += dial
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.goals_only:
        write_grids(args.out, rows, args.per_digit)
    checks = goals(rows, args.negative_images)
    table = markdown(rows)
    plain = [{k: v for k, v in r.items() if k != "images"} for r in rows]
    write_json_atomic(args.out / "results.json", plain)
    write_json_atomic(args.out / "summary.json", {
        "command": "python -P -m training.digits.guidance", "per_digit": args.per_digit,
        "negative_images": args.negative_images, "seed": args.seed, "goals_only": args.goals_only,
        "teacher_steps": TEACHER_STEPS, "negative_w": NEGATIVE_W,
        "students": {name: {**asdict(s), **config} for name, (s, config) in settings.items()},
        "train_s": train_s, "goals": checks, "unconditional": unconditional, "renoise_ablation": renoise_ablation,
        "ema_ablation" if args.ema_decay else "dmd_ablation":
            {"rows": ablation_rows, "checks": dial_checks(dial, ablation_rows)} if ablation_rows else None,
        "total_s": time.perf_counter() - started})
    write_text_atomic(args.out / "results.md", table + "\n")
    print(table)
    print("goals met:", checks["met"])
    return checks


if __name__ == "__main__":
    main()
    sys.exit(0)  # goals not met are results (results.json, summary.json), not a failed run
