"""training/data.py: folder / jsonl / datasets sources, resize+crop, the encode-once cache, data order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from training.data import (
    DataError,
    DataSpec,
    encode_dataset,
    list_items,
    resize_and_crop,
    verify_items,
)

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def make_image(path: Path, colour, size=(32, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def sidecar_folder(root: Path, count: int = 3) -> Path:
    for i in range(count):
        make_image(root / f"img{i}.png", COLOURS[i])
        (root / f"img{i}.txt").write_text(f"caption {i}\n", encoding="utf-8")
    return root


class CountingEncoders:
    """Stand-ins for VAE + text encoder: deterministic functions of their inputs that count their calls."""

    def __init__(self):
        self.image_calls = 0
        self.prompt_calls = 0

    def images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.image_calls += 1
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)  # [B, 3, R/8, R/8]
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)  # 4 latent channels

    def prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.prompt_calls += 1
        lengths = torch.tensor([float(len(c)) for c in captions])
        return {"encoder_hidden_states": lengths[:, None, None].expand(-1, 2, 3).clone()}


def encode(spec: DataSpec, cache_dir: Path, encoders: CountingEncoders, model_key: str = "tiny"):
    return encode_dataset(spec, encoders.images, encoders.prompts, model_key, cache_dir, batch_size=2)


def test_sidecar_folder_is_listed_sorted_with_captions(tmp_path):
    items = list_items(DataSpec(sidecar_folder(tmp_path / "data"), resolution=16))
    assert [item.name for item in items] == ["img0.png", "img1.png", "img2.png"]
    assert [item.caption for item in items] == ["caption 0", "caption 1", "caption 2"]
    assert items[1].load().getpixel((0, 0)) == COLOURS[1]


def test_sidecar_folder_encodes_once_then_reads_the_cache(tmp_path):
    spec = DataSpec(sidecar_folder(tmp_path / "data"), resolution=16)
    encoders = CountingEncoders()
    first = encode(spec, tmp_path / "cache", encoders)
    assert not first.from_cache
    assert first.latents.shape == (3, 4, 2, 2)
    assert first.conditioning["encoder_hidden_states"].shape == (3, 2, 3)
    assert (encoders.image_calls, encoders.prompt_calls) == (2, 2)  # 3 items in batches of 2
    # red image -> channel 0 is +1, channels 1 and 2 are -1 after [-1, 1] scaling
    assert torch.allclose(first.latents[0, :3, 0, 0], torch.tensor([1.0, -1.0, -1.0]))

    again = CountingEncoders()
    second = encode(spec, tmp_path / "cache", again)
    assert second.from_cache
    assert (again.image_calls, again.prompt_calls) == (0, 0)
    assert torch.equal(first.latents, second.latents)
    assert torch.equal(first.conditioning["encoder_hidden_states"], second.conditioning["encoder_hidden_states"])
    assert second.captions == ["caption 0", "caption 1", "caption 2"]
    assert list((tmp_path / "cache").iterdir()) == [first.path]


def test_cache_key_follows_captions_model_and_resolution(tmp_path):
    folder = sidecar_folder(tmp_path / "data")
    spec = DataSpec(folder, resolution=16)
    base = encode(spec, tmp_path / "cache", CountingEncoders())
    assert encode(spec, tmp_path / "cache", CountingEncoders(), model_key="other model").path != base.path
    assert encode(DataSpec(folder, resolution=24), tmp_path / "cache", CountingEncoders()).path != base.path
    (folder / "img1.txt").write_text("a longer new caption", encoding="utf-8")
    changed = encode(spec, tmp_path / "cache", CountingEncoders())
    assert not changed.from_cache and changed.path != base.path
    assert changed.captions[1] == "a longer new caption"


def test_jsonl_captions_list_only_the_named_files(tmp_path):
    folder = tmp_path / "data"
    for i in range(3):
        make_image(folder / "images" / f"{i}.jpg", COLOURS[i])
    lines = [{"file": "images/2.jpg", "text": "blue square"}, {"file": "images/0.jpg", "text": "red square"}]
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    items = list_items(DataSpec(folder, resolution=16))  # captions.jsonl is found without configuring it
    assert [(item.name, item.caption) for item in items] == [("images/2.jpg", "blue square"), ("images/0.jpg", "red square")]
    encoded = encode(DataSpec(folder, resolution=16), tmp_path / "cache", CountingEncoders())
    assert torch.allclose(encoded.latents[0, :3, 0, 0], torch.tensor([-1.0, -1.0, 1.0]), atol=0.02)  # JPEG: blue


def test_jsonl_errors_name_the_line(tmp_path):
    folder = tmp_path / "data"
    make_image(folder / "a.png", COLOURS[0])
    captions = tmp_path / "caps.jsonl"
    captions.write_text('{"file": "a.png", "text": "ok"}\n{"file": "missing.png", "text": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"caps.jsonl line 2: image .*missing.png not found"):
        list_items(DataSpec(folder, captions=captions))
    captions.write_text('{"file": "a.png"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"caps.jsonl line 1: expected"):
        list_items(DataSpec(folder, captions=captions))
    captions.write_text("not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"caps.jsonl line 1: not valid JSON"):
        list_items(DataSpec(folder, captions=captions))


def test_hf_datasets_folder_with_configured_columns(tmp_path):
    import datasets

    images = [Image.new("RGB", (40, 32), colour) for colour in COLOURS[:4]]
    dataset = datasets.Dataset.from_dict(
        {"picture": images, "prompt": ["one", "two", "three", "four"]},
        features=datasets.Features({"picture": datasets.Image(), "prompt": datasets.Value("string")}),
    )
    dataset.save_to_disk(str(tmp_path / "hf"))
    spec = DataSpec(tmp_path / "hf", image_column="picture", text_column="prompt", resolution=16)
    items = list_items(spec)
    assert [item.caption for item in items] == ["one", "two", "three", "four"]
    encoders = CountingEncoders()
    encoded = encode(spec, tmp_path / "cache", encoders)
    assert encoded.latents.shape == (4, 4, 2, 2)
    assert torch.allclose(encoded.latents[2, :3, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))
    again = CountingEncoders()
    assert encode(spec, tmp_path / "cache", again).from_cache and again.image_calls == 0

    with pytest.raises(DataError, match=r"column 'image' not in dataset .*hf.*picture, prompt"):
        list_items(DataSpec(tmp_path / "hf", resolution=16))


def test_hf_dataset_dict_uses_the_train_split(tmp_path):
    import datasets

    split = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8), COLOURS[0])], "text": ["t"]},
                                       features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "hf"))
    assert [item.caption for item in list_items(DataSpec(tmp_path / "hf"))] == ["t"]


def test_empty_and_broken_data_fail_fast_naming_the_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=rf"no images found in {empty}"):
        list_items(DataSpec(empty))

    with pytest.raises(DataError, match=r"does not exist"):
        list_items(DataSpec(tmp_path / "nowhere"))

    folder = sidecar_folder(tmp_path / "nocaption", 2)
    (folder / "img1.txt").unlink()
    with pytest.raises(DataError, match=rf"caption file missing for {folder / 'img1.png'}"):
        list_items(DataSpec(folder))

    corrupt = sidecar_folder(tmp_path / "corrupt", 2)
    (corrupt / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(DataError, match=rf"image {corrupt / 'img1.png'} cannot be decoded"):
        verify_items(list_items(DataSpec(corrupt)))  # before any model is loaded
    with pytest.raises(DataError, match=rf"image {corrupt / 'img1.png'} cannot be decoded"):
        encode(DataSpec(corrupt, resolution=16), tmp_path / "cache", CountingEncoders())

    truncated = sidecar_folder(tmp_path / "truncated", 2)
    data = (truncated / "img0.png").read_bytes()
    (truncated / "img0.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"image {truncated / 'img0.png'} cannot be decoded"):
        verify_items(list_items(DataSpec(truncated)))
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # nothing half-written


def test_resize_and_crop_keeps_the_centre(tmp_path):
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    image.paste((255, 255, 255), (20, 0, 40, 20))  # white middle third
    pixels = resize_and_crop(image, 10)
    assert pixels.shape == (3, 10, 10)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert torch.allclose(pixels[:, 2:8, 2:8], torch.ones(3, 6, 6), atol=0.05)  # the crop is the white part


def test_the_data_fingerprint_is_the_content_of_every_file_the_items_read(tmp_path):
    """A replaced image of the same size and modification time, an image captions.jsonl names through `../` or in
    a hidden folder, a changed caption: each is other data (resume refuses, cached latents are not reused)."""
    import os

    from training.data import dataset_fingerprint

    folder = sidecar_folder(tmp_path / "data")
    spec = DataSpec(path=folder)
    before = dataset_fingerprint(spec)
    image = folder / "img1.png"
    stat = image.stat()
    replacement = tmp_path / "other.png"
    make_image(replacement, (1, 2, 3))
    assert replacement.stat().st_size == stat.st_size  # same size (flat colour PNGs)
    image.write_bytes(replacement.read_bytes())
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime
    assert dataset_fingerprint(spec) != before

    outside = make_image(tmp_path / "outside" / "far.png", COLOURS[0])
    hidden = make_image(folder / ".hidden" / "h.png", COLOURS[1])
    captions = folder / "captions.jsonl"
    captions.write_text("\n".join(json.dumps(r) for r in (
        {"file": "../outside/far.png", "text": "far"}, {"file": ".hidden/h.png", "text": "hidden"},
        {"file": str(outside), "text": "absolute"})), encoding="utf-8")
    with_jsonl = dataset_fingerprint(spec)
    for changed in (outside, hidden):
        make_image(changed, (9, 9, 9))
        now = dataset_fingerprint(spec)
        assert now != with_jsonl
        with_jsonl = now
    captions.write_text(captions.read_text(encoding="utf-8").replace('"far"', '"near"'), encoding="utf-8")
    assert dataset_fingerprint(spec) != with_jsonl


def test_a_caption_file_that_is_not_utf8_names_the_file(tmp_path):
    folder = sidecar_folder(tmp_path / "data")
    (folder / "img2.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"img2\.txt is not UTF-8.*save it as UTF-8"):
        list_items(DataSpec(path=folder))
