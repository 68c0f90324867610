"""Quality benchmark on the digits teacher (`make bench-quality`): does Flash distillation work?

Rows (same prompts, same initial noise for every method):
  * real digits (train split)            - the floor of the metrics (no model)
  * teacher, DPM-Solver++ 50 steps, CFG  - the reference
  * teacher, DPM-Solver++ 4 and 2 steps, CFG
  * Flash student (LoRA, distill + adversarial + DMD) at 1, 2 and 4 NFE (no CFG)
  * ablations: distillation only, + adversarial (at 1, 2 and 4 NFE)
Metrics (training/digits/evaluator.py): accuracy of a digit classifier (prompt following, the CLIP-score
analogue) and the Fréchet distance of its features to the held-out real digits (the FID analogue).

Writes bench/results/quality/: images/<method>_nfe<k>/*.png, manifest.json, results.json, grid.png,
results.md; prints the markdown table.

python -m training.digits.benchmark [--total-steps N] [--per-digit N] [--no-ablations] [--teacher DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from flash_core.files import save_image_atomic, write_text_atomic
from training.digits.data import (
    canonical_prompt,
    load_splits,
    to_uint8,
    training_prompt,
)
from training.digits.evaluator import load_evaluator
from training.digits.teacher import (
    TeacherConfig,
    default_teacher_dir,
    load_teacher_pipeline,
    tokenize,
    train_teacher,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "quality"
STUDENT_NFES = (1, 2, 4)


@dataclass(frozen=True)
class StudentSettings:
    """Distillation settings of the digits students (overrides of the sd15 recipe, see DistillConfig)."""

    total_steps: int = 500  # iterations = batches: 500 student and 500 discriminator updates
    batch_size: int = 16
    lr: float = 1e-3  # a tiny model and 500 student updates: far above SD1.5's 1e-5
    lora_rank: int = 16
    guidance_range: tuple[float, float] = (2.0, 4.0)  # teacher CFG w ~ U[min, max] around the reference 3.0
    # K (SD1.5: 32): the digits teacher at 8 DPM-Solver++ steps matches its 25-step samples; modes at 0, 2, 4, 6
    teacher_grid_steps: int = 8
    seed: int = 0


# name -> per-phase weight overrides (None = the sd15 recipe's weights)
ABLATIONS: dict[str, dict[str, tuple[float, ...] | None]] = {
    "flash": {},  # distillation + adversarial + DMD: the full method (the "+DMD" ablation row)
    "ablation_distill_only": {"adversarial_weights": (0.0,) * 4, "dmd_weights": (0.0,) * 4},
    "ablation_distill_adversarial": {"dmd_weights": (0.0,) * 4},
}


@dataclass
class MethodResult:
    method: str
    label: str
    nfe: int  # sampler steps
    unet_evals: int  # UNet evaluations per image (CFG doubles them)
    guidance: float | None
    accuracy: float
    frechet_distance: float
    wall_s: float
    train_s: float | None = None
    extra: dict = field(default_factory=dict)


# ---- generation --------------------------------------------------------------------------------
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Text-encoder hidden states (N, 77, D), exactly as the SD pipeline computes them."""
    with torch.no_grad():
        return pipe.text_encoder(tokenize(pipe.tokenizer, prompts))[0]


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1]."""
    with torch.no_grad():
        return pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)


def teacher_generate(pipe, prompts: list[str], noise: torch.Tensor, steps: int, guidance: float,
                     negative_prompts: list[str] | None = None) -> torch.Tensor:
    """The teacher pipeline with DPM-Solver++ (2M, trailing spacing) and CFG (negative: the empty prompt, or
    `negative_prompts`); images in [-1, 1]."""
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"
    )
    size = noise.shape[-1] * (2 ** (len(pipe.vae.config.block_out_channels) - 1))
    with torch.no_grad():
        images = pipe(
            prompt=prompts, negative_prompt=negative_prompts, height=size, width=size, num_inference_steps=steps,
            guidance_scale=guidance, latents=noise.clone(), output_type="pt",
        ).images
    return images * 2.0 - 1.0  # pipeline returns [0, 1]


class DigitsDataset:
    """The train digits as a flash_core.run Dataset: each image's VAE posterior (mean, std) and the embeddings of
    every (template, digit) prompt. The batch of step s draws z ~ q(z|x) and one prompt template per row from
    generators seeded by (seed, s), so a batch is a function of (indices, step) like the run's batch order."""

    def __init__(self, pipe, train, seed: int):
        from flash_core.denoiser import Conditioning

        self.seed = seed
        with torch.no_grad():
            dist = pipe.vae.encode(train.images).latent_dist
        self.mean, self.std = dist.mean, dist.std
        self.scaling = float(pipe.vae.config.scaling_factor)
        self.digits = train.digits
        # every (template, digit) prompt once; batches index into the cached embeddings
        self.prompts = sorted({training_prompt(d, np.random.default_rng(i)) for d in range(10) for i in range(64)})
        self.embeds = encode_prompts(pipe, self.prompts)
        self.uncond = Conditioning(encoder_hidden_states=encode_prompts(pipe, [""]))
        self._conditioning = Conditioning

    def __len__(self) -> int:
        return self.mean.shape[0]

    def batch(self, indices, step: int):
        from flash_core.distill import Batch

        idx = torch.as_tensor(list(indices), dtype=torch.long)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        rng = np.random.default_rng([self.seed, step])
        z0 = self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=gen)  # z ~ q(z|x)
        prompt_idx = [self.prompts.index(training_prompt(int(d), rng)) for d in self.digits[idx].tolist()]
        cond = self._conditioning(encoder_hidden_states=self.embeds[prompt_idx])
        return Batch(latents=z0 * self.scaling, cond=cond, uncond=self.uncond)

    def fingerprint(self) -> str:
        from flash_core.fingerprints import tensor_fingerprint

        return tensor_fingerprint([("mean", self.mean), ("std", self.std), ("digits", self.digits), ("embeds", self.embeds)])


