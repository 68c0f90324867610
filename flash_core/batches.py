"""What a training run trains on, and in which order: the one batch order of every front end and process.

    batch_indices(seed, step, num_items, batch_size, rank=0, num_processes=1) -> list[int]
    Dataset (protocol: len, batch(indices, step) -> Batch, fingerprint())
    TensorDataset(latents, cond, uncond)

A function of (seed, step) only, so a resumed run, a target cache built ahead of training and every DDP rank
agree on which rows each step sees. Low in the house: run.py and target_cache.py both import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from flash_core.denoiser import Conditioning
from flash_core.distill import Batch
from flash_core.fingerprints import conditioning_tensors, tensor_fingerprint




def _epoch_permutation(seed: int, epoch: int, num_items: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator).tolist()


def batch_indices(seed: int, step: int, num_items: int, batch_size: int, rank: int = 0, num_processes: int = 1) -> list[int]:
    """Dataset rows of this process for optimiser step `step` (0-based), a function of its arguments only.

    The global batch of step s is positions [s G, (s + 1) G) of an endless stream of per-epoch permutations
    (epoch e seeded with seed * 1_000_003 + e), G = batch_size * num_processes; process r takes its slice
    [r batch_size, (r + 1) batch_size). Every row is seen once per epoch; ranks never overlap within a step.
    """
    if num_items < 1:
        raise ValueError("the dataset is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    global_batch = batch_size * num_processes
    start = step * global_batch
    rows: list[int] = []
    epoch, position = divmod(start, num_items)
    while len(rows) < global_batch:
        permutation = _epoch_permutation(seed, epoch, num_items)
        take = min(num_items - position, global_batch - len(rows))
        rows += permutation[position : position + take]
        epoch, position = epoch + 1, 0
    return rows[rank * batch_size : (rank + 1) * batch_size]


class Dataset(Protocol):
    """What the run trains on: N items; `batch(indices, step)` builds the Batch of those rows."""

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int], step: int) -> Batch: ...

    def fingerprint(self) -> str: ...


class TensorDataset:
    """Latents [N, C, h, w] (model space) with conditioning of batch N and an unconditional of batch 1 or N."""

    def __init__(self, latents: Tensor, cond: Conditioning, uncond: Conditioning):
        if cond.batch_size != latents.shape[0]:
            raise ValueError(f"{cond.batch_size} conditionings for {latents.shape[0]} latents")
        self.latents, self.cond, self.uncond = latents, cond, uncond

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batch(self, indices: Sequence[int], step: int) -> Batch:
        index = torch.as_tensor(list(indices), dtype=torch.long, device=self.latents.device)
        uncond = self.uncond if self.uncond.batch_size == 1 else self.uncond[index.to(_cond_device(self.uncond))]
        return Batch(self.latents.index_select(0, index), self.cond[index.to(_cond_device(self.cond))], uncond)

    def fingerprint(self) -> str:
        return tensor_fingerprint(
            [("latents", self.latents)] + conditioning_tensors("cond", self.cond) + conditioning_tensors("uncond", self.uncond)
        )


def _cond_device(cond: Conditioning) -> torch.device:
    return cond.encoder_hidden_states.device


__all__ = ["Dataset", "TensorDataset", "batch_indices"]
