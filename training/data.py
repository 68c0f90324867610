"""Training data for `flash-distill`: image + caption datasets, encoded once and cached.

Two sources:
  * a folder of images with captions, either a sidecar ``<image>.txt`` next to each image or one
    captions ``.jsonl`` with ``{"file": ..., "text": ...}`` per line (``captions.jsonl`` in the folder is
    picked up automatically);
  * a local Hugging Face ``datasets`` folder (``Dataset.save_to_disk``), image and text columns configurable.

Every image is resized (shorter side) and centre-cropped to the training resolution, VAE-encoded and its
caption text-encoded ONCE; the result is cached as one safetensors file keyed by a hash of the dataset, the
model and the resolution, so later runs (and resumed runs) never re-encode. Broken data fails fast with a
`DataError` naming the folder or file.

The order in which cached samples are drawn is flash_core.batches.batch_indices (the one batch order of every
front end): a function of seed, step and process, each process taking its own slice of the global batch.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flash_core.files import write_atomic

if TYPE_CHECKING:
    import PIL.Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTIONS_JSONL = "captions.jsonl"
CACHE_FORMAT_VERSION = "1"
LATENTS_KEY = "latents"
COND_PREFIX = "cond."

# encode_images(pixels [B, 3, R, R] in [-1, 1]) -> latents [B, C, h, w] (already scaled for the model)
ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
# encode_prompts(captions) -> {name: tensor with first dim B}
PromptEncoder = Callable[[list[str]], dict[str, torch.Tensor]]


class DataError(ValueError):
    """A problem with the user's dataset; the message names the file or folder and what to do."""


@dataclass(frozen=True)
class DataSpec:
    """Where the training images come from (the `data:` section of a flash-distill config)."""

    path: Path
    kind: str = "auto"  # "folder", "hf" or "auto" (a datasets folder has dataset_info.json / dataset_dict.json)
    captions: Path | None = None  # a .jsonl of {"file", "text"} for folder datasets
    image_column: str = "image"
    text_column: str = "text"
    split: str | None = None  # for a saved DatasetDict
    resolution: int = 512
    max_items: int | None = None


@dataclass(frozen=True)
class RawItem:
    """One not-yet-encoded training example: a name for messages, its caption and a way to get its pixels."""

    name: str
    caption: str
    load: Callable[[], PIL.Image.Image]
    check: Callable[[], None] | None = None  # a cheap integrity check without decoding (image files)
    source: Path | None = None  # the file its pixels come from (folder datasets): what the data fingerprint hashes


# --------------------------------------------------------------------------------------------------
# Discovering items
# --------------------------------------------------------------------------------------------------