def student_session(pipe, train, settings: StudentSettings, weights: dict, hooks=None, config: dict | None = None):
    """The flash_core TrainingSession of one digits student over a fresh copy of the teacher UNet (diffusers backend;
    no checkpoints, no lock: the benchmark writes nothing until its results). `train`: the training split, or None
    for a session that only samples (a LoRA loaded into it). `config`: more DistillConfig settings (the ablations')."""
    try:
        from flash_core.backends.diffusers import UNetDenoiser
        from flash_core.distill import DistillConfig
        from flash_core.session import TrainingSession
    except ImportError as exc:  # the trainer is another module of this project
        raise RuntimeError(
            f"the Flash student rows need flash_core's training session and flash_core.backends.diffusers "
            f"({exc}); the teacher rows above were computed without them"
        ) from exc

    denoiser = UNetDenoiser(
        copy.deepcopy(pipe.unet), prediction_type=pipe.scheduler.config.prediction_type,
        alphas_cumprod=pipe.scheduler.alphas_cumprod.double(),
    )
    config = DistillConfig(
        backbone="sd15", total_steps=settings.total_steps, seed=settings.seed, batch_size=settings.batch_size,
        lora_rank=settings.lora_rank, lora_alpha=settings.lora_rank, lr=settings.lr,
        guidance_range=settings.guidance_range, teacher_grid_steps=settings.teacher_grid_steps,
        distill_loss="l2", **{k: v for k, v in weights.items() if v is not None}, **(config or {}),
    )
    dataset = DigitsDataset(pipe, train, settings.seed) if train is not None else None
    return TrainingSession(denoiser, config, dataset, hooks=hooks, device="cpu")


class BarHooks:
    """flash_core.run hooks: a tqdm bar with the recent distillation loss and the phase."""

    def __init__(self, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, leave=False)
        self.recent: list[float] = []

    def on_step(self, report) -> None:
        self.bar.update(1)
        self.recent = ([*self.recent, report.logs["loss_distill"]])[-10:]
        if report.step % 10 == 0:
            self.bar.set_postfix(distill=f"{np.mean(self.recent):.4f}", phase=int(report.logs["phase"]))

    def should_stop(self) -> bool:
        return False


