"""The flash-distill config: reading the YAML, checking every key (aliases included), TrainConfig."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flash_core.backbones import BACKBONES
from training.cli.errors import ConfigError


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

# key -> (default, description). `None` as default means "the recipe's value" for recipe-backed keys.
TOP_LEVEL_KEYS = {
    "backbone": "sd15 | sdxl | pixart | sd3: picks the recipe (rank, alpha, targets, guidance, loss weights)",
    "model": "a local diffusers pipeline folder, or a mapping {path: ...} / {random_tiny: true}",
    "data": "mapping: path, kind, captions, image_column, text_column, split, resolution, max_items, cache_dir",
    "output_dir": "where checkpoints, samples, losses.jsonl and the exported LoRA go",
    "total_steps": "training iterations = batches, each updating the student and then the discriminator (the four phases split them equally)",
    "batch_size": "images per process per step (default: the recipe's)",
    "lr": "AdamW learning rate of student and discriminator (default: the recipe's)",
    "rank": "LoRA rank (default: the recipe's)",
    "alpha": "LoRA alpha (default: the recipe's; with `rank:` alone, rank x the recipe's alpha / rank, so the LoRA keeps the recipe's scale)",
    "seed": "seed of LoRA init, data order and noise",
    "mixed_precision": "no | bf16 (the trainer's autocast; the frozen teacher is then held in bf16)",
    "checkpoint_every": "save a resumable checkpoint every N steps (0: only at the end and on Ctrl-C)",
    "keep_checkpoints": "how many recent checkpoints to keep",
    "sample_every": "write a sample grid every N steps (0: never)",
    "sample_prompts": "prompts of the sample grid (default: the first dataset captions)",
    "sample_steps": "sampling steps of the grid's student rows (default [1, 2, 4])",
    "teacher_sample_steps": "sampling steps (DPM-Solver++) of the grid's teacher row",
    "teacher_guidance": "CFG scale of the teacher column of the grid",
    "log_every": "append losses to losses.jsonl every N steps",
    "export": "list of LoRA formats written at the end: comfyui, diffusers, peft",
    "export_name": "file name stem of the exported LoRA",
    "distill": "mapping of flash_core DistillConfig overrides (e.g. teacher_grid_steps, loss weights)",
    "target_cache": "folder of precomputed teacher targets (flash-distill cache-targets); training reads them",
}
# Old key -> its name now: still read, with a deprecation warning (TrainConfig.deprecations; the CLI prints it).
DEPRECATED_KEYS = {"steps": "total_steps"}
MODEL_KEYS = {"path", "random_tiny", "tiny_seed"}
DATA_KEYS = {"path", "kind", "captions", "image_column", "text_column", "split", "resolution", "max_items", "cache_dir", "encode_batch_size"}
# accelerate's set_seed seeds numpy, whose seeds are 0 .. 2**32 - 1: a larger one fails after the model loaded.
MAX_SEED = 2**32 - 1
# The teacher row of the sample grid solves on the model's own timesteps: more steps than it has cannot exist.
MAX_TEACHER_SAMPLE_STEPS = 1000


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
    total_steps: int
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
    deprecations: list[str] = field(default_factory=list)  # one warning per deprecated key the file used


def _where(source: Path, key: str) -> str:
    return f"{source}: {key}"


def _int(source: Path, key: str, value: Any, minimum: int, maximum: int | None = None, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{_where(source, key)} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{_where(source, key)} must be an integer from {minimum} to {maximum}{why}, got {value!r}")
    return value


def _float(source: Path, key: str, value: Any, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (positive and value <= 0):
        raise ConfigError(f"{_where(source, key)} must be a {'positive ' if positive else ''}number, got {value!r}")
    return float(value)


def _str(source: Path, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{_where(source, key)} must be a non-empty string, got {value!r}")
    return value


def _file_stem(source: Path, key: str, value: Any) -> str:
    """A file name without folders (it is joined under output_dir/export): checked before any work."""
    value = _str(source, key, value)
    if "/" in value or "\\" in value or value in (".", "..") or "\0" in value or len(value) > 200:
        raise ConfigError(f"{_where(source, key)} must be a plain file name (no '/', '\\' or '..', at most 200 "
                          f"characters): the export goes to output_dir/export/; got {value!r}")
    return value


def _check_distill_type(source: Path, key: str, annotation: str, value: Any) -> None:
    """A distill: override of the DistillConfig field `key` has that field's type (YAML's, not a string that looks
    like it: a quoted "false" is text, and would switch a flag on)."""
    where = _where(source, f"distill.{key}")
    optional = "None" in annotation
    if value is None:
        if not optional:
            raise ConfigError(f"{where} cannot be empty")
        return
    kind = annotation.split("|")[0].strip()
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind.startswith("tuple[float"):
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                             for v in value)
    elif kind.startswith("tuple[str"):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = True
    if not ok:
        wanted = {"bool": "true or false (unquoted)", "int": "a whole number", "float": "a finite number",
                  "str": "a string"}.get(kind, "a list of finite numbers" if kind.startswith("tuple[float")
                                         else "a list of strings" if kind.startswith("tuple[str") else kind)
        raise ConfigError(f"{where} must be {wanted}, got {value!r}")


def _unknown_keys(source: Path, section: str, mapping: dict, known) -> None:
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        name = f"{section}.{unknown[0]}" if section else unknown[0]
        raise ConfigError(f"{source}: unknown key '{name}' (known keys{' of ' + section if section else ''}: {', '.join(sorted(known))})")


def _renamed_keys(source: Path, raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The config with deprecated keys under their names now, and one warning per key renamed."""
    raw, warnings = dict(raw), []
    for old, new in DEPRECATED_KEYS.items():
        if old not in raw:
            continue
        if new in raw:
            raise ConfigError(f"{source}: '{old}' is the old name of '{new}'; give only '{new}'")
        raw[new] = raw.pop(old)
        warnings.append(f"{source}: '{old}' is deprecated, call it '{new}' (same meaning: {TOP_LEVEL_KEYS[new]})")
    return raw, warnings


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
    raw, deprecations = _renamed_keys(source, raw)
    _unknown_keys(source, "", raw, TOP_LEVEL_KEYS)
    for required in ("backbone", "model", "data", "output_dir", "total_steps"):
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
        if model_path.exists() and not model_path.is_dir():
            raise ConfigError(
                f"{_where(source, 'model.path')}: {model_path} is a file; flash-distill reads a diffusers pipeline "
                "folder (model_index.json, unet/, vae/, ...). Convert a single-file checkpoint once, e.g. "
                "StableDiffusionPipeline.from_single_file(file).save_pretrained(folder), and give that folder")
        if not model_path.is_dir():
            raise ConfigError(f"{_where(source, 'model.path')}: model folder {model_path} does not exist")
        from flash_core.model_folders import ModelFolderError, check_pipeline_folder

        try:
            check_pipeline_folder(model_path)  # no custom pipeline / component code ever runs
        except ModelFolderError as error:
            raise ConfigError(f"{_where(source, 'model.path')}: {error}") from None
        from training.cli.teacher import check_scheduler_config

        check_scheduler_config(model_path, backbone, _where(source, "model.path"))  # before any weights load
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
    if sample_prompts == []:
        raise ConfigError(f"{_where(source, 'sample_prompts')} is an empty list: give at least one prompt (one grid "
                          "column each), or leave the key out to use the first dataset captions")
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

    top_level = {"backbone": "backbone", "total_steps": "total_steps", "seed": "seed", "batch_size": "batch_size",
                 "lora_rank": "rank", "lora_alpha": "alpha", "lr": "lr", "mixed_precision": "mixed_precision"}
    for key in distill:
        if key in top_level:
            raise ConfigError(f"{source}: distill.{key} is set by the top-level key '{top_level[key]}'; move it there")
    _unknown_keys(source, "distill", distill, {f.name for f in dataclass_fields(DistillConfig)} - set(top_level))
    for spec in dataclass_fields(DistillConfig):
        if spec.name in distill:
            _check_distill_type(source, spec.name, str(spec.type), distill[spec.name])
    if distill.get("lora_targets") is not None:
        from training.cli.teacher import unknown_lora_targets

        unknown, known = unknown_lora_targets(distill["lora_targets"], backbone, model_path)
        if unknown:
            raise ConfigError(
                f"{_where(source, 'distill.lora_targets')}: {', '.join(map(repr, unknown))} names no layer of the "
                f"{backbone} network a LoRA can wrap; use module names such as {', '.join(known)} (a name matches "
                "every layer whose path ends with it), or leave the key out for the recipe's targets")

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
        total_steps=_int(source, "total_steps", raw["total_steps"], 1),
        batch_size=optional("batch_size", lambda s, k, v: _int(s, k, v, 1)),
        lr=optional("lr", _float),
        rank=optional("rank", lambda s, k, v: _int(s, k, v, 1)),
        alpha=optional("alpha", lambda s, k, v: int(v) if float(_float(s, k, v)).is_integer() else float(v)),
        seed=_int(source, "seed", raw.get("seed", 0), 0, MAX_SEED, " (the seed numpy and torch are given)"),
        mixed_precision=mixed_precision,
        checkpoint_every=_int(source, "checkpoint_every", raw.get("checkpoint_every", 500), 0),
        keep_checkpoints=_int(source, "keep_checkpoints", raw.get("keep_checkpoints", 2), 1),
        sample_every=_int(source, "sample_every", raw.get("sample_every", 500), 0),
        sample_prompts=sample_prompts,
        sample_steps=sample_steps,
        teacher_sample_steps=_int(source, "teacher_sample_steps", raw.get("teacher_sample_steps", 25), 1,
                                  MAX_TEACHER_SAMPLE_STEPS, " (the model has 1000 timesteps; 25 is plenty)"),
        teacher_guidance=optional("teacher_guidance", _float),
        log_every=_int(source, "log_every", raw.get("log_every", 10), 1),
        export=export,
        export_name=_file_stem(source, "export_name", raw.get("export_name", f"flash-{backbone}")),
        distill=dict(distill),
        raw=raw,
        target_cache=None if raw.get("target_cache") is None else Path(_str(source, "target_cache", raw["target_cache"])).expanduser(),
        deprecations=deprecations,
    )
    distill_config_for(config).recipe()  # bad DistillConfig values fail here, before any model loads
    return config


def distill_config_for(config: TrainConfig):
    from flash_core.distill import DistillConfig

    overrides = dict(config.distill)
    try:
        return DistillConfig(
            backbone=config.backbone, total_steps=config.total_steps, seed=config.seed, batch_size=config.batch_size,
            lora_rank=config.rank, lora_alpha=config.alpha, lr=config.lr, mixed_precision=config.mixed_precision,
            **overrides,
        )
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{config.source}: distill: {error}") from None
