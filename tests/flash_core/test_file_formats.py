"""flash_core.file_formats: files are recognised by their structure; no valid safetensors file is refused,
pickles and zips are named for what they are (never unpickled); JSON errors name the file and the place."""

from __future__ import annotations

import pickle
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nodes"))
import lora_fixtures as F

from flash_core import file_formats as FF

TENSORS = {"lora_unet_a.lora_down.weight": torch.ones(2, 4), "lora_unet_a.lora_up.weight": torch.ones(4, 2)}


class _CreatesFileWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("start", [b"\x80", b"PK"], ids=["0x80-like-pickle", "PK-like-zip"])
def test_safetensors_whose_header_length_looks_like_a_pickle_or_zip_signature_is_read(tmp_path, start):
    path = F.safetensors_with_header_start(tmp_path / "lora.safetensors", TENSORS, start)
    assert path.read_bytes()[: len(start)] == start
    assert FF.identify(path) == FF.SAFETENSORS
    tensors, metadata = FF.read_safetensors(path)
    assert tensors.keys() == TENSORS.keys() and metadata["padding"].startswith("x")


def test_no_header_length_is_refused(tmp_path):
    """Every low byte a header length can have (multiples of 8: padding to 8 is safetensors' own rule)."""
    seen = set()
    path = tmp_path / "sweep.safetensors"
    for padding in range(0, 256 * 8, 7):
        data = save(TENSORS, metadata={"padding": "x" * padding})
        path.write_bytes(data)
        seen.add(data[0])
        assert FF.identify(path) == FF.SAFETENSORS, data[:8]
    assert {0x80, ord("P")} <= seen and len(seen) == 32  # all 32 residues of a multiple of 8 modulo 256


@pytest.mark.parametrize("name", ["lora.pt", "lora.ckpt", "renamed.safetensors"])
@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_torch_save_checkpoints_are_refused_as_pickles_naming_the_file(tmp_path, name, container):
    path = tmp_path / name
    torch.save(TENSORS, path, _use_new_zipfile_serialization=container == "zip")
    assert FF.identify(path) == (FF.TORCH_ZIP if container == "zip" else FF.PICKLE)
    with pytest.raises(FF.FileFormatError) as error:
        FF.read_safetensors(path)
    message = str(error.value)
    assert str(path) in message and "pickle-based" in message and "never unpickles" in message
    assert "Convert it to .safetensors" in message


def test_a_pickle_payload_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(marker)))
    with pytest.raises(FF.FileFormatError, match="pickle-based"):
        FF.read_safetensors(path)
    assert not marker.exists()


def test_signatureless_pickles_are_named_by_their_suffix(tmp_path):
    """Protocol 0/1 pickles have no signature: a pickle suffix that is not safetensors is refused as a pickle."""
    marker = tmp_path / "pwned"
    path = tmp_path / "old.ckpt"
    path.write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(marker), protocol=0))
    assert FF.identify(path) == FF.PICKLE
    with pytest.raises(FF.FileFormatError, match=r"old\.ckpt' is a pickle-based checkpoint \(a pickle file by its "
                                                 r"\.ckpt name; its bytes are not safetensors\)"):
        FF.read_safetensors(path)
    assert not marker.exists()
    (tmp_path / "text.safetensors").write_bytes(b"hello, not a model")
    assert FF.identify(tmp_path / "text.safetensors") == FF.UNKNOWN


def test_a_zip_archive_is_named_as_a_zip(tmp_path):
    inner = tmp_path / "inner.safetensors"
    save_file(TENSORS, str(inner))
    for name in ("lora.zip", "lora.safetensors"):
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as archive:
            archive.write(inner, "flash/lora.safetensors")
        assert FF.identify(path) == FF.ZIP
        with pytest.raises(FF.FileFormatError, match=rf"{name}' is a zip archive.*unzip it"):
            FF.read_safetensors(path)


@pytest.mark.parametrize("name", ["model.ckpt", "lora.pt", "lora.safetensors"])
def test_an_empty_file_is_named_empty_not_a_pickle(tmp_path, name):
    """An interrupted download leaves 0 bytes: that is what the file is, whatever its name says (an empty
    .ckpt was called a pickle-based checkpoint, with advice to convert it)."""
    path = tmp_path / name
    path.write_bytes(b"")
    assert FF.identify(path) == FF.EMPTY
    with pytest.raises(FF.FileFormatError) as error:
        FF.read_safetensors(path)
    message = str(error.value)
    assert f"{name}' is empty (0 bytes)" in message and "re-download it" in message and "pickle" not in message


def test_damaged_and_missing_files(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file(TENSORS, str(path))
    data = path.read_bytes()
    for damaged in (data[:-3], data[:20], b"\x00" * 8):
        path.write_bytes(damaged)
        with pytest.raises(FF.FileFormatError, match=r"lora\.safetensors' is not a valid \.safetensors file "
                                                     r"\(truncated or corrupt\): re-save it"):
            FF.read_safetensors(path, fix="re-save it")
    with pytest.raises(FF.FileFormatError, match="nope.safetensors' does not exist"):
        FF.read_safetensors(tmp_path / "nope.safetensors")


def test_read_json_names_the_file_the_place_and_the_fix(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"r": 4,\n "lora_alpha": }')
    with pytest.raises(FF.FileFormatError, match=r"config\.json' \(adapter config\) is not valid JSON: .* at line 2, "
                                                 r"column 16; fix it"):
        FF.read_json(path, what="adapter config", fix="fix it")
    path.write_text("[1, 2]")
    with pytest.raises(FF.FileFormatError, match=r"must hold a JSON object \(found: array\)"):
        FF.read_json(path)
    assert FF.read_json(path, expect=None) == [1, 2]
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(FF.FileFormatError, match="is not UTF-8 text"):
        FF.read_json(path)
    with pytest.raises(FF.FileFormatError, match=r"missing\.json' \(JSON file\) does not exist"):
        FF.read_json(tmp_path / "missing.json")
