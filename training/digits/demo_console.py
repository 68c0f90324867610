"""`make demo`'s terminal and log: short lines (Console: a live progress line rewritten in place on a terminal,
plain lines at most every few seconds otherwise), the numbered steps and their seconds (StepLog), and
<cache>/demo/demo.log for what the terminal leaves out (DemoLog)."""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from flash_core.files import write_text_atomic

STEPS = ("teacher", "setup", "distillation", "comparison", "scoring")  # timing.json's steps, in run order
LINE_WIDTH = 120  # no line of the demo's own output is wider (a path alone may be)
PLAIN_EVERY_S = 15.0  # without a terminal: one progress line at most this often
INDENT = "      "


class Console:
    """The demo's terminal: short lines. Live progress is one line rewritten in place (\\r) on a terminal;
    without one (a pipe, a log file, a test) it is printed as a plain line at most every PLAIN_EVERY_S."""

    def __init__(self, stream: TextIO | None = None, every_s: float = PLAIN_EVERY_S):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.width = min(LINE_WIDTH, shutil.get_terminal_size().columns - 1) if self.tty else LINE_WIDTH
        self.every_s = every_s
        self._live = ""  # what the live line shows now (terminal only)
        self._last_plain = -math.inf

    def line(self, text: str = "") -> None:
        self.end_live()
        self.stream.write(text + "\n")
        self.stream.flush()

    def live(self, text: str, force: bool = False) -> bool:
        """Show `text` as the live line; False when it was not printed (no terminal, printed too recently).
        force: print it now, and on a terminal keep it (the final state of a progress line)."""
        text = text[: self.width]
        if self.tty:
            self.stream.write("\r" + text + " " * max(0, len(self._live) - len(text)) + ("\n" if force else ""))
            self._live = "" if force else text
        elif force or time.monotonic() - self._last_plain >= self.every_s:
            self.stream.write(text + "\n")
            self._last_plain = time.monotonic()
        else:
            return False
        self.stream.flush()
        return True

    def labelled(self, label: str, path: Path | str, indent: str = "") -> None:
        """`label: path` on one line when it fits the width, else the path on the next line."""
        line = f"{indent}{label}: {shown(path)}"
        self.line(line if len(line) <= self.width else f"{indent}{label}:\n{INDENT}{shown(path)}")

    def end_live(self) -> None:
        if self._live:
            self.stream.write("\r" + " " * len(self._live) + "\r")
            self._live = ""


def shown(path: Path | str) -> str:
    """A path as the user types it: relative to the working directory when inside it."""
    path = Path(path).absolute()
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def duration(seconds: float) -> str:
    if seconds < 100:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


class StepLog:
    """The numbered steps: a line when one starts, one when it finishes (what, how long, where), and their
    seconds for timing.json."""

    def __init__(self, console: Console):
        self.console = console
        self.seconds: dict[str, float] = {}
        self._started = 0.0

    def start(self, name: str, text: str) -> None:
        self._started = time.monotonic()
        self.console.line(f"[{STEPS.index(name) + 1}/{len(STEPS)}] {text}")

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def finish(self, name: str, text: str, where: Path | str | None = None) -> None:
        self.seconds[name] = self.elapsed()
        line = f"[{STEPS.index(name) + 1}/{len(STEPS)}] {text} in {duration(self.seconds[name])}"
        if where is None:
            self.console.line(line)
        else:
            self.console.labelled(line, where)


class DemoLog:
    """<cache>/demo/demo.log: the details the terminal leaves out (comfy-cli's output, ComfyUI's answers)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, f"make demo, {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")

    def write(self, title: str, text: str = "") -> None:
        with self.path.open("a") as log:
            log.write(f"\n== {title}\n{text.rstrip()}\n" if text else f"\n== {title}\n")
