"""What a file is, by its structure, and the one reader of .safetensors and JSON files in this pack.

A file is safetensors when its first 8 bytes (the little-endian length N of its header) and the N-byte
JSON header that follows parse, and the header fits in the file - whatever the file is called. Anything
else is named for what it is: a pickle stream (protocol 2 and up start with the PROTO opcode 0x80 and
the protocol number), a zip archive (``PK\\x03\\x04``; torch.save's container, with a pickle inside), or a
damaged / unknown file. Pickles are never unpickled: loading one can run arbitrary code.

Sniffing the first bytes alone is wrong: a valid safetensors header length can start with 0x80 or with
the bytes "PK" (about 3 % of files). The header is parsed first, so no valid safetensors file is refused.

Errors are :class:`FileFormatError` and name the file, what it is, and what to do.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

SAFETENSORS = "safetensors"
PICKLE = "pickle"
TORCH_ZIP = "torch zip checkpoint"  # torch.save's zip container: data.pkl (a pickle) + tensor blobs
ZIP = "zip"
EMPTY = "empty"  # 0 bytes: an interrupted download or copy, whatever the name says
UNKNOWN = "unknown"

# Names that say "pickle" when the bytes do not (protocol 0/1 pickles have no signature).
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
SAFETENSORS_HEADER_LIMIT = 100_000_000  # the safetensors library's own cap on the header size (bytes)
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")  # local file header, empty archive, spanned
_PICKLE_PROTO = 0x80  # pickle's PROTO opcode, first byte of every protocol >= 2 stream

CONVERT_PICKLE = (
    "Convert it to .safetensors (if you trust its source, in Python: `import torch; from safetensors.torch "
    "import save_file; save_file(torch.load(PATH, weights_only=True), OUT.safetensors)`), or download the "
    ".safetensors release of the same file."
)


class FileFormatError(ValueError):
    """A file this pack will not read: missing, damaged, a pickle or zip, bad JSON. The message says which and why."""


def safetensors_header(path: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed JSON header of a safetensors file, or None when the file is not one by its structure.

    Structure: 8 bytes little-endian header length N (2 <= N <= the rest of the file, and at most
    safetensors' 100 MB cap), then N bytes of UTF-8 JSON holding an object. Tensor data is not checked
    here (the safetensors library checks offsets when it reads).
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                return None
            length = int.from_bytes(prefix, "little")  # the header's byte length (safetensors format)
            if not 2 <= length <= min(size - 8, SAFETENSORS_HEADER_LIMIT):
                return None
            raw = handle.read(length)
    except OSError:
        return None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def identify(path: str | os.PathLike) -> str:
    """SAFETENSORS, PICKLE, TORCH_ZIP, ZIP, EMPTY or UNKNOWN, from the file's structure (never by unpickling).

    The safetensors structure is checked first: a valid header wins whatever the first bytes look like.
    """
    if safetensors_header(path) is not None:
        return SAFETENSORS
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return UNKNOWN
    if not head:
        return EMPTY  # not a pickle by its name: there is nothing in it
    if head.startswith(_ZIP_SIGNATURES):
        try:
            with zipfile.ZipFile(path) as archive:  # lists names only; nothing is unpickled
                names = archive.namelist()
        except (OSError, zipfile.BadZipFile):
            return ZIP
        return TORCH_ZIP if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names) else ZIP
    if _starts_like_pickle(path):
        return PICKLE
    if os.fspath(path).lower().endswith(PICKLE_SUFFIXES):
        return PICKLE  # protocol 0/1 pickles (and legacy checkpoints) carry no signature; the name says pickle
    return UNKNOWN


def _starts_like_pickle(path: str | os.PathLike) -> bool:
    """The PROTO opcode and a protocol number 2-5: how every pickle of protocol 2 and up begins."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == _PICKLE_PROTO and 2 <= head[1] <= 5


def refusal(path: str | os.PathLike, kind: str, fix: str = "re-download it") -> FileFormatError:
    """The error for a file that is not safetensors, naming what it is and what to do instead."""
    path = os.fspath(path)
    if kind in (PICKLE, TORCH_ZIP):
        what = "a PyTorch zip checkpoint with a pickle inside" if kind == TORCH_ZIP else "a pickle stream"
        if kind == PICKLE and not _starts_like_pickle(path):
            what = f"a pickle file by its {os.path.splitext(path)[1]} name; its bytes are not safetensors"
        return FileFormatError(
            f"'{path}' is a pickle-based checkpoint ({what}), not a .safetensors file. This pack never unpickles "
            f"files, because loading a pickle can run arbitrary code. {CONVERT_PICKLE}"
        )
    if kind == ZIP:
        return FileFormatError(
            f"'{path}' is a zip archive, not a .safetensors file: unzip it and use the .safetensors file inside."
        )
    if kind == EMPTY:
        return FileFormatError(
            f"'{path}' is empty (0 bytes): its download or copy did not finish. Delete it and {fix}; this pack "
            "reads .safetensors files."
        )
    return FileFormatError(
        f"'{path}' is not a valid .safetensors file (truncated or corrupt): {fix}. (Its first 8 bytes and JSON "
        "header do not parse as safetensors.)"
    )


def read_safetensors(path: str | os.PathLike, fix: str = "re-download it") -> tuple[dict[str, Any], dict[str, str]]:
    """Every tensor and the metadata of a safetensors file (CPU tensors); anything else is refused.

    fix: what the user should do with a damaged file (e.g. "re-save it with save_pretrained").
    Raises FileFormatError for missing files, pickles, zips and damaged files.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileFormatError(f"'{path}' does not exist.")
    kind = identify(path)
    if kind != SAFETENSORS:
        raise refusal(path, kind, fix)

    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118  (not a dict)
    except Exception as error:  # safetensors raises its own error types (and OSError) for damaged files
        raise FileFormatError(
            f"'{path}' is not a valid .safetensors file (truncated or corrupt): {fix}. ({error})"
        ) from error
    return tensors, metadata


def read_json(path: str | os.PathLike, what: str = "JSON file", fix: str = "fix or re-create it",
              expect: type | None = dict) -> Any:
    """A JSON file's value; errors name the file, `what` it is, the line/column of a syntax error, and `fix`.

    expect: the type the top-level value must have (dict by default; None accepts any JSON value).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileFormatError(f"'{path}' ({what}) does not exist.")
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except UnicodeDecodeError as error:
        raise FileFormatError(f"'{path}' ({what}) is not UTF-8 text: {fix}.") from error
    except json.JSONDecodeError as error:
        raise FileFormatError(
            f"'{path}' ({what}) is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}; {fix}."
        ) from error
    except OSError as error:
        raise FileFormatError(f"cannot read '{path}' ({what}): {error.strerror or error}.") from error
    if expect is not None and not isinstance(value, expect):
        raise FileFormatError(
            f"'{path}' ({what}) must hold a JSON {_json_type_name(expect)} (found: {_json_type_name(type(value))}); "
            f"{fix}."
        )
    return value


def _json_type_name(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "true/false",
            type(None): "null"}.get(kind, kind.__name__)
