"""The `flash-distill` entry point: parse the command line, run training or cache-targets, map errors to exit codes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.cli.cache_targets import cache_targets, parse_cache_args
from training.cli.config import load_config
from training.cli.errors import EXIT_CONFIG_ERROR, EXIT_NON_FINITE, EXIT_WRITE_ERROR, ConfigError
from training.cli.train import run

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flash-distill", description="Distil a Flash Diffusion LoRA student (see training/configs/*.yaml).")
    parser.add_argument("--config", required=True, help="YAML config (training/configs/sd15.yaml, sdxl, pixart, sd3, tiny_sd15)")
    parser.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
        help="continue from the latest checkpoint in output_dir (or the given checkpoint folder)",
    )
    parser.add_argument(
        "--allow-changes", action="store_true",
        help="with --resume: continue although settings, teacher weights or data differ from the checkpoint's",
    )
    parser.add_argument("--dump-rank-lora", action="store_true", help="debug/test: every process writes its LoRA to output_dir/debug/")
    parser.add_argument("--target-cache", default=None, metavar="DIR",
                        help="read the teacher targets from this cache (flash-distill cache-targets) instead of solving")
    return parser.parse_args(argv)



def main(argv: list[str] | None = None) -> int:
    """Console entry point of `flash-distill`; returns the exit code (2 for config / data errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    building = argv[:1] == ["cache-targets"]
    args = parse_cache_args(argv[1:]) if building else parse_args(argv)
    from flash_core.files import FileWriteError, OutputLockedError
    from flash_core.run import NonFiniteError
    from flash_core.target_cache import TargetCacheError
    from training.data import DataError

    try:
        config = load_config(args.config)
        for warning in config.deprecations:
            print(f"flash-distill: warning: {warning}", file=sys.stderr)
        if args.target_cache is not None:
            config.target_cache = Path(args.target_cache).expanduser()
        if building:
            return cache_targets(config, args.teacher_batch, args.processes, args.verify)
        return run(config, args.resume, args.dump_rank_lora, args.allow_changes)
    except (ConfigError, DataError, OutputLockedError) as error:
        print(f"flash-distill: error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except TargetCacheError as error:  # a shard found damaged mid-run: the finished steps are checkpointed
        print(f"flash-distill: error: target_cache: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except FileWriteError as error:  # a full disk / unwritable folder: the previous checkpoint is kept
        print(f"flash-distill: error: {error}", file=sys.stderr)
        return EXIT_WRITE_ERROR
    except NonFiniteError as error:  # nothing of the bad step was saved; earlier checkpoints are kept
        print(f"flash-distill: error: {error}", file=sys.stderr)
        return EXIT_NON_FINITE


if __name__ == "__main__":
    sys.exit(main())
