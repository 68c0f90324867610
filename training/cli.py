"""flash-distill: distil a Flash Diffusion LoRA student from a diffusers teacher, headless, on accelerate.

    flash-distill --config training/configs/sd15.yaml            # one process (GPU if there is one)
    flash-distill --config training/configs/sd15.yaml --resume   # continue from the latest checkpoint
    flash-distill cache-targets --config training/configs/sd15.yaml [--verify N]   # teacher targets, once
    flash-distill --config training/configs/sd15.yaml --target-cache DIR           # train on them
    accelerate launch --multi_gpu --num_processes 4 -m training.cli --config training/configs/sdxl.yaml
    accelerate launch --multi_gpu --num_machines 2 --machine_rank R --main_process_ip IP --main_process_port 29500 \\
        --num_processes 16 -m training.cli --config ...           # multi-node (output_dir on a shared disk)

Without a GPU, `accelerate launch --multi_gpu --num_processes 2 -m training.cli ...` runs two CPU processes
over gloo (the tests do this). Data parallel is DDP-style: every rank holds the frozen teacher and the same
LoRA, draws its own slice of each global batch and its own noise; gradients of the trainable parameters
(LoRA, discriminator head) are averaged across ranks before each optimiser step (`GradientAverager`), so
every rank applies the identical update. Ctrl-C (SIGINT) or SIGTERM on any rank: all ranks finish the
step, save a checkpoint and exit 130 (under `accelerate launch`, torchrun forwards the signal and waits
30 s before killing). Multi-node: `output_dir` must be on a filesystem every node sees. 
FSDP / DeepSpeed: not used, and refused at start with a clear message. The trainable part is small (LoRA +
discriminator head, <= 110M parameters) and the frozen network is shared by teacher and student, so there is
nothing worth sharding; data parallel is what the paper used. For memory on big teachers use
`mixed_precision: bf16` (the frozen network is then held in bf16) and `distill: {grad_checkpointing: true}`.

The config is YAML (training/configs/*.yaml documents every key). Errors in it, a missing model folder or
an empty / corrupt dataset stop the run at once with exit code 2 and one line naming the key or file; so does
`--resume` from a checkpoint made with other settings, another teacher or other data (the line lists every
difference; `--allow-changes` continues anyway). A non-finite loss, gradient or training latent stops the run
before the optimiser step with one line naming the step and the likely cause, exit code 3; the checkpoints
already written are kept and nothing is exported.

Target cache (flash_core.target_cache): `flash-distill cache-targets` solves the teacher targets of every student
update of the run the config describes (for `--processes N` processes) in large no-grad batches
(`--teacher-batch`; default from the free GPU memory) into the folder `target_cache` (config key or
`--target-cache`; default output_dir/target-cache). A killed build is finished by running it again; `--verify N`
re-solves N random batches and compares (exit 5 on a mismatch). Training with `--target-cache DIR` (or the
config key) reads the targets instead of solving; a cache of other settings / teacher / data refuses with every
difference (exit 2). The targets do not depend on the student: other lr, rank or loss weights share a cache.

The loop, batch order, checkpoint format, preview rule and export are flash_core.run's (the ComfyUI node
drives the same run). Outputs under `output_dir`:
    config.yaml                      the resolved config of the run
    cache/latents-<hash>.safetensors the dataset, VAE- and text-encoded once
    checkpoints/step-000500/         flash_core.run checkpoint: state.pt (settings, fingerprints, trainer incl.
                                     optimisers and discriminator, step log), rank-<r>.pt (RNG), meta.json
    losses.jsonl                     one JSON line of losses every `log_every` steps
    samples/step-000500.png          rows teacher | student 1 | 2 | 4 steps, one column per sample prompt
    export/<name>_comfyui.safetensors  ComfyUI-native LoRA (kohya keys; SD3 / PixArt: transformer.*): copy into ComfyUI/models/loras
    export/diffusers/pytorch_lora_weights.safetensors  diffusers load_lora_weights format (not for pixart)
    export/peft/adapter_model.safetensors + adapter_config.json  PEFT format
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flash_core.files import write_atomic, write_text_atomic

if TYPE_CHECKING:  # heavy imports happen inside functions: `flash-distill --help` stays instant
    import torch

EXIT_CONFIG_ERROR = 2
EXIT_NON_FINITE = 3  # a non-finite loss / gradient / latent stopped the run (flash_core.run.NonFiniteError)
EXIT_WRITE_ERROR = 4  # a checkpoint or export could not be written (full disk, permissions); earlier ones are kept
EXIT_VERIFY_FAILED = 5  # cache-targets --verify: stored targets differ from a fresh solve
EXIT_INTERRUPTED = 130

BACKBONES = ("sd15", "sdxl", "pixart", "sd3")


class ConfigError(ValueError):
    """A problem with the run's config (or command line); the message names the key and what to do."""


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

# key -> (default, description). `None` as default means "the recipe's value" for recipe-backed keys.
TOP_LEVEL_KEYS = {
    "backbone": "sd15 | sdxl | pixart | sd3: picks the recipe (rank, alpha, targets, guidance, loss weights)",
    "model": "a local diffusers pipeline folder, or a mapping {path: ...} / {random_tiny: true}",
    "data": "mapping: path, kind, captions, image_column, text_column, split, resolution, max_items, cache_dir",
    "output_dir": "where checkpoints, samples, losses.jsonl and the exported LoRA go",
    "steps": "optimiser steps of the student in all (the four phases split them equally)",
    "batch_size": "images per process per step (default: the recipe's)",
    "lr": "AdamW learning rate of student and discriminator (default: the recipe's)",
    "rank": "LoRA rank (default: the recipe's)",
    "alpha": "LoRA alpha (default: the recipe's)",
    "seed": "seed of LoRA init, data order and noise",
    "mixed_precision": "no | bf16 (the trainer's autocast; the frozen teacher is then held in bf16)",
    "checkpoint_every": "save a resumable checkpoint every N steps (0: only at the end and on Ctrl-C)",
    "keep_checkpoints": "how many recent checkpoints to keep",
    "sample_every": "write a sample grid every N steps (0: never)",
    "sample_prompts": "prompts of the sample grid (default: the first dataset captions)",
    "sample_steps": "student step counts in the grid (default [1, 2, 4])",
    "teacher_sample_steps": "solver steps of the teacher column of the grid",
    "teacher_guidance": "CFG scale of the teacher column of the grid",
    "log_every": "append losses to losses.jsonl every N steps",
    "export": "list of LoRA formats written at the end: comfyui, diffusers, peft",
    "export_name": "file name stem of the exported LoRA",
    "distill": "mapping of flash_core DistillConfig overrides (e.g. teacher_grid_steps, loss weights)",
    "target_cache": "folder of precomputed teacher targets (flash-distill cache-targets); training reads them",
}
MODEL_KEYS = {"path", "random_tiny", "tiny_seed"}
DATA_KEYS = {"path", "kind", "captions", "image_column", "text_column", "split", "resolution", "max_items", "cache_dir", "encode_batch_size"}