def train_student(pipe, train, settings: StudentSettings, weights: dict, desc: str, config: dict | None = None):
    """Distil one student through its TrainingSession; returns (distiller, seconds, last losses)."""
    hooks = BarHooks(settings.total_steps, desc)
    session = student_session(pipe, train, settings, weights, hooks, config)
    start = time.perf_counter()
    try:
        session.train()
    finally:
        hooks.bar.close()
    seconds = time.perf_counter() - start
    history = session.history
    tail = history[-max(1, settings.total_steps // 10):]
    summary = {k: float(np.mean([h[k] for h in tail if k in h])) for k in tail[-1] if k.startswith("loss")}
    summary["teacher_s_per_step"] = float(np.mean([h["teacher_s"] for h in history]))
    return session.distiller, seconds, summary


def student_generate(distiller, pipe, cond_embeds: torch.Tensor, noise: torch.Tensor, nfe: int, seed: int,
                     negative_embeds: torch.Tensor | None = None, guidance: float = 1.0, renoise: str | None = None):
    """Few-step student latents (flash_core's sampler on the trailing grid), decoded; with `negative_embeds`, the
    student's CFG at `guidance` (a student of guidance mode "cfg"). renoise: None = its guidance mode's rule."""
    from flash_core.denoiser import Conditioning

    generator = torch.Generator().manual_seed(seed)
    negative = Conditioning(encoder_hidden_states=negative_embeds) if negative_embeds is not None else None
    latents = distiller.student_sample(noise, Conditioning(encoder_hidden_states=cond_embeds), nfe, generator,
                                       negative=negative, guidance=guidance, renoise=renoise)
    return decode(pipe, latents)


# ---- output -------------------------------------------------------------------------------------
def write_pngs(out: Path, method: str, nfe: int, images: torch.Tensor, prompts, digits, manifest: list) -> None:
    from PIL import Image

    folder = out / "images" / f"{method}_nfe{nfe}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (pixels, prompt, digit) in enumerate(zip(to_uint8(images), prompts, digits.tolist())):
        name = folder / f"{i:04d}_d{digit}.png"
        save_image_atomic(Image.fromarray(pixels), name)
        manifest.append({"file": str(name.relative_to(out)), "prompt": prompt, "digit": int(digit),
                         "method": method, "nfe": int(nfe)})


def write_grid(path: Path, rows: list[tuple[str, torch.Tensor]], digits: torch.Tensor, per_digit: int,
               samples: int = 2, scale: int = 4, digit_labels: bool = True) -> None:
    """One row per method; columns: the first `samples` images of each digit, upscaled `scale`x (digit_labels:
    the digit above each column)."""
    from PIL import Image, ImageDraw

    columns = [int(d) * per_digit + s for d in range(10) for s in range(min(samples, per_digit))]
    cell = rows[0][1].shape[-1] * scale
    label_w, pad = 230, 2
    grid = Image.new("RGB", (label_w + len(columns) * (cell + pad), len(rows) * (cell + pad) + 16), "white")
    draw = ImageDraw.Draw(grid)
    for c, index in enumerate(columns if digit_labels else []):
        draw.text((label_w + c * (cell + pad) + cell // 3, 2), str(int(digits[index])), fill="black")
    for r, (label, images) in enumerate(rows):
        y = 16 + r * (cell + pad)
        draw.text((4, y + cell // 3), label, fill="black")
        pixels = to_uint8(images[columns])
        for c, tile in enumerate(pixels):
            img = Image.fromarray(tile).resize((cell, cell), Image.NEAREST)
            grid.paste(img, (label_w + c * (cell + pad), y))
    save_image_atomic(grid, path)


def write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))  # no trailing newline: the committed results as they are


def markdown_table(results: list[MethodResult]) -> str:
    lines = [
        "| method | NFE (steps) | UNet evals / image | CFG | accuracy | Fréchet distance | wall time (s) | train time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.label} | {r.nfe} | {r.unet_evals} | {'-' if r.guidance is None else f'{r.guidance:g}'} | "
            f"{100 * r.accuracy:.1f} % | {r.frechet_distance:.1f} | {r.wall_s:.1f} | "
            f"{'-' if r.train_s is None else f'{r.train_s:.0f}'} |"
        )
    return "\n".join(lines)


def goal_checks(results: list[MethodResult]) -> dict:
    """The benchmark's goal: 2-NFE student within 1.25x of the reference distance and 5 points of its
    accuracy, while the teacher at 2 steps is clearly worse (distance above 1.25x the reference)."""
    by_key = {(r.method, r.nfe): r for r in results}
    ref = next((r for r in results if r.method == "teacher_reference"), None)
    student, teacher2 = by_key.get(("flash", 2)), by_key.get(("teacher_dpmpp", 2))
    if ref is None or student is None or teacher2 is None:
        return {"complete": False}
    return {
        "complete": True,
        "student_2nfe_distance_ratio": student.frechet_distance / max(ref.frechet_distance, 1e-9),
        "student_2nfe_accuracy_gap_points": 100 * (ref.accuracy - student.accuracy),
        "teacher_2nfe_distance_ratio": teacher2.frechet_distance / max(ref.frechet_distance, 1e-9),
        "student_within_1.25x_distance": student.frechet_distance <= 1.25 * ref.frechet_distance,
        "student_within_5_points_accuracy": ref.accuracy - student.accuracy <= 0.05,
        "teacher_2nfe_clearly_worse": teacher2.frechet_distance > 1.25 * ref.frechet_distance,
    }


# ---- main ---------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    out: Path = args.out
    started = time.perf_counter()
    teacher_config = TeacherConfig(steps=args.teacher_steps, vae_steps=args.teacher_vae_steps, seed=args.seed)
    start = time.perf_counter()
    teacher_dir = train_teacher(args.teacher, teacher_config)
    teacher_prep_s = time.perf_counter() - start
    pipe = load_teacher_pipeline(teacher_dir)
    teacher_info = json.loads((Path(teacher_dir) / "flash_digits_teacher.json").read_text())
    evaluator = load_evaluator()
    train, held_out = load_splits()

    digits = torch.arange(10).repeat_interleave(args.per_digit)
    prompts = [canonical_prompt(int(d)) for d in digits]
    latent_size = pipe.unet.config.sample_size
    noise = torch.randn(len(prompts), pipe.unet.config.in_channels, latent_size, latent_size,
                        generator=torch.Generator().manual_seed(args.seed))
    cond_embeds = encode_prompts(pipe, prompts)

    shutil.rmtree(out / "images", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    manifest: list[dict] = []
    results: list[MethodResult] = []
    grid_rows: list[tuple[str, torch.Tensor]] = []

    def record(method, label, nfe, unet_evals, guidance, images, wall_s, train_s=None, extra=None, png=True):
        result = MethodResult(method, label, nfe, unet_evals, guidance, evaluator.accuracy(images, digits),
                              evaluator.frechet_distance(images, held_out.images), wall_s, train_s, extra or {})
        results.append(result)
        grid_rows.append((f"{label} @{nfe}" if nfe else label, images))
        if png:
            write_pngs(out, method, nfe, images, prompts, digits, manifest)
        print(f"  {label:<34} nfe {nfe:>2}: accuracy {100 * result.accuracy:5.1f} %  "
              f"Fréchet {result.frechet_distance:7.1f}  ({wall_s:.1f} s)", flush=True)
        return result

    # Real digits: the metrics' floor (same digit counts from the train split).
    real_idx = torch.cat([torch.nonzero(train.digits == d).flatten()[: args.per_digit] for d in range(10)])
    record("real_train", "real digits (train split)", 0, 0, None, train.images[real_idx], 0.0, png=False)

    w = args.guidance
    for method, label, steps in (("teacher_reference", "teacher DPM-Solver++ (reference)", args.reference_steps),
                                 ("teacher_dpmpp", "teacher DPM-Solver++", 4),
                                 ("teacher_dpmpp", "teacher DPM-Solver++", 2)):
        start = time.perf_counter()
        images = teacher_generate(pipe, prompts, noise, steps, w)
        record(method, label, steps, 2 * steps, w, images, time.perf_counter() - start)

    settings = StudentSettings(total_steps=args.total_steps, batch_size=args.student_batch, lr=args.student_lr,
                               lora_rank=args.lora_rank, guidance_range=tuple(args.student_guidance),
                               teacher_grid_steps=args.teacher_grid, seed=args.seed)
    student_error = None
    ablations = ABLATIONS if args.ablations else {"flash": ABLATIONS["flash"]}
    labels = {"flash": "Flash student (distill+adv+DMD)", "ablation_distill_only": "ablation: distillation only",
              "ablation_distill_adversarial": "ablation: distill + adversarial"}
    for method, weights in ablations.items():
        try:
            distiller, train_s, losses = train_student(pipe, train, settings, weights, desc=f"distil {method}")
        except RuntimeError as exc:
            if "flash_core" not in str(exc):
                raise
            student_error = str(exc)
            print(f"FAILED: student rows not computed: {exc}", flush=True)
            break
        print(f"  distilled {method} in {train_s:.0f} s: {losses}", flush=True)
        for nfe in STUDENT_NFES:
            start = time.perf_counter()
            images = student_generate(distiller, pipe, cond_embeds, noise, nfe, args.seed + 1)
            record(method, labels[method], nfe, nfe, None, images, time.perf_counter() - start, train_s, losses)

    write_json(out / "manifest.json", manifest)
    write_grid(out / "grid.png", grid_rows, digits, args.per_digit)
    table = markdown_table(results)
    summary = {
        "settings": {
            "per_digit": args.per_digit, "images_per_method": len(prompts), "seed": args.seed,
            "teacher_guidance": w, "reference_steps": args.reference_steps, "student": asdict(settings),
            "reference_set": f"held-out real digits ({len(held_out)})",
        },
        "teacher": {"folder": str(teacher_dir), **teacher_info, "prepare_s": teacher_prep_s},
        "evaluator": {"held_out_accuracy": evaluator.held_out_accuracy},
        "methods": [asdict(r) for r in results],
        "goal": goal_checks(results),
        "student_error": student_error,
        "total_s": time.perf_counter() - started,
    }
    write_json(out / "results.json", summary)
    write_text_atomic(out / "results.md", table + "\n")
    print()
    print(table)
    print()
    print("goal:", json.dumps(summary["goal"]))
    print(f"benchmark total {summary['total_s']:.0f} s; outputs in {out}")
    if student_error is not None:
        raise SystemExit(f"bench-quality: the student rows failed: {student_error}")
    return summary


class _DeprecatedFlag(argparse.Action):
    """Stores the value; when given under its old name, says the new one (one warning on stderr)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string != self.option_strings[0]:
            print(f"{parser.prog}: warning: {option_string} is deprecated, use {self.option_strings[0]}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_total_steps_flag(parser: argparse.ArgumentParser, default: int, what: str) -> None:
    """--total-steps N (training iterations, DistillConfig.total_steps); --student-steps is its old name."""
    parser.add_argument("--total-steps", "--student-steps", dest="total_steps", type=int, default=default,
                        action=_DeprecatedFlag, help=f"{what} (--student-steps: deprecated name)")


def parse_args(argv=None) -> argparse.Namespace:
    s = StudentSettings()
    p = argparse.ArgumentParser(description="Flash quality benchmark on the digits teacher")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--teacher", type=Path, default=default_teacher_dir(), help="teacher pipeline folder (cached)")
    p.add_argument("--teacher-steps", type=int, default=TeacherConfig.steps)
    p.add_argument("--teacher-vae-steps", type=int, default=TeacherConfig.vae_steps)
    p.add_argument("--per-digit", type=int, default=20, help="images per digit and method")
    p.add_argument("--guidance", type=float, default=3.0, help="teacher CFG scale of the teacher rows")
    p.add_argument("--reference-steps", type=int, default=50)
    add_total_steps_flag(p, s.total_steps, "distillation iterations of each student")
    p.add_argument("--student-batch", type=int, default=s.batch_size)
    p.add_argument("--student-lr", type=float, default=s.lr)
    p.add_argument("--lora-rank", type=int, default=s.lora_rank)
    p.add_argument("--student-guidance", type=float, nargs=2, default=list(s.guidance_range))
    p.add_argument("--teacher-grid", type=int, default=s.teacher_grid_steps, help="K of the teacher solver")
    p.add_argument("--no-ablations", dest="ablations", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
