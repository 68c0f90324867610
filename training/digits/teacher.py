"""Train a small latent text-to-image teacher on the digits and save it as a real diffusers pipeline.

The folder has the StableDiffusionPipeline.save_pretrained layout (unet/, vae/, text_encoder/,
tokenizer/, scheduler/, model_index.json) so StableDiffusionPipeline.from_pretrained(dir) loads it
offline, and every part is the standard SD1 component at a tiny size:
  * tokenizer: the real CLIP BPE tokenizer (vocab 49408, 77 tokens), read from ComfyUI's sd1_tokenizer;
  * text encoder: a 2-layer CLIPTextModel, hidden size 64 (= the UNet's cross_attention_dim);
  * VAE: AutoencoderKL (32, 64) channels, 4 latent channels, 16x16 RGB -> 8x8 latent;
  * UNet: UNet2DConditionModel (32, 64) channels, epsilon prediction;
  * scheduler: DDPMScheduler, scaled_linear betas 0.00085..0.012, 1000 steps (the SD1.5 schedule).

Training: the VAE first (reconstruction + small KL); a short pre-training of the text encoder so prompts of
different digits get different embeddings (a stand-in for CLIP's own pre-training); then the UNet and the
text encoder together on the epsilon MSE with 10 % of prompts dropped to "" (classifier-free guidance).

The default teacher ships with the pack (`training/digits/shipped_teacher/`: fp16 weights, configs, its recipe
and a provenance file, no tokenizer: that comes from ComfyUI): `train_teacher` installs it into the cache in
seconds instead of training it (about 10 minutes on 2 cores). `make teacher` retrains it with the same recipe and
seed and replaces the shipped files (`--ship`).

CLI: python -m training.digits.teacher --out DIR [--steps N] [--vae-steps N] [--seed S] [--force] [--ship]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flash_core.files import OutputLock, replace_folder_atomic, staging_folder
from training.fixtures.comfy_env import cache_dir, comfyui_path
from training.digits.data import (
    DIGIT_WORDS,
    IMAGE_CHANNELS,
    IMAGE_SIZE,
    PROMPT_TEMPLATES,
    load_splits,
    training_prompt,
)

TEXT_HIDDEN_SIZE = 64
LATENT_CHANNELS = 4
PROMPT_DROPOUT = 0.1  # fraction of training prompts replaced by "" (the CFG unconditional)
INFO_FILE = "flash_digits_teacher.json"
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped_teacher"  # the default teacher, as the pack ships it
PROVENANCE_FILE = "provenance.json"
WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors")
CONFIG_FILES = ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
                "text_encoder/config.json", INFO_FILE)


@dataclass(frozen=True)
class TeacherConfig:
    """Everything that determines the trained teacher (the cache key of its folder)."""

    steps: int = 1000  # UNet + text encoder optimiser steps
    vae_steps: int = 200
    text_steps: int = 100  # text-encoder pre-training steps (all 41 prompts per step)
    batch_size: int = 64
    lr: float = 1e-3
    vae_lr: float = 2e-3
    seed: int = 0


def default_teacher_dir() -> Path:
    return cache_dir() / "digits" / "teacher"


def load_tokenizer():
    """The standard SD1 CLIP tokenizer, from the copy that ships inside ComfyUI (no download)."""
    from transformers import CLIPTokenizer

    folder = comfyui_path() / "comfy" / "sd1_tokenizer"
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        raise FileNotFoundError(
            f"CLIP tokenizer files not found in {folder} (vocab.json, merges.txt). "
            "Run `make setup` or point COMFYUI_PATH at a ComfyUI checkout."
        )
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    tokenizer.model_max_length = 77  # SD1: 75 tokens + BOS + EOS
    return tokenizer


def build_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=IMAGE_CHANNELS,
        out_channels=IMAGE_CHANNELS,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def build_text_encoder(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=4 * TEXT_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=TEXT_HIDDEN_SIZE,
    )
    return CLIPTextModel(config)


def build_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=4,  # diffusers' legacy name: the number of attention heads
        norm_num_groups=32,
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Prompts -> (N, 77) token ids, padded with EOS exactly as the SD pipeline and ComfyUI do."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def train_vae(vae, images: torch.Tensor, config: TeacherConfig, kl_weight: float = 1e-4) -> list[float]:
    """Reconstruction MSE + kl_weight * KL on the training images."""
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    losses = []
    vae.train()
    for _ in tqdm(range(config.vae_steps), desc="teacher: VAE", leave=False):
        idx = torch.randint(0, images.shape[0], (config.batch_size,), generator=gen)
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        # ELBO-style VAE objective: ||x - D(z)||^2 + beta * KL(q(z|x) || N(0, I)) per latent element
        loss = F.mse_loss(recon, x) + kl_weight * posterior.kl().mean() / posterior.mean[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    vae.eval()
    return losses


@torch.no_grad()
def encode_posteriors(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled latents)."""
    means, stds = [], []
    for start in range(0, images.shape[0], batch):
        dist = vae.encode(images[start : start + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def pretrain_text_encoder(text_encoder, tokenizer, config: TeacherConfig) -> float:
    """Stand-in for CLIP's contrastive pre-training: make the prompt embeddings tell the digits apart.

    A throw-away linear probe on the mean token state classifies every training prompt (and "") into
    11 classes; without this a randomly initialised text encoder gives nearly identical embeddings for all
    prompts and the UNet learns an unconditional model first. Returns the probe's final accuracy.
    """
    prompts, labels = [""], [10]
    for digit, word in enumerate(DIGIT_WORDS):
        for template in PROMPT_TEMPLATES:
            prompts.append(template.format(word=word))
            labels.append(digit)
    ids, labels_t = tokenize(tokenizer, prompts), torch.tensor(labels)
    torch.manual_seed(config.seed + 2)
    probe = torch.nn.Linear(text_encoder.config.hidden_size, 11)
    opt = torch.optim.AdamW(list(text_encoder.parameters()) + list(probe.parameters()), lr=config.lr)
    text_encoder.train()
    for _ in tqdm(range(config.text_steps), desc="teacher: text encoder", leave=False):
        logits = probe(text_encoder(ids)[0].mean(dim=1))  # probe on the mean of the 77 token states
        loss = F.cross_entropy(logits, labels_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    text_encoder.eval()
    return float((logits.argmax(1) == labels_t).float().mean())


def train_denoiser(unet, text_encoder, tokenizer, scheduler, latent_mean, latent_std, scaling_factor, digits,
                   config: TeacherConfig) -> list[float]:
    """Epsilon-prediction MSE on VAE latents, jointly training the text encoder; 10 % empty prompts."""
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(config.seed + 1)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    warmup = max(1, config.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / config.steps)))
    )
    alphas_cumprod = scheduler.alphas_cumprod
    losses = []
    unet.train()
    text_encoder.train()
    bar = tqdm(range(config.steps), desc="teacher: UNet + text encoder", leave=False)
    for _ in bar:
        idx = torch.randint(0, latent_mean.shape[0], (config.batch_size,), generator=gen)
        prompts = [
            "" if rng.random() < PROMPT_DROPOUT else training_prompt(int(d), rng) for d in digits[idx].tolist()
        ]
        ids = tokenize(tokenizer, prompts)
        # z0 ~ q(z|x), scaled to unit variance as SD does (latents * scaling_factor)
        z0 = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)) * scaling_factor
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (z0.shape[0],), generator=gen)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise  # forward process q(z_t | z_0)
        context = text_encoder(ids)[0]
        eps_pred = unet(z_t, t, context).sample
        loss = F.mse_loss(eps_pred, noise)  # epsilon-prediction objective (DDPM simple loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if len(losses) % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
    unet.eval()
    text_encoder.eval()
    return losses


