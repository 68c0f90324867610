"""`flash-distill cache-targets`: solve the teacher targets of a run once (flash_core.target_cache)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.cli.config import TrainConfig
from training.cli.errors import EXIT_VERIFY_FAILED, ConfigError
from training.cli.train import prepare


def cache_folder(config: TrainConfig) -> Path:
    return config.target_cache if config.target_cache is not None else config.output_dir / "target-cache"


def cache_targets(config: TrainConfig, teacher_batch: int | None, processes: int, verify: int) -> int:
    """`flash-distill cache-targets`: build (or finish) the run's target cache, then optionally verify it.
    Returns the exit code (0, or EXIT_VERIFY_FAILED)."""
    import time

    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from flash_core.session import TrainingSession
    from flash_core.target_cache import TargetCacheError

    accelerator = Accelerator(mixed_precision="no")
    if accelerator.num_processes > 1:
        raise ConfigError("cache-targets runs in one process; `--processes N` builds the targets of an N-process run")
    folder = cache_folder(config)
    prepared = prepare(config, accelerator)
    session = TrainingSession(prepared.teacher.denoiser, prepared.distill_config, prepared.dataset,
                              output_label=f"flash-distill cache-targets --config {config.source}", device=accelerator.device)
    progress = tqdm(desc="teacher targets (shards)", unit="shard", dynamic_ncols=True)

    def advance(done: int, total: int) -> None:
        progress.total = total
        progress.n = done
        progress.refresh()

    started = time.perf_counter()
    try:  # the session takes the cache folder's lock and removes a killed build's temporaries
        cache = session.targets(folder, build=True, num_processes=processes, teacher_batch=teacher_batch, progress=advance)
    except TargetCacheError as error:
        raise ConfigError(f"cache-targets: {error}") from None
    finally:
        progress.close()
    count = sum(len(steps) for steps in cache.plan) * session.recipe.batch_size * processes
    print(f"flash-distill: target cache {folder}: {count} targets in {len(cache.plan)} shards "
          f"({time.perf_counter() - started:.1f} s this session)", file=sys.stderr)
    if verify:
        try:
            report = session.verify_targets(verify, teacher_batch=teacher_batch)
        except TargetCacheError as error:
            print(f"flash-distill: error: {error}", file=sys.stderr)
            return EXIT_VERIFY_FAILED
        print(f"flash-distill: verified {report['checked']} targets: max relative error {report['max_error']:.2e} "
              f"(tolerance {report['tolerance']:g})", file=sys.stderr)
    return 0




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
