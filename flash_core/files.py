"""Atomic file writes: a temporary file in the target's folder, then os.replace.

Readers (ComfyUI's model lists, a resumed run, a crash) see the old file or the new one, never half a file;
a failed write leaves no temporary file behind. Temporary names start with ".tmp-" (hidden, and never a
model extension, so ComfyUI's lists do not show them).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from typing import Any

TEMP_PREFIX = ".tmp-"


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Create `path`'s folder, call write(temporary path), then move the result onto `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TEMP_PREFIX}{os.path.basename(path)}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text)

    write_atomic(path, write)


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    import torch

    write_atomic(path, lambda tmp: torch.save(obj, tmp))