def is_complete(out: Path, config: TeacherConfig | None = None) -> bool:
    """True when `out` holds a finished teacher (trained with `config`, if given)."""
    info_path = Path(out) / INFO_FILE
    if not info_path.is_file() or not (Path(out) / "model_index.json").is_file():
        return False
    if config is None:
        return True
    info = json.loads(info_path.read_text())
    return info.get("config") == asdict(config)


def train_teacher(out: Path | str, config: TeacherConfig = TeacherConfig(), force: bool = False) -> Path:
    """Train (or reuse) the teacher in `out`; written to a ".tmp-" folder next to it, moved in when complete.
    One build at a time per folder of teachers: a second caller (the e2e tests' fixture while `make test` trains
    the teacher in the background) waits for the first, then reuses what it built."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def waiting(holder: str) -> None:
        print(f"teacher: waiting for {holder} to finish {out}", flush=True)

    with OutputLock(out.parent, what=f"training the digits teacher {out.name}", wait=True, on_wait=waiting):
        if not force and is_complete(out, config):
            print(f"teacher: {out} is complete, reusing it (pass --force to retrain)")
            return out
        if not force and shipped_config() == config:
            return install_shipped(out)
        return _train_teacher(out, config)


def shipped_config() -> TeacherConfig | None:
    """The recipe of the teacher that ships with the pack (None when the pack has none)."""
    info = SHIPPED_DIR / INFO_FILE
    if not info.is_file():
        return None
    return TeacherConfig(**json.loads(info.read_text())["config"])


def install_shipped(out: Path) -> Path:
    """The shipped teacher as a complete pipeline folder in `out`: float32 weights (the shipped fp16 values,
    exactly), its configs, and ComfyUI's SD1 CLIP tokenizer; built in a staging folder, moved in whole."""
    tmp = _staged_copy(SHIPPED_DIR, out, torch.float32)
    load_tokenizer().save_pretrained(str(tmp / "tokenizer"))
    replace_folder_atomic(tmp, out)
    print(f"teacher: installed the shipped digits teacher into {out}")
    return out