@dataclass
class TrainConfig:
    """A validated flash-distill config (paths resolved against the current directory)."""

    source: Path
    backbone: str
    model_path: Path | None
    random_tiny: bool
    tiny_seed: int
    data_path: Path
    data_kind: str
    captions: Path | None
    image_column: str
    text_column: str
    split: str | None
    resolution: int
    max_items: int | None
    cache_dir: Path
    encode_batch_size: int
    output_dir: Path
    steps: int
    batch_size: int | None
    lr: float | None
    rank: int | None
    alpha: float | None
    seed: int
    mixed_precision: str
    checkpoint_every: int
    keep_checkpoints: int
    sample_every: int
    sample_prompts: list[str] | None
    sample_steps: list[int]
    teacher_sample_steps: int
    teacher_guidance: float | None
    log_every: int
    export: list[str]
    export_name: str
    distill: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    target_cache: Path | None = None


def _where(source: Path, key: str) -> str:
    return f"{source}: {key}"


def _int(source: Path, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{_where(source, key)} must be an integer >= {minimum}, got {value!r}")
    return value


def _float(source: Path, key: str, value: Any, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (positive and value <= 0):
        raise ConfigError(f"{_where(source, key)} must be a {'positive ' if positive else ''}number, got {value!r}")
    return float(value)


def _str(source: Path, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{_where(source, key)} must be a non-empty string, got {value!r}")
    return value


def _unknown_keys(source: Path, section: str, mapping: dict, known) -> None:
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        name = f"{section}.{unknown[0]}" if section else unknown[0]
        raise ConfigError(f"{source}: unknown key '{name}' (known keys{' of ' + section if section else ''}: {', '.join(sorted(known))})")


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read and validate a flash-distill YAML config; raises ConfigError with a one-line message."""
    import yaml

    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"config file {source} does not exist")
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{where}: not valid YAML ({getattr(error, 'problem', None) or error})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping of keys to values")
    return validate_config(raw, source)


def validate_config(raw: dict[str, Any], source: Path) -> TrainConfig:
    """Check every key of a parsed config; unknown keys, missing paths and bad values raise ConfigError."""
    _unknown_keys(source, "", raw, TOP_LEVEL_KEYS)
    for required in ("backbone", "model", "data", "output_dir", "steps"):
        if required not in raw:
            raise ConfigError(f"{source}: missing required key '{required}' ({TOP_LEVEL_KEYS[required]})")

    backbone = raw["backbone"]
    if backbone not in BACKBONES:
        raise ConfigError(f"{_where(source, 'backbone')} must be one of {', '.join(BACKBONES)}, got {backbone!r}")

    model = raw["model"]
    if isinstance(model, str):
        model = {"path": model}
    if not isinstance(model, dict):
        raise ConfigError(f"{_where(source, 'model')} must be a diffusers folder path or a mapping with 'path' or 'random_tiny'")
    _unknown_keys(source, "model", model, MODEL_KEYS)
    random_tiny = model.get("random_tiny", False)
    if not isinstance(random_tiny, bool):
        raise ConfigError(f"{_where(source, 'model.random_tiny')} must be true or false, got {random_tiny!r}")
    model_path = None
    if random_tiny:
        if "path" in model:
            raise ConfigError(f"{source}: give either model.path or model.random_tiny, not both")
        if backbone != "sd15":
            raise ConfigError(f"{source}: model.random_tiny builds a tiny SD1.5-family model; set backbone: sd15")
    else:
        if "path" not in model:
            raise ConfigError(f"{source}: model needs 'path' (a local diffusers pipeline folder) or 'random_tiny: true'")
        model_path = Path(_str(source, "model.path", model["path"])).expanduser()
        if not model_path.is_dir():
            raise ConfigError(f"{_where(source, 'model.path')}: model folder {model_path} does not exist")
        from flash_core.model_folders import ModelFolderError, check_pipeline_folder

        try:
            check_pipeline_folder(model_path)  # no custom pipeline / component code ever runs
        except ModelFolderError as error:
            raise ConfigError(f"{_where(source, 'model.path')}: {error}") from None
    tiny_seed = _int(source, "model.tiny_seed", model.get("tiny_seed", 0), 0)

    data = raw["data"]
    if isinstance(data, str):
        data = {"path": data}
    if not isinstance(data, dict) or "path" not in data:
        raise ConfigError(f"{_where(source, 'data')} must be a mapping with at least 'path' (an image folder or a datasets folder)")
    _unknown_keys(source, "data", data, DATA_KEYS)
    data_path = Path(_str(source, "data.path", data["path"])).expanduser()
    if not data_path.exists():
        raise ConfigError(f"{_where(source, 'data.path')}: {data_path} does not exist")
    data_kind = data.get("kind", "auto")
    if data_kind not in ("auto", "folder", "hf"):
        raise ConfigError(f"{_where(source, 'data.kind')} must be auto, folder or hf, got {data_kind!r}")
    captions = data.get("captions")
    if captions is not None:
        captions = Path(_str(source, "data.captions", captions)).expanduser()
        if not captions.is_file():
            raise ConfigError(f"{_where(source, 'data.captions')}: captions file {captions} does not exist")
    resolution = _int(source, "data.resolution", data.get("resolution", 512), 8)
    if resolution % 8:
        raise ConfigError(f"{_where(source, 'data.resolution')} must be a multiple of 8 (the VAE's downscale), got {resolution}")
    max_items = data.get("max_items")
    if max_items is not None:
        max_items = _int(source, "data.max_items", max_items, 1)
    output_dir = Path(_str(source, "output_dir", raw["output_dir"])).expanduser()
    cache_dir = Path(_str(source, "data.cache_dir", data["cache_dir"])).expanduser() if data.get("cache_dir") else output_dir / "cache"

    def optional(key: str, kind: Callable[[Path, str, Any], Any]):
        return None if raw.get(key) is None else kind(source, key, raw[key])

    from flash_core.distill import (
        MIXED_PRECISION,  # what the trainer supports (its autocast)
    )

    mixed_precision = raw.get("mixed_precision", "no")
    if mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"{_where(source, 'mixed_precision')} must be one of {', '.join(MIXED_PRECISION)}, got {mixed_precision!r}")

    sample_prompts = raw.get("sample_prompts")
    if sample_prompts is not None and (not isinstance(sample_prompts, list) or not all(isinstance(p, str) for p in sample_prompts)):
        raise ConfigError(f"{_where(source, 'sample_prompts')} must be a list of strings")
    sample_steps = raw.get("sample_steps", [1, 2, 4])
    if not isinstance(sample_steps, list) or not sample_steps or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 8 for s in sample_steps):
        raise ConfigError(f"{_where(source, 'sample_steps')} must be a list of step counts between 1 and 8, got {sample_steps!r}")
    from flash_core.lora_formats import check_export_format, export_formats

    formats = export_formats(backbone)  # the LoRA formats this backbone's student can be written in
    export = raw.get("export", list(formats))
    if not isinstance(export, list) or not all(isinstance(f, str) for f in export):
        raise ConfigError(f"{_where(source, 'export')} must be a list drawn from {', '.join(formats)}, got {export!r}")
    for export_format in export:
        try:
            check_export_format(backbone, export_format)
        except ValueError as error:
            raise ConfigError(f"{_where(source, 'export')}: {error}") from None
    distill = raw.get("distill") or {}
    if not isinstance(distill, dict):
        raise ConfigError(f"{_where(source, 'distill')} must be a mapping of DistillConfig fields")
    from dataclasses import fields as dataclass_fields

    from flash_core.distill import DistillConfig

    top_level = {"backbone": "backbone", "total_steps": "steps", "seed": "seed", "batch_size": "batch_size",
                 "lora_rank": "rank", "lora_alpha": "alpha", "lr": "lr", "mixed_precision": "mixed_precision"}
    for key in distill:
        if key in top_level:
            raise ConfigError(f"{source}: distill.{key} is set by the top-level key '{top_level[key]}'; move it there")
    _unknown_keys(source, "distill", distill, {f.name for f in dataclass_fields(DistillConfig)} - set(top_level))

    config = TrainConfig(
        source=source,
        backbone=backbone,
        model_path=model_path,
        random_tiny=random_tiny,
        tiny_seed=tiny_seed,
        data_path=data_path,
        data_kind=data_kind,
        captions=captions,
        image_column=_str(source, "data.image_column", data.get("image_column", "image")),
        text_column=_str(source, "data.text_column", data.get("text_column", "text")),
        split=None if data.get("split") is None else _str(source, "data.split", data["split"]),
        resolution=resolution,
        max_items=max_items,
        cache_dir=cache_dir,
        encode_batch_size=_int(source, "data.encode_batch_size", data.get("encode_batch_size", 8), 1),
        output_dir=output_dir,
        steps=_int(source, "steps", raw["steps"], 1),
        batch_size=optional("batch_size", lambda s, k, v: _int(s, k, v, 1)),
        lr=optional("lr", _float),
        rank=optional("rank", lambda s, k, v: _int(s, k, v, 1)),
        alpha=optional("alpha", lambda s, k, v: int(v) if float(_float(s, k, v)).is_integer() else float(v)),
        seed=_int(source, "seed", raw.get("seed", 0), 0),
        mixed_precision=mixed_precision,
        checkpoint_every=_int(source, "checkpoint_every", raw.get("checkpoint_every", 500), 0),
        keep_checkpoints=_int(source, "keep_checkpoints", raw.get("keep_checkpoints", 2), 1),
        sample_every=_int(source, "sample_every", raw.get("sample_every", 500), 0),
        sample_prompts=sample_prompts,
        sample_steps=sample_steps,
        teacher_sample_steps=_int(source, "teacher_sample_steps", raw.get("teacher_sample_steps", 25), 1),
        teacher_guidance=optional("teacher_guidance", _float),
        log_every=_int(source, "log_every", raw.get("log_every", 10), 1),
        export=export,
        export_name=_str(source, "export_name", raw.get("export_name", f"flash-{backbone}")),
        distill=dict(distill),
        raw=raw,
        target_cache=None if raw.get("target_cache") is None else Path(_str(source, "target_cache", raw["target_cache"])).expanduser(),
    )
    distill_config_for(config).recipe()  # bad DistillConfig values fail here, before any model loads
    return config


# --------------------------------------------------------------------------------------------------
# Small file helpers (every write is atomic: a temporary file in the same folder, then os.replace)
# --------------------------------------------------------------------------------------------------


def save_png_atomic(image, path: Path) -> None:
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


# --------------------------------------------------------------------------------------------------
# The tiny random model (tests / CI): a diffusers SD1.5-family pipeline folder built from a seed
# --------------------------------------------------------------------------------------------------

# A UNet whose LDM twin is {model_channels 32, channel_mult [1, 2], num_res_blocks [1, 1],
# transformer_depth [1, 0], transformer_depth_output [1, 1, 0, 0], transformer_depth_middle 1, context_dim 32}.
TINY_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64),
    "layers_per_block": 1, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32, "attention_head_dim": 4,
    "norm_num_groups": 8,
}
TINY_VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3, "block_out_channels": (8, 16, 16), "latent_channels": 4,
    "norm_num_groups": 4, "sample_size": 32, "layers_per_block": 1,
}
TINY_TEXT_ENCODER = {
    "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 77, "projection_dim": 32,
}


def tiny_tokenizer_folder() -> Path:
    """The real CLIP BPE files ComfyUI ships (no download possible); COMFYUI_PATH may point elsewhere."""
    from training.fixtures.comfy_env import REPO_ROOT

    root = Path(os.environ.get("COMFYUI_PATH", REPO_ROOT / ".comfyui"))
    folder = root / "comfy" / "sd1_tokenizer"
    if not (folder / "vocab.json").is_file():
        raise ConfigError(
            f"model.random_tiny needs the CLIP tokenizer files ComfyUI ships at {folder}: run `make setup` or set COMFYUI_PATH"
        )
    return folder


def build_tiny_pipeline(folder: Path, seed: int) -> Path:
    """Write a tiny random SD1.5-family diffusers pipeline (UNet, VAE, CLIP text encoder, tokenizer) to `folder`.

    Deterministic for a seed; built once (an existing complete folder is reused). Written to a temporary
    folder next to it and renamed, so a crash never leaves a half-written model.
    """
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER))
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_tokenizer_folder()))
    tokenizer.model_max_length = TINY_TEXT_ENCODER["max_position_embeddings"]
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing", clip_sample=False
    )
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        pipeline.save_pretrained(str(tmp), safe_serialization=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first
            if not (folder / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def tiny_model_folder(config: TrainConfig) -> Path:
    digest = hashlib.sha256(json.dumps([TINY_UNET, TINY_VAE, TINY_TEXT_ENCODER, config.tiny_seed], sort_keys=True, default=str).encode())
    return config.cache_dir / f"tiny-sd15-{digest.hexdigest()[:12]}"


def model_identity(folder: Path) -> str:
    """What the latent cache depends on: the model folder and the size+mtime of its weight files."""
    parts = [str(folder.resolve())]
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.suffix in (".safetensors", ".bin", ".json"):
            stat = file.stat()
            parts.append(f"{file.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Stopping on Ctrl-C / SIGTERM: finish the step, save a checkpoint, exit 130
# --------------------------------------------------------------------------------------------------


class StopRequest:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each step (a second signal aborts at once)."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.requested:  # second Ctrl-C: give up on the checkpoint
            self.restore()
            raise KeyboardInterrupt
        self.requested = True

    def install(self) -> StopRequest:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


# --------------------------------------------------------------------------------------------------
# Checkpoints: flash_core.run's format (checkpoints/step-000500/{state.pt, rank-<r>.pt, meta.json}, latest)
# --------------------------------------------------------------------------------------------------


def checkpoint_root(config: TrainConfig) -> Path:
    return config.output_dir / "checkpoints"


def find_resume_checkpoint(config: TrainConfig, resume: str) -> Path:
    """The checkpoint folder `--resume` means: 'latest' (the newest in output_dir) or an explicit folder."""
    from flash_core.run import META_FILE, CheckpointStore

    if resume != "latest":
        folder = Path(resume)
        if not (folder / META_FILE).is_file():
            raise ConfigError(f"--resume {folder}: not a flash-distill checkpoint folder (no {META_FILE})")
        return folder
    root = checkpoint_root(config)
    found = CheckpointStore(root).latest()
    if found is None:
        raise ConfigError(f"--resume: no checkpoint in {root} to resume from (run without --resume to start)")
    return found


# --------------------------------------------------------------------------------------------------
# Losses log and sample grids
# --------------------------------------------------------------------------------------------------


def truncate_losses(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (the resumed run writes them again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def append_losses(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (rewritten atomically so a kill never leaves half a line)."""
    previous = path.read_text(encoding="utf-8") if path.is_file() else ""
    write_text_atomic(path, previous + json.dumps(record, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# The teacher model: network (as a flash_core Denoiser), VAE and text encoders of a diffusers folder
# --------------------------------------------------------------------------------------------------

NETWORK_SUBFOLDER = {"sd15": "unet", "sdxl": "unet", "pixart": "transformer", "sd3": "transformer"}
COND_FIELDS = ("encoder_hidden_states", "pooled", "time_ids", "attention_mask")
EXTRA_PREFIX = "extra."
T5_OFFSET_SD3 = 77  # SD3 prompt embeddings: 77 CLIP tokens, then the T5 tokens


def conditioning_to_tensors(cond) -> dict[str, torch.Tensor]:
    """flash_core Conditioning -> flat dict of batch-first tensors (what the caches store)."""
    tensors = {name: getattr(cond, name) for name in COND_FIELDS if getattr(cond, name) is not None}
    tensors.update({EXTRA_PREFIX + name: value for name, value in cond.extra.items()})
    return tensors


def tensors_to_conditioning(tensors: dict[str, torch.Tensor]):
    from flash_core.denoiser import Conditioning

    return Conditioning(
        **{name: tensors.get(name) for name in COND_FIELDS},
        extra={k[len(EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)},
    )


class TeacherModel:
    """The diffusers pieces flash-distill needs: the network (wrapped as a Denoiser), VAE, prompt encoding.

    Text encoders are only loaded when something has to be encoded (a cache miss) and freed afterwards.
    """

    def __init__(self, folder: Path, backbone: str, resolution: int, device, weight_dtype):
        import torch
        from diffusers import AutoencoderKL

        from flash_core.backends.diffusers import make_diffusers_denoiser

        self.folder, self.backbone, self.resolution = folder, backbone, resolution
        self.device, self.weight_dtype = device, weight_dtype
        subfolder = NETWORK_SUBFOLDER[backbone]
        network_class = self._network_class()
        try:
            self.network = network_class.from_pretrained(str(folder), subfolder=subfolder, torch_dtype=weight_dtype)
            self.vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", torch_dtype=torch.float32)
        except (OSError, ValueError) as error:
            raise ConfigError(f"model folder {folder}: cannot load the {backbone} {subfolder} / vae ({error})") from None
        self.network.to(device)
        self.vae.to(device).requires_grad_(False).eval()
        kwargs = {}
        if backbone in ("sd15", "sdxl"):
            kwargs["prediction_type"] = self._scheduler_prediction_type()
        self.denoiser = make_diffusers_denoiser(backbone, self.network, **kwargs)
        self._pipeline = None
        self.sample_latent_shape: tuple[int, ...] | None = None  # [C, h, w] of the dataset latents

    def _network_class(self):
        if self.backbone in ("sd15", "sdxl"):
            from diffusers import UNet2DConditionModel as network_class
        elif self.backbone == "pixart":
            from diffusers import PixArtTransformer2DModel as network_class
        else:
            from diffusers import SD3Transformer2DModel as network_class
        return network_class

    def _scheduler_prediction_type(self) -> str:
        config_file = self.folder / "scheduler" / "scheduler_config.json"
        if config_file.is_file():
            return json.loads(config_file.read_text(encoding="utf-8")).get("prediction_type", "epsilon")
        return "epsilon"

    # ---- pixels <-> latents ----
    def encode_images(self, pixels):
        """[B, 3, R, R] in [-1, 1] -> model latents ((mean - shift) * scaling, the diffusers convention)."""
        import torch

        config = self.vae.config
        with torch.no_grad():
            mean = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist.mode()  # deterministic: the posterior mean
        shift = getattr(config, "shift_factor", None) or 0.0
        return (mean - shift) * config.scaling_factor  # z = (E(x) - shift) * scaling_factor

    def decode_latents(self, latents):
        import torch

        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        with torch.no_grad():
            return self.vae.decode(latents.to(self.device, torch.float32) / config.scaling_factor + shift).sample  # x = D(z / s + shift)

    # ---- prompts ----
    def _load_pipeline(self):
        if self._pipeline is None:
            from diffusers import DiffusionPipeline

            components = {NETWORK_SUBFOLDER[self.backbone]: self.network, "vae": self.vae}
            if self.backbone == "sd15":
                components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            self._pipeline = DiffusionPipeline.from_pretrained(str(self.folder), torch_dtype=self.weight_dtype, **components)
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
                module = getattr(self._pipeline, name, None)
                if module is not None:
                    module.to(self.device).requires_grad_(False).eval()
        return self._pipeline

    def release_text_encoders(self) -> None:
        self._pipeline = None

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Captions -> flat conditioning tensors for this backbone (diffusers' own encode_prompt)."""
        import torch

        pipe = self._load_pipeline()
        device, size, res = self.device, len(prompts), self.resolution
        with torch.no_grad():
            if self.backbone == "sd15":
                embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
                return {"encoder_hidden_states": embeds}
            if self.backbone == "sdxl":
                embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
                time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32).expand(size, -1)  # size, crop, target
                return {"encoder_hidden_states": embeds, "pooled": pooled, "time_ids": time_ids.clone()}
            if self.backbone == "pixart":
                embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device, clean_caption=False)
                tensors = {"encoder_hidden_states": embeds, "attention_mask": mask}
                if getattr(self.network.config, "sample_size", 0) == 128:  # PixArt-alpha 1024: size conditioning
                    tensors["extra.resolution"] = torch.tensor([[res, res]], dtype=torch.float32).expand(size, -1).clone()
                    tensors["extra.aspect_ratio"] = torch.ones(size, 1)
                return tensors
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=False)
            return {"encoder_hidden_states": embeds, "pooled": pooled}

    def unconditional(self, recipe_uncond: str, encode: Callable[[list[str]], dict]) -> dict[str, torch.Tensor]:
        """The teacher's unconditional input per the recipe: empty prompt, zeros (built per batch) or the
        SD3 negative prompt without T5 (T5 tokens zeroed)."""
        if recipe_uncond == "zeros":
            return {}
        tensors = dict(encode([""]))
        if recipe_uncond == "negative_prompt":
            embeds = tensors["encoder_hidden_states"].clone()
            embeds[:, T5_OFFSET_SD3:] = 0  # "without T5": only the CLIP part of the negative prompt
            tensors["encoder_hidden_states"] = embeds
        return tensors


def weight_dtype_for(mixed_precision: str):
    import torch

    return torch.bfloat16 if mixed_precision == "bf16" else torch.float32


# --------------------------------------------------------------------------------------------------
# Data parallel: average the trainable parameters' gradients across processes before each optimiser step
# --------------------------------------------------------------------------------------------------


class GradientAverager:
    """`reduce_gradients` for FlashDistiller under accelerate: all-reduce (mean) the `.grad` of the given
    trainable parameters (LoRA, or the discriminator head) across processes before each optimiser step, so
    every rank takes the same step. (The trainer calls the same network as teacher, student, feature encoder
    and fake score within one step, so it is not wrapped in DDP; see flash_core/distill.py.)
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def __call__(self, parameters) -> None:
        import torch
        import torch.distributed as dist

        world = self.accelerator.num_processes
        if world == 1:
            return
        parameters = list(parameters)
        present = torch.tensor([p.grad is not None for p in parameters], dtype=torch.uint8, device=self.accelerator.device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX)  # the same set of grads on every rank (no hang)
        grads = []
        for param, has_grad in zip(parameters, present.tolist()):
            if has_grad:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                grads.append(param.grad)
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])  # one bucket, one all-reduce
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world  # mean gradient over ranks
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (so all ranks stop at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], device=accelerator.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

def distill_config_for(config: TrainConfig):
    from flash_core.distill import DistillConfig

    overrides = dict(config.distill)
    try:
        return DistillConfig(
            backbone=config.backbone, total_steps=config.steps, seed=config.seed, batch_size=config.batch_size,
            lora_rank=config.rank, lora_alpha=config.alpha, lr=config.lr, mixed_precision=config.mixed_precision,
            **overrides,
        )
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{config.source}: distill: {error}") from None


class EncodedRows:
    """The encoded dataset as flash_core.run's Dataset: rows -> Batch (SDXL-style zero uncond built per batch)."""

    def __init__(self, encoded, uncond_tensors: dict):
        self.encoded = encoded
        self.uncond = tensors_to_conditioning(uncond_tensors) if uncond_tensors else None

    def __len__(self) -> int:
        return len(self.encoded)

    def batch(self, indices, step: int):
        from flash_core.distill import Batch

        latents, cond_tensors, _ = self.encoded.rows(indices)
        cond = tensors_to_conditioning(cond_tensors)
        uncond = self.uncond if self.uncond is not None else prompt_uncond_conditioning({}, cond, cond.batch_size)
        return Batch(latents=latents, cond=cond, uncond=uncond)

    def fingerprint(self) -> str:
        from flash_core.run import tensor_fingerprint

        named = [("latents", self.encoded.latents)] + sorted(self.encoded.conditioning.items())
        if self.uncond is not None:
            named += [(f"uncond.{k}", v) for k, v in sorted(conditioning_to_tensors(self.uncond).items())]
        return tensor_fingerprint(named)


class CliHooks:
    """flash_core.run hooks for the CLI: tqdm, losses.jsonl every log_every steps (averaged over processes),
    sample grids as PNG, and Ctrl-C / SIGTERM (StopRequest) agreed on by every process."""

    def __init__(self, config: TrainConfig, accelerator, progress, stop: StopRequest, losses_path: Path):
        self.config, self.accelerator, self.progress, self.stop = config, accelerator, progress, stop
        self.losses_path = losses_path

    def on_step(self, report) -> None:
        import torch

        step, logs, accelerator = report.step, report.logs, self.accelerator
        self.progress.update(1)
        if step % self.config.log_every == 0 or step == report.total:
            keys = sorted(k for k in logs if k != "step_s")
            values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=accelerator.device)
            values = accelerator.reduce(values, reduction="mean")  # losses averaged over ranks
            if accelerator.is_main_process:
                record = {"step": step, **{k: float(v) for k, v in zip(keys, values.tolist())}}
                append_losses(self.losses_path, record)
                self.progress.set_postfix(loss=f"{record['loss']:.4f}", phase=int(record["phase"]))
        if report.preview is not None:
            save_png_atomic(_pil(report.preview), self.config.output_dir / "samples" / f"step-{step:06d}.png")

    def should_stop(self) -> bool:
        return any_rank(self.accelerator, self.stop.requested)


def _pil(array):
    from PIL import Image

    return Image.fromarray(array, mode="RGB")


def sample_preview(config: TrainConfig, distiller, teacher: TeacherModel, prompts_cond: dict, prompts_uncond: dict):
    """flash_core.run's preview (teacher | student 1 / 2 / 4 steps rows, one column per sample prompt), decoded
    by the pipeline's VAE."""
    from flash_core.run import Preview

    cond = tensors_to_conditioning(prompts_cond)
    uncond = prompt_uncond_conditioning(prompts_uncond, cond, cond.batch_size)
    guidance = config.teacher_guidance if config.teacher_guidance is not None else sum(distiller.recipe.guidance_range) / 2

    def decode(latents):
        pixels = teacher.decode_latents(latents).float().cpu()  # [n, 3, H, W] in [-1, 1]
        return ((pixels.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)  # -> [n, H, W, 3] in [0, 1]

    return Preview(distiller, cond, uncond, teacher.sample_latent_shape, config.seed, guidance,
                   config.teacher_sample_steps, decode, student_steps=config.sample_steps)


def export_lora(config: TrainConfig, trainer, base_model: str) -> dict[str, Path]:
    """Write the trained LoRA in the configured formats (rank 0) with flash_core.run's metadata and dtype."""
    from flash_core import lora_formats
    from flash_core import run as flash_run

    distiller = trainer.distiller
    modules = flash_run.lora_modules(distiller)
    metadata = flash_run.lora_metadata(distiller, trainer.settings, trainer.history, base_model=base_model,
                                 teacher=trainer.fingerprints["teacher"])
    export_dir = config.output_dir / "export"
    written: dict[str, Path] = {}
    for export_format in config.export:
        export = lora_formats.build_lora_export(modules, config.backbone, export_format, name=config.export_name,
                                                metadata=metadata, base_model=base_model, dtype=flash_run.EXPORT_DTYPE)
        written[export_format] = export.save(export_dir)
    return written


def prompt_uncond_conditioning(uncond_tensors: dict, cond, size: int):
    """Batch-1 unconditional (empty / negative prompt) or SDXL-style zeros of `cond`."""
    from flash_core.denoiser import zero_conditioning

    if not uncond_tensors:
        return zero_conditioning(cond)
    return tensors_to_conditioning(uncond_tensors).expand_to(size)


@dataclass
class Prepared:
    """The loaded teacher and the encoded dataset of a config (training and cache-targets share them)."""

    teacher: Any
    encoded: Any
    uncond_tensors: dict
    sample_cond: dict
    distill_config: Any
    base_model: str

    @property
    def dataset(self):
        return EncodedRows(self.encoded, self.uncond_tensors)


def _prepare(config: TrainConfig, accelerator) -> Prepared:
    """Load the teacher, encode the dataset once (main process first) and the sample / unconditional prompts."""
    import torch
    from tqdm.auto import tqdm

    from training import data

    main_process = accelerator.is_main_process

    # -- model --
    if config.random_tiny:
        folder = tiny_model_folder(config)
        with accelerator.main_process_first():
            build_tiny_pipeline(folder, config.tiny_seed)
        base_model = "random_tiny"
    else:
        folder = config.model_path
        base_model = str(config.model_path.resolve())
    spec = data.DataSpec(
        path=config.data_path, kind=config.data_kind, captions=config.captions, image_column=config.image_column,
        text_column=config.text_column, split=config.split, resolution=config.resolution, max_items=config.max_items,
    )
    model_key = f"{config.backbone}|{model_identity(folder)}|{config.mixed_precision}"  # bf16 runs encode in bf16
    cache_file = data.cache_path(spec, model_key, config.cache_dir)
    if not cache_file.is_file():
        data.verify_items(data.list_items(spec))  # empty / missing captions / broken files: fail before loading a model

    weight_dtype = weight_dtype_for(config.mixed_precision)
    teacher = TeacherModel(folder, config.backbone, config.resolution, accelerator.device, weight_dtype)
    distill_config = distill_config_for(config)
    recipe = distill_config.recipe()
    sample_prompts = config.sample_prompts

    # -- data: encode once (main process first; the other ranks then read the cache) --
    cache_dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    with accelerator.main_process_first():
        encoded = data.encode_dataset(
            spec, teacher.encode_images, teacher.encode_prompts, model_key, config.cache_dir,
            batch_size=config.encode_batch_size, dtype=cache_dtype,
            progress=(lambda chunks: tqdm(chunks, desc="encoding dataset", disable=not main_process)),
        )
        if sample_prompts is None:
            sample_prompts = encoded.captions[:4]
        uncond_tensors = teacher.unconditional(  # {} for SDXL-style zeros (built from each batch)
            recipe.uncond,
            lambda prompts: data.encode_prompts_cached(prompts, teacher.encode_prompts, model_key, config.cache_dir, cache_dtype),
        )
        sample_cond = data.encode_prompts_cached(sample_prompts, teacher.encode_prompts, model_key, config.cache_dir, cache_dtype)
    teacher.release_text_encoders()
    teacher.sample_latent_shape = tuple(encoded.latents.shape[1:])
    return Prepared(teacher, encoded, uncond_tensors, sample_cond, distill_config, base_model)


def open_target_cache(folder: Path):
    from flash_core.target_cache import TargetCache, TargetCacheError

    try:
        return TargetCache(folder)
    except TargetCacheError as error:
        raise ConfigError(f"target_cache: {error}") from None


def run(config: TrainConfig, resume: str | None, dump_rank_lora: bool, allow_changes: bool = False) -> int:
    """Train; returns the process exit code (0 done, 130 stopped by a signal after checkpointing).
    Raises NonFiniteError (main: exit EXIT_NON_FINITE), ConfigError / DataError / OutputLockedError (exit 2).

    The main process holds output_dir's lock for the whole run (a second run on it refuses, naming this one)
    and, holding it, first removes the temporaries a killed run left behind.
    """
    from accelerate import PartialState

    from flash_core import files

    if not PartialState().is_main_process:
        return _train(config, resume, dump_rank_lora, allow_changes)
    with files.OutputLock(config.output_dir, what=f"flash-distill --config {config.source}"):
        files.remove_orphaned_temporaries(config.output_dir)
        return _train(config, resume, dump_rank_lora, allow_changes)


def _make_run(config: TrainConfig, accelerator, distiller, prepared: Prepared, store, hooks, preview, target_cache):
    from flash_core import run as flash_run

    return flash_run.Run(
        distiller, prepared.dataset,
        flash_run.run_settings(prepared.distill_config, base_model=prepared.base_model, resolution=config.resolution),
        store=store, hooks=hooks, preview=preview,
        preview_every=config.sample_every, checkpoint_every=config.checkpoint_every,
        process_index=accelerator.process_index, num_processes=accelerator.num_processes,
        fresh_hint=f"Start fresh with another output_dir (or delete {checkpoint_root(config)}), or pass --allow-changes "
                   "to continue anyway.",
        target_cache=target_cache,
    )


def _train(config: TrainConfig, resume: str | None, dump_rank_lora: bool, allow_changes: bool) -> int:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from flash_core import run as flash_run
    from flash_core.distill import FlashDistiller

    existing = flash_run.CheckpointStore(checkpoint_root(config)).list()
    resume_folder = find_resume_checkpoint(config, resume) if resume else None
    if resume_folder is None and existing:
        raise ConfigError(
            f"{checkpoint_root(config)} already holds checkpoints: pass --resume to continue that run, or choose another output_dir"
        )

    accelerator = Accelerator(mixed_precision="no")  # the trainer does its own bf16 autocast
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(
            f"flash-distill trains data-parallel (LoRA + discriminator head are small, the teacher is shared); "
            f"launch without {accelerator.distributed_type.name} (e.g. `accelerate launch --multi_gpu ...`)"
        )
    main_process = accelerator.is_main_process
    set_seed(config.seed)  # the same LoRA and discriminator init on every rank

    prepared = _prepare(config, accelerator)
    teacher, uncond_tensors = prepared.teacher, prepared.uncond_tensors
    distill_config, base_model, sample_cond = prepared.distill_config, prepared.base_model, prepared.sample_cond
    target_cache = open_target_cache(config.target_cache) if config.target_cache is not None else None

    # -- trainer: flash_core.run drives FlashDistiller --
    distiller = FlashDistiller(
        teacher.denoiser, distill_config, device=accelerator.device, backward=accelerator.backward,
        process_index=accelerator.process_index, reduce_gradients=GradientAverager(accelerator),
    )
    flash_run.init_lora(distiller, config.seed)
    store = flash_run.CheckpointStore(checkpoint_root(config), keep=config.keep_checkpoints,
                                      process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                                      barrier=accelerator.wait_for_everyone)
    losses_path = config.output_dir / "losses.jsonl"
    stop = StopRequest()
    hooks = CliHooks(config, accelerator, None, stop, losses_path)
    preview = sample_preview(config, distiller, teacher, sample_cond, uncond_tensors) if main_process and config.sample_every else None
    from flash_core.target_cache import TargetCacheError

    try:
        trainer = _make_run(config, accelerator, distiller, prepared, store, hooks, preview, target_cache)
    except TargetCacheError as error:
        raise ConfigError(f"target_cache: {error}") from None
    if resume_folder is not None:
        try:
            differences = trainer.resume(resume_folder, allow_changes=allow_changes)
        except (flash_run.ResumeMismatchError, flash_run.CheckpointError) as error:
            raise ConfigError(f"--resume: {error}") from None
        if main_process:
            truncate_losses(losses_path, distiller.step)
            for difference in differences:
                print(f"flash-distill: warning: continuing despite a changed {difference} (--allow-changes)", file=sys.stderr)
            print(f"flash-distill: resumed from {resume_folder} at step {distiller.step}", file=sys.stderr)
    elif main_process:
        import yaml

        write_text_atomic(config.output_dir / "config.yaml", yaml.safe_dump(config.raw, sort_keys=False))

    progress = hooks.progress = tqdm(total=config.steps, initial=distiller.step, desc="flash-distill",
                                     disable=not main_process, dynamic_ncols=True)
    stop.install()  # from here on, Ctrl-C means: finish the step, checkpoint, exit 130
    try:
        status = trainer.train()
    finally:
        progress.close()
        stop.restore()
    if status == "stopped":
        if main_process:
            print(f"flash-distill: stopped at step {distiller.step}; checkpoint {store.last_saved}. Continue with --resume.", file=sys.stderr)
        return EXIT_INTERRUPTED

    if dump_rank_lora:  # test/debug mode: every rank writes the LoRA it holds
        from safetensors.torch import save_file

        dump = config.output_dir / "debug" / f"lora-rank{accelerator.process_index}.safetensors"
        dump.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in distiller.lora_state_dict().items()}, str(dump) + ".tmp")
        os.replace(str(dump) + ".tmp", dump)
    if main_process:
        for kind, path in export_lora(config, trainer, base_model).items():
            print(f"flash-distill: exported {kind} LoRA to {path}", file=sys.stderr)
    accelerator.wait_for_everyone()
    return 0


def cache_folder(config: TrainConfig) -> Path:
    return config.target_cache if config.target_cache is not None else config.output_dir / "target-cache"


def cache_targets(config: TrainConfig, teacher_batch: int | None, processes: int, verify: int) -> int:
    """`flash-distill cache-targets`: build (or finish) the run's target cache, then optionally verify it.
    Returns the exit code (0, or EXIT_VERIFY_FAILED)."""
    import time

    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from flash_core import files
    from flash_core import target_cache as targets

    accelerator = Accelerator(mixed_precision="no")
    if accelerator.num_processes > 1:
        raise ConfigError("cache-targets runs in one process; `--processes N` builds the targets of an N-process run")
    folder = cache_folder(config)
    with files.OutputLock(folder, what=f"flash-distill cache-targets --config {config.source}"):
        files.remove_orphaned_temporaries(folder)
        prepared = _prepare(config, accelerator)
        denoiser, dataset, distill_config = prepared.teacher.denoiser, prepared.dataset, prepared.distill_config
        progress = tqdm(desc="teacher targets (shards)", unit="shard", dynamic_ncols=True)

        def advance(done: int, total: int) -> None:
            progress.total = total
            progress.n = done
            progress.refresh()

        started = time.perf_counter()
        try:
            cache = targets.build_target_cache(folder, denoiser, distill_config, dataset, num_processes=processes,
                                               teacher_batch=teacher_batch, device=accelerator.device, progress=advance)
        except targets.TargetCacheError as error:
            raise ConfigError(f"cache-targets: {error}") from None
        finally:
            progress.close()
        recipe = distill_config.recipe()
        count = sum(len(steps) for steps in cache.plan) * recipe.batch_size * processes
        print(f"flash-distill: target cache {folder}: {count} targets in {len(cache.plan)} shards "
              f"({time.perf_counter() - started:.1f} s this session)", file=sys.stderr)
        if verify:
            try:
                report = cache.verify(denoiser, distill_config, dataset, verify, device=accelerator.device,
                                      teacher_batch=teacher_batch)
            except targets.TargetCacheError as error:
                print(f"flash-distill: error: {error}", file=sys.stderr)
                return EXIT_VERIFY_FAILED
            print(f"flash-distill: verified {report['checked']} targets: max relative error {report['max_error']:.2e} "
                  f"(tolerance {report['tolerance']:g})", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flash-distill", description="Distil a Flash Diffusion LoRA student (see training/configs/*.yaml).")
    parser.add_argument("--config", required=True, help="YAML config (training/configs/sd15.yaml, sdxl, pixart, sd3, tiny_sd15)")
    parser.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
        help="continue from the latest checkpoint in output_dir (or the given checkpoint folder)",
    )
    parser.add_argument(
        "--allow-changes", action="store_true",
        help="with --resume: continue although settings, teacher weights or data differ from the checkpoint's",
    )
    parser.add_argument("--dump-rank-lora", action="store_true", help="debug/test: every process writes its LoRA to output_dir/debug/")
    parser.add_argument("--target-cache", default=None, metavar="DIR",
                        help="read the teacher targets from this cache (flash-distill cache-targets) instead of solving")
    return parser.parse_args(argv)


def parse_cache_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="flash-distill cache-targets",
        description="Solve the teacher targets of every student update of the run a config describes, once.")
    parser.add_argument("--config", required=True, help="the run's YAML config (the same file training uses)")
    parser.add_argument("--target-cache", default=None, metavar="DIR",
                        help="cache folder (default: the config's target_cache, else output_dir/target-cache)")
    parser.add_argument("--teacher-batch", type=int, default=None, metavar="N",
                        help="samples per no-grad teacher batch (default: from the free GPU memory; 64 on the CPU)")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="build the targets of a run on N data-parallel processes (accelerate launch --num_processes N)")
    parser.add_argument("--verify", type=int, default=0, metavar="N",
                        help="afterwards re-solve N random stored batches and compare (exit 5 on a mismatch)")
    args = parser.parse_args(argv)
    for name in ("teacher_batch", "processes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.verify < 0:
        parser.error(f"--verify must be >= 0, got {args.verify}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Console entry point of `flash-distill`; returns the exit code (2 for config / data errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    building = argv[:1] == ["cache-targets"]
    args = parse_cache_args(argv[1:]) if building else parse_args(argv)
    from flash_core.files import FileWriteError, OutputLockedError
    from flash_core.run import NonFiniteError
    from training.data import DataError

    try:
        config = load_config(args.config)
        if args.target_cache is not None:
            config.target_cache = Path(args.target_cache).expanduser()
        if building:
            return cache_targets(config, args.teacher_batch, args.processes, args.verify)
        return run(config, args.resume, args.dump_rank_lora, args.allow_changes)
    except (ConfigError, DataError, OutputLockedError) as error:
        print(f"flash-distill: error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except FileWriteError as error:  # a full disk / unwritable folder: the previous checkpoint is kept
        print(f"flash-distill: error: {error}", file=sys.stderr)
        return EXIT_WRITE_ERROR
    except NonFiniteError as error:  # nothing of the bad step was saved; earlier checkpoints are kept
        print(f"flash-distill: error: {error}", file=sys.stderr)
        return EXIT_NON_FINITE


if __name__ == "__main__":
    sys.exit(main())