def resolve_kind(spec: DataSpec) -> str:
    """'folder' or 'hf' for the spec's path (raises DataError if the path is missing)."""
    path = Path(spec.path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if spec.kind in ("folder", "hf"):
        return spec.kind
    if spec.kind != "auto":
        raise DataError(f"data.kind must be 'folder', 'hf' or 'auto', got {spec.kind!r}")
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        return "hf"
    return "folder"


def list_items(spec: DataSpec) -> list[RawItem]:
    """All examples of the dataset in a deterministic order; fails fast on empty or inconsistent data."""
    kind = resolve_kind(spec)
    items = list_hf_items(spec) if kind == "hf" else list_folder_items(Path(spec.path), spec.captions)
    if spec.max_items is not None:
        items = items[: spec.max_items]
    return items


def _find_images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _open_image_file(path: Path):
    def load():
        from PIL import Image

        try:
            with Image.open(path) as image:
                image.load()
                return image.convert("RGB")
        except Exception as error:  # noqa: BLE001  (PIL raises many types for broken files)
            raise DataError(f"image {path} cannot be decoded ({error.__class__.__name__}: {error}); fix or remove it") from None

    return load


def _check_image_file(path: Path):
    def check():
        from PIL import Image

        try:
            with Image.open(path) as image:
                image.verify()  # reads the file and checks its structure without decoding pixels
        except Exception as error:  # noqa: BLE001  (PIL raises many types for broken files)
            raise DataError(f"image {path} cannot be decoded ({error.__class__.__name__}: {error}); fix or remove it") from None

    return check


def verify_items(items: Sequence[RawItem]) -> None:
    """Fail fast on unreadable image files before any model is loaded (cheap: no pixel decoding)."""
    for item in items:
        if item.check is not None:
            item.check()


def list_folder_items(folder: Path, captions: Path | None = None) -> list[RawItem]:
    """Images of `folder` (recursively, sorted) with sidecar .txt captions or a captions .jsonl."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist or is not a folder")
    if captions is None and (folder / CAPTIONS_JSONL).is_file():
        captions = folder / CAPTIONS_JSONL
    if captions is not None:
        return _items_from_jsonl(folder, Path(captions))
    images = _find_images(folder)
    if not images:
        raise DataError(f"no images found in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    items = []
    for image in images:
        sidecar = image.with_suffix(".txt")
        if not sidecar.is_file():
            raise DataError(
                f"caption file missing for {image}: expected {sidecar} (or give a captions .jsonl with data.captions)"
            )
        caption = _read_text(sidecar).strip()
        items.append(RawItem(str(image.relative_to(folder)), caption, _open_image_file(image), _check_image_file(image),
                             image))
    return items


def _read_text(path: Path) -> str:
    """A caption file as UTF-8, or a DataError naming the file and the fix (not a UnicodeDecodeError)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"caption file {path} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8 "
                        "(e.g. iconv -f latin1 -t utf-8)") from None


