"""flash-distill's exit codes and the error every config / command-line problem raises."""

from __future__ import annotations

EXIT_CONFIG_ERROR = 2
EXIT_NON_FINITE = 3  # a non-finite loss / gradient / latent stopped the run (flash_core.run.NonFiniteError)
EXIT_WRITE_ERROR = 4  # a checkpoint or export could not be written (full disk, permissions); earlier ones are kept
EXIT_VERIFY_FAILED = 5  # cache-targets --verify: stored targets differ from a fresh solve
EXIT_INTERRUPTED = 130


class ConfigError(ValueError):
    """A problem with the run's config (or command line); the message names the key and what to do."""
