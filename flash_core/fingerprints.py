"""Identities a resume and a target cache compare: exact, device-independent fingerprints of tensors.

    tensor_fingerprint(named tensors) -> str      # names, shapes, dtypes and exact bit checksums
    teacher_fingerprint(denoiser) -> str          # weights, prediction type, schedule, patches (Denoiser.identity)
    conditioning_tensors(prefix, cond)            # a Conditioning's tensors, named

Low in the house (imports nothing of the trainer), so run.py and target_cache.py both use it without a cycle.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from flash_core.denoiser import Conditioning


def conditioning_tensors(prefix: str, cond: Conditioning) -> list[tuple[str, Tensor]]:
    tensors = [(f"{prefix}.{name}", getattr(cond, name)) for name in ("encoder_hidden_states", "pooled", "time_ids", "attention_mask")]
    tensors += [(f"{prefix}.extra.{k}", v) for k, v in sorted(cond.extra.items())]
    return [(k, v) for k, v in tensors if v is not None]


_CHECKSUM_CHUNK = 1 << 22  # elements per int64 pass (bounded temporary memory)
_WORD_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


_KNUTH = 2 * 2_654_435_761  # weights 2 K i + 1: odd for every position i
_BASE_WEIGHTS: dict[torch.device, Tensor] = {}


def _checksums(tensor: Tensor) -> tuple[int, int]:
    """Two exact integer checksums of a tensor's bits, computed where the tensor lives (GPU or CPU): the sum of
    its words and their sum weighted by 2 K i + 1 at position i, both mod 2^64 (wrapping int64 arithmetic is
    exact, so every device gives the same numbers). Any change of one element changes the weighted sum; this
    detects changed weights, it is not a cryptographic hash."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    words = flat.view(_WORD_DTYPES[flat.element_size()])
    base = _BASE_WEIGHTS.get(words.device)
    if base is None:
        base = _BASE_WEIGHTS[words.device] = torch.arange(_CHECKSUM_CHUNK, device=words.device, dtype=torch.int64) * _KNUTH + 1
    plain = weighted = 0
    for start in range(0, words.numel(), _CHECKSUM_CHUNK):
        chunk = words[start : start + _CHECKSUM_CHUNK].to(torch.int64)
        chunk_sum = int(chunk.sum())
        # sum_j w_j (2K (start + j) + 1) = sum_j w_j (2K j + 1) + 2K start sum_j w_j
        weighted += int((chunk * base[: chunk.numel()]).sum()) + _KNUTH * start * chunk_sum
        plain += chunk_sum
    return plain % 2**64, weighted % 2**64


def tensor_fingerprint(named: Sequence[tuple[str, Tensor]]) -> str:
    """sha256 over the names, shapes, dtypes and exact bit checksums of every tensor (see _checksums)."""
    digest = hashlib.sha256()
    for name, tensor in named:
        plain, weighted = _checksums(tensor)
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{plain}|{weighted}\n".encode())
    return digest.hexdigest()[:32]


class TeacherIdentityError(ValueError):
    """Something changes the teacher's output that its fingerprint cannot describe: a resume or a target cache
    could not tell a changed teacher from the same one, so the run is refused rather than the thing ignored."""


def teacher_fingerprint(denoiser) -> str:
    """The teacher as the trainer sees it: every frozen tensor of its network (LoRA adapters excluded, peft's
    `.base_layer` wrapper names folded back), its prediction type and noise schedule, and a description of every
    patch or wrapper the backend applies around the network (Denoiser.identity()). A teacher with other weights,
    another schedule (zero-terminal-SNR, v-prediction) or another patch (FreeU, attention patches) differs."""
    module = denoiser.lora_module
    named = [(n, t) for n, t in list(module.named_parameters()) + list(module.named_buffers()) if "lora_" not in n]
    named = sorted(((n.replace(".base_layer", ""), t) for n, t in named), key=lambda item: item[0])
    digest = hashlib.sha256(tensor_fingerprint(named).encode())
    digest.update(json.dumps(describe(denoiser.identity(), "the teacher"), sort_keys=True).encode())
    return digest.hexdigest()[:32]


_DESCRIBE_DEPTH = 6


def describe(value: Any, where: str, depth: int = 0) -> Any:
    """A JSON-able, run-independent description of `value` (numbers, strings, tensors by fingerprint, containers,
    functions by module.qualname with their bound state: partial arguments, closure cells, the instance a method
    is bound to). Raises TeacherIdentityError naming `where` for what cannot be described."""
    if depth > _DESCRIBE_DEPTH:
        raise TeacherIdentityError(f"{where} is nested too deeply to describe: remove that patch from the teacher MODEL")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)  # exact, and NaN / inf stay JSON-able
    if isinstance(value, torch.Tensor):
        return {"tensor": tensor_fingerprint([("t", value)])}
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [describe(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): describe(v, f"{where}[{k!r}]", depth + 1) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, functools.partial):
        return {"partial": describe(value.func, where, depth + 1), "args": describe(list(value.args), where, depth + 1),
                "keywords": describe(dict(value.keywords), where, depth + 1)}
    if inspect.ismethod(value):
        return {"method": _qualified(value.__func__), "of": describe(value.__self__, where, depth + 1)}
    if inspect.isfunction(value):
        cells = [c.cell_contents for c in (value.__closure__ or ()) if _has_contents(c)]
        return {"function": _qualified(value), "closure": describe(cells, f"{where} (closure of {_qualified(value)})", depth + 1),
                "defaults": describe(list(value.__defaults__ or ()), where, depth + 1)}
    if isinstance(value, torch.nn.Module):
        state = sorted(value.state_dict().items())
        return {"module": _qualified(type(value)), "state": tensor_fingerprint(state) if state else None}
    if hasattr(value, "__dict__") and not isinstance(value, type):
        state = {k: v for k, v in vars(value).items() if not k.startswith("__")}
        return {"object": _qualified(type(value)), "state": describe(state, f"{where} ({type(value).__name__})", depth + 1)}
    if isinstance(value, type) or inspect.isbuiltin(value):
        return {"type": _qualified(value)}
    raise TeacherIdentityError(
        f"{where}: a {type(value).__module__}.{type(value).__qualname__} changes the teacher but cannot be described, "
        "so a resume or a target cache could not tell whether the teacher changed. Remove that patch from the teacher "
        "MODEL (it is trained as the teacher sees it), or bind only numbers, strings, tensors or modules to it.")


def _qualified(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


__all__ = ["TeacherIdentityError", "conditioning_tensors", "describe", "teacher_fingerprint", "tensor_fingerprint"]