def ship_teacher(folder: Path, command: str) -> Path:
    """Write the trained teacher in `folder` as the shipped one: fp16 weights, configs, provenance (recipe, seed,
    command, versions, sha256 of every file). Staged, then moved in whole over SHIPPED_DIR."""
    import platform

    tmp = _staged_copy(folder, SHIPPED_DIR, torch.float16)
    info = json.loads((folder / INFO_FILE).read_text())
    provenance = {
        "what": "the digits teacher of `make demo`, the digits benchmarks and the end-to-end tests, shipped so no "
                "run trains it; weights stored fp16 (installed as float32 copies of the same values)",
        "recipe": info["config"],
        "seed": info["config"]["seed"],
        "command": command,
        "retrain": "make teacher",
        "trained_on": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "training_time_s": info.get("timings_s"),
        "final_unet_loss": info.get("final_unet_loss"),
        "sha256": {name: _sha256(tmp / name) for name in (*WEIGHT_FILES, *CONFIG_FILES)},
    }
    (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    replace_folder_atomic(tmp, SHIPPED_DIR)
    print(f"teacher: shipped as {SHIPPED_DIR}")
    return SHIPPED_DIR


def _staged_copy(source: Path, final: Path, dtype: torch.dtype) -> Path:
    """The staging folder of `final` holding `source`'s configs and its weights cast to `dtype` (fp16 to ship,
    float32 to install: fp16 -> float32 is exact), ready for replace_folder_atomic."""
    from safetensors.torch import load_file, save_file

    tmp = staging_folder(final)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    for name in CONFIG_FILES:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, tmp / name)
    for name in WEIGHT_FILES:
        tensors = {k: v.to(dtype).contiguous() for k, v in load_file(str(source / name)).items()}
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
    return tmp


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train_teacher(out: Path, config: TeacherConfig) -> Path:
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(config.seed)
    train, _ = load_splits()
    tokenizer = load_tokenizer()
    timings = {}

    start = time.perf_counter()
    vae = build_vae(config.seed)
    vae_losses = train_vae(vae, train.images, config)
    latent_mean, latent_std = encode_posteriors(vae, train.images)
    # SD convention: scale latents to unit standard deviation before diffusion
    scaling_factor = float(1.0 / torch.sqrt(latent_mean.var() + (latent_std**2).mean()))
    vae.register_to_config(scaling_factor=scaling_factor)
    timings["vae_s"] = time.perf_counter() - start

    start = time.perf_counter()
    scheduler = build_scheduler()
    unet = build_unet(config.seed)
    text_encoder = build_text_encoder(config.seed)
    text_probe_accuracy = pretrain_text_encoder(text_encoder, tokenizer, config)
    unet_losses = train_denoiser(
        unet, text_encoder, tokenizer, scheduler, latent_mean, latent_std, scaling_factor, train.digits, config
    )
    timings["unet_s"] = time.perf_counter() - start

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    tmp = staging_folder(out)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    pipe.save_pretrained(tmp, safe_serialization=True)
    info = {
        "config": asdict(config),
        "image_size": IMAGE_SIZE,
        "image_channels": IMAGE_CHANNELS,
        "vae_scaling_factor": scaling_factor,
        "text_probe_accuracy": text_probe_accuracy,
        "final_vae_loss": float(np.mean(vae_losses[-20:])),
        "final_unet_loss": float(np.mean(unet_losses[-50:])),
        "timings_s": timings,
    }
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    replace_folder_atomic(tmp, out)  # a previous teacher in `out` stays until the new one is complete
    print(f"teacher: saved to {out} (VAE {timings['vae_s']:.0f} s, UNet {timings['unet_s']:.0f} s, "
          f"final loss {info['final_unet_loss']:.4f})")
    return out


def load_teacher_pipeline(folder: Path | str):
    """StableDiffusionPipeline.from_pretrained on a teacher folder, offline, float32, CPU."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    if not is_complete(folder):
        raise FileNotFoundError(
            f"no finished digits teacher in {folder}: run `python -m training.digits.teacher --out {folder}`"
        )
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=default_teacher_dir(), help="pipeline folder to write")
    parser.add_argument("--steps", type=int, default=TeacherConfig.steps, help="UNet + text encoder steps")
    parser.add_argument("--vae-steps", type=int, default=TeacherConfig.vae_steps, help="VAE steps")
    parser.add_argument("--batch-size", type=int, default=TeacherConfig.batch_size)
    parser.add_argument("--seed", type=int, default=TeacherConfig.seed)
    parser.add_argument("--fast", action="store_true", help="a few steps only (tests, smoke runs)")
    parser.add_argument("--force", action="store_true", help="retrain even if --out is complete")
    parser.add_argument("--ship", action="store_true",
                        help=f"then write it as the teacher the pack ships ({SHIPPED_DIR.relative_to(SHIPPED_DIR.parents[2])})")
    args = parser.parse_args(argv)
    if args.fast:
        config = TeacherConfig(steps=min(args.steps, 20), vae_steps=min(args.vae_steps, 10), text_steps=5,
                               batch_size=16, seed=args.seed)
    else:
        config = TeacherConfig(steps=args.steps, vae_steps=args.vae_steps, batch_size=args.batch_size, seed=args.seed)
    out = train_teacher(args.out, config, force=args.force)
    if args.ship:
        ship_teacher(out, "python -m training.digits.teacher " + " ".join(argv if argv is not None else sys.argv[1:]))
    return out


if __name__ == "__main__":
    main()
