"""Training checkpoints: ONE format for the node, the CLI and every benchmark.

A checkpoint is a folder `step-000500/` holding `state.flashckpt` (weights_only-loadable: run settings,
fingerprints, trainer state, step log), `rank-<r>.flashckpt` per process (its RNG states) and `meta.json`,
written last: the completeness marker. A `latest` file names the newest; the last `keep` are kept.
Checkpoint files carry an extension no ComfyUI model folder lists, so no LoRA dropdown offers a training state.

    CheckpointStore(root, keep=2, process_index=0, num_processes=1, barrier=None)
        .latest() / .list() / .save(run) / .load(folder)     # run: flash_core.run.Run (duck-typed)
Loading a checkpoint older than others in the same store is refused (CheckpointError naming them): resuming
from it would replace the later checkpoints and the exported LoRA.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from flash_core.files import (
    TEMP_PREFIX,
    replace_folder_atomic,
    torch_save_atomic,
    write_text_atomic,
)

CHECKPOINT_FORMAT = "flash-run-checkpoint"
CHECKPOINT_VERSION = 3  # 3: counter-based training draws (no generator states)
CHECKPOINT_PREFIX = "step-"
LATEST_FILE = "latest"
# Checkpoint files carry an extension no ComfyUI model folder lists (.pt / .ckpt would put a training state in every
# LoRA dropdown); checkpoints of earlier versions (.pt) are still read.
CHECKPOINT_SUFFIX = ".flashckpt"
STATE_FILE = f"state{CHECKPOINT_SUFFIX}"
LEGACY_SUFFIX = ".pt"
META_FILE = "meta.json"
RANK_KEYS = ("torch_rng", "python_random", "cuda_rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (corrupt, another format or version, another number of processes)."""



def rank_file_name(process_index: int, suffix: str = CHECKPOINT_SUFFIX) -> str:
    """One process's file of a checkpoint (its RNG states)."""
    return f"rank-{process_index}{suffix}"


def _step_of(folder: Path) -> int:
    return int(folder.name[len(CHECKPOINT_PREFIX):])


class CheckpointStore:
    """root/step-000500/{state.flashckpt, rank-<r>.flashckpt, meta.json}, root/latest. Every file is written atomically into a
    staging folder that is renamed when complete; meta.json marks a complete checkpoint. After a save, the
    `keep` newest checkpoints up to the saved step stay; checkpoints of later steps (an abandoned run that went
    further before a fresh start) are removed once the new run has one."""

    def __init__(self, root: str | os.PathLike, keep: int = 2, process_index: int = 0, num_processes: int = 1,
                 barrier: Callable[[], None] | None = None):
        self.root, self.keep = Path(root), max(1, keep)
        self.process_index, self.num_processes = process_index, num_processes
        self.barrier = barrier or (lambda: None)
        self.last_saved: Path | None = None

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    def list(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                 and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / META_FILE).is_file()]
        return sorted(found, key=_step_of)

    def latest(self) -> Path | None:
        marker = self.root / LATEST_FILE
        if marker.is_file():
            folder = self.root / marker.read_text(encoding="utf-8").strip()
            if (folder / META_FILE).is_file():
                return folder
        found = self.list()
        return found[-1] if found else None

    def save(self, run) -> Path:
        """Every process calls this at the same step (collective when num_processes > 1)."""
        step = run.distiller.step
        name = f"{CHECKPOINT_PREFIX}{step:06d}"
        final, staging = self.root / name, self.root / f"{TEMP_PREFIX}{name}"  # a killed save leaves an orphan
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.barrier()
        state = run.distiller.state_dict()
        rank_state = {key: state.pop(key) for key in RANK_KEYS if key in state}
        torch_save_atomic(rank_state, staging / rank_file_name(self.process_index))
        if self.is_main:
            torch_save_atomic({
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
                "settings": run.settings, "fingerprints": run.fingerprints, "history": run.history,
                "num_processes": self.num_processes, "distiller": state,
            }, staging / STATE_FILE)
        self.barrier()
        if self.is_main:
            meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
                    "phase": run.distiller.phase, "num_processes": self.num_processes, "settings": run.settings}
            write_text_atomic(staging / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
            replace_folder_atomic(staging, final)
            write_text_atomic(self.root / LATEST_FILE, name + "\n")
            self._prune(step)
        self.barrier()
        self.last_saved = final
        return final

    def _prune(self, step: int) -> None:
        found = self.list()
        keep = [p for p in found if _step_of(p) <= step][-self.keep:]
        for old in found:
            if old not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def later_than(self, step: int, folder: Path | None = None) -> list[Path]:
        """The complete checkpoints in this store of steps after `step` (other than `folder`)."""
        return [p for p in self.list() if _step_of(p) > step and (folder is None or p.resolve() != folder.resolve())]

    def _refuse_going_back(self, folder: Path, step: int) -> None:
        """Resuming from a checkpoint older than ones this store holds would replace them (each later step is saved
        again under the same name, the rest pruned) and, at the end, the exported LoRA: refused, whatever else is
        allowed (--allow-changes included), until the user says so by deleting them (or resumes elsewhere)."""
        later = self.later_than(step, folder)
        if later:
            names = ", ".join(p.name for p in later)
            raise CheckpointError(
                f"{folder} is step {step}, but {self.root} holds later checkpoints ({names}): continuing from step "
                f"{step} would replace them as the run passes their steps, and at its end the exported LoRA. To go "
                f"back to step {step}, delete {names} first; to keep them, copy {folder} into the checkpoints folder "
                "of another output and resume there"
            )

    def load(self, folder: str | os.PathLike) -> dict:
        """The checkpoint's state with this process's RNG states merged in (weights_only: no arbitrary objects)."""
        folder = Path(folder)
        suffix = CHECKPOINT_SUFFIX if (folder / STATE_FILE).is_file() or not (folder / f"state{LEGACY_SUFFIX}").is_file() else LEGACY_SUFFIX
        try:
            state = torch.load(folder / f"state{suffix}", map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"{folder} is not a checkpoint of this version (no {STATE_FILE}); start fresh") from None
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
            raise CheckpointError(f"the checkpoint {folder / STATE_FILE} cannot be read ({err}); delete it or start fresh") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"{folder} is not a version-{CHECKPOINT_VERSION} Flash checkpoint; delete it or start fresh")
        self._refuse_going_back(folder, int(state.get("step", 0)))
        rank_file = folder / rank_file_name(self.process_index, suffix)
        if state.get("num_processes", 1) != self.num_processes or not rank_file.is_file():
            raise CheckpointError(
                f"{folder} was saved by {state.get('num_processes')} processes, this run has {self.num_processes}; "
                "resume with the same number of processes"
            )
        state["distiller"].update(torch.load(rank_file, map_location="cpu", weights_only=True))
        return state