def _items_from_jsonl(folder: Path, captions: Path) -> list[RawItem]:
    if not captions.is_file():
        raise DataError(f"captions file {captions} does not exist")
    items = []
    for number, line in enumerate(_read_text(captions).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{captions} line {number}: not valid JSON ({error.msg})") from None
        file_name = record.get("file", record.get("file_name")) if isinstance(record, dict) else None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(file_name, str) or not isinstance(text, str):
            raise DataError(f'{captions} line {number}: expected {{"file": "<image path>", "text": "<caption>"}}')
        image = folder / file_name
        if not image.is_file():
            raise DataError(f"{captions} line {number}: image {image} not found")
        items.append(RawItem(file_name, text.strip(), _open_image_file(image), _check_image_file(image), image))
    if not items:
        raise DataError(f"no images found in {folder}: captions file {captions} lists none")
    return items


def _load_hf_dataset(spec: DataSpec):
    import datasets

    path = Path(spec.path)
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as error:  # noqa: BLE001  (datasets raises many types for foreign folders)
        raise DataError(
            f"{path} is not a dataset saved with datasets' save_to_disk ({error.__class__.__name__}: {error})"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset.keys())
        split = spec.split or ("train" if "train" in splits else (splits[0] if len(splits) == 1 else None))
        if split not in dataset:
            raise DataError(f"dataset {path} has splits {splits}: choose one with data.split")
        dataset = dataset[split]
    elif spec.split is not None:
        raise DataError(f"dataset {path} has no splits, remove data.split")
    return dataset


def _hf_image_loader(dataset, index: int, column: str, where: str):
    def load():
        from PIL import Image

        try:
            value = dataset[index][column]
        except Exception as error:  # noqa: BLE001  (the datasets Image feature decodes on access)
            raise DataError(f"{where}: image cannot be decoded ({error.__class__.__name__}: {error})") from None
        try:
            if isinstance(value, Image.Image):
                image = value
            elif isinstance(value, dict) and value.get("bytes") is not None:
                image = Image.open(io.BytesIO(value["bytes"]))
            elif isinstance(value, dict) and value.get("path"):
                image = Image.open(value["path"])
            elif isinstance(value, (bytes, bytearray)):
                image = Image.open(io.BytesIO(value))
            elif isinstance(value, str):
                image = Image.open(value)
            else:
                raise DataError(f"{where}: column {column!r} holds {type(value).__name__}, not an image")
            image.load()
            return image.convert("RGB")
        except DataError:
            raise
        except Exception as error:  # noqa: BLE001  (PIL raises many types for broken files)
            raise DataError(f"{where}: image cannot be decoded ({error.__class__.__name__}: {error})") from None

    return load


def list_hf_items(spec: DataSpec) -> list[RawItem]:
    """Rows of a local `datasets` folder: image column (PIL image, bytes or path) + text column."""
    dataset = _load_hf_dataset(spec)
    path = Path(spec.path)
    for column in (spec.image_column, spec.text_column):
        if column not in dataset.column_names:
            raise DataError(
                f"column {column!r} not in dataset {path} (columns: {', '.join(dataset.column_names)}); "
                "set data.image_column / data.text_column"
            )
    if len(dataset) == 0:
        raise DataError(f"no images found in {path}: the dataset has no rows")
    texts = dataset[spec.text_column]
    items = []
    for index, text in enumerate(texts):
        where = f"row {index} of dataset {path}"
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise DataError(f"{where}: column {spec.text_column!r} holds {type(text).__name__}, not text")
        items.append(RawItem(f"row {index}", text.strip(), _hf_image_loader(dataset, index, spec.image_column, where)))
    return items


# --------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------


def resize_and_crop(image, resolution: int) -> torch.Tensor:
    """PIL RGB image -> [3, R, R] float tensor in [-1, 1]: shorter side resized to R, centre crop."""
    from PIL import Image

    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != (width, height):
        image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
    left = (new_size[0] - resolution) // 2
    top = (new_size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0  # [0, 255] -> [-1, 1], the VAE's input range


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------


def dataset_fingerprint(spec: DataSpec) -> str:
    """What identifies the data. Folder datasets: the content (sha256) of every file the item list reads (each
    image, wherever captions.jsonl points: sub-folders, `../`, absolute paths), with its name and caption, and
    the captions file itself; so a replaced image of the same size and time, or a changed caption, is another
    dataset. Hugging Face datasets: the datasets library's own fingerprint."""
    digest = hashlib.sha256()
    kind = resolve_kind(spec)
    path = Path(spec.path).resolve()
    digest.update(f"{kind}|{spec.max_items}".encode())
    if kind == "hf":
        dataset = _load_hf_dataset(spec)
        digest.update(f"{path}|{getattr(dataset, '_fingerprint', '')}|{len(dataset)}|{spec.image_column}|{spec.text_column}|{spec.split}".encode())
        return digest.hexdigest()
    for item in list_items(spec):
        digest.update(f"{item.name}|{item.caption}|{_file_sha256(item.source)}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path | None) -> str:
    if path is None:
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(spec: DataSpec, model_key: str) -> str:
    """Hash of dataset + model + resolution (+ cache format): the cache file's name."""
    digest = hashlib.sha256()
    digest.update(f"v{CACHE_FORMAT_VERSION}|{dataset_fingerprint(spec)}|{model_key}|{spec.resolution}".encode())
    return digest.hexdigest()[:20]


def cache_path(spec: DataSpec, model_key: str, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"latents-{cache_key(spec, model_key)}.safetensors"


@dataclass
class EncodedDataset:
    """Cached latents and text conditioning of the whole dataset (row i of every tensor = item i)."""

    latents: torch.Tensor  # [N, C, h, w]
    conditioning: dict[str, torch.Tensor]  # name -> [N, ...]
    captions: list[str]
    path: Path  # the cache file
    from_cache: bool  # True when nothing had to be encoded

    def __len__(self) -> int:
        return self.latents.shape[0]

    def rows(self, indices: Sequence[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return (
            self.latents.index_select(0, index),
            {name: tensor.index_select(0, index) for name, tensor in self.conditioning.items()},
            [self.captions[i] for i in index.tolist()],
        )


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata))


def load_cache(path: Path) -> EncodedDataset:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118  (safe_open is not a dict)
    captions = json.loads(metadata.get("captions", "[]"))
    conditioning = {k[len(COND_PREFIX):]: v for k, v in tensors.items() if k.startswith(COND_PREFIX)}
    return EncodedDataset(tensors[LATENTS_KEY], conditioning, captions, Path(path), from_cache=True)


def encode_dataset(
    spec: DataSpec,
    encode_images: ImageEncoder,
    encode_prompts: PromptEncoder,
    model_key: str,
    cache_dir: Path,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[Iterator], Iterator] | None = None,
) -> EncodedDataset:
    """Encode every image and caption once and cache them; later calls with the same key load the cache.

    `model_key` identifies the VAE + text encoders (their weights' identity); the cache is keyed by a
    hash of it, the dataset and the resolution. Under DDP call it on the main process first
    (`accelerator.main_process_first()`), the other ranks then read the cache.
    """
    path = cache_path(spec, model_key, cache_dir)
    if path.is_file():
        try:
            return load_cache(path)
        except (OSError, KeyError, ValueError, RuntimeError) as error:  # safetensors raises these for damaged files
            raise DataError(f"latent cache {path} cannot be read ({error}); delete it to re-encode the dataset") from None
    items = list_items(spec)
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    latents: list[torch.Tensor] = []
    conditioning: dict[str, list[torch.Tensor]] = {}
    for chunk in progress(chunks) if progress else chunks:
        pixels = torch.stack([resize_and_crop(item.load(), spec.resolution) for item in chunk])
        with torch.no_grad():
            latents.append(encode_images(pixels).detach().to("cpu", dtype))
            for name, tensor in encode_prompts([item.caption for item in chunk]).items():
                conditioning.setdefault(name, []).append(tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype))
    tensors = {LATENTS_KEY: torch.cat(latents)}
    tensors.update({COND_PREFIX + name: torch.cat(parts) for name, parts in conditioning.items()})
    captions = [item.caption for item in items]
    metadata = {
        "format": f"flash-distill latent cache v{CACHE_FORMAT_VERSION}",
        "dataset": str(Path(spec.path).resolve()),
        "resolution": str(spec.resolution),
        "model": model_key,
        "captions": json.dumps(captions),
        "names": json.dumps([item.name for item in items]),
    }
    _save_atomic(tensors, path, metadata)
    conditioning_out = {k[len(COND_PREFIX):]: v for k, v in tensors.items() if k.startswith(COND_PREFIX)}
    return EncodedDataset(tensors[LATENTS_KEY], conditioning_out, captions, path, from_cache=False)


def encode_prompts_cached(
    prompts: Sequence[str], encode_prompts: PromptEncoder | None, model_key: str, cache_dir: Path,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Text-encode a few fixed prompts (sample grid, unconditional) once; cached like the dataset.

    `encode_prompts` may be None when the caller knows the cache exists (no text encoder loaded).
    """
    path = prompts_cache_path(prompts, model_key, cache_dir)
    if path.is_file():
        from safetensors.torch import load_file

        return load_file(str(path))
    if encode_prompts is None:
        raise FileNotFoundError(path)
    with torch.no_grad():
        tensors = {
            name: tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype)
            for name, tensor in encode_prompts(list(prompts)).items()
        }
    _save_atomic(tensors, path, {"format": f"flash-distill prompt cache v{CACHE_FORMAT_VERSION}", "prompts": json.dumps(list(prompts))})
    return tensors


def prompts_cache_path(prompts: Sequence[str], model_key: str, cache_dir: Path) -> Path:
    """The cache file of a list of prompts for a model (hash of both)."""
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT_VERSION, model_key, list(prompts)]).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"prompts-{digest}.safetensors"
