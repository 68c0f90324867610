"""`make demo`'s distillation as the browser follows it: FlashDistillTrain's prompt queued, its websocket events
shown (node running, `step i/n  loss  s/step  ETA` on the live line, every preview grid saved and named)."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from flash_core.files import write_atomic
from training.digits.demo_console import INDENT, Console, DemoLog, duration
from training.digits.demo_workflows import DISTILL_NODE, demo_dir, save_workflow
from training.fixtures.comfy_progress import PromptEvent, PromptFailed, PromptFollower
from training.fixtures.comfy_server import ComfyServer

LOSS_PATTERN = re.compile(r"\bloss[\s:=]+(-?[0-9.]+(?:e[-+]?[0-9]+)?|nan|inf)", re.IGNORECASE)


class DistillProgress:
    """Shows a FlashDistillTrain prompt's websocket events: the node running, then `step i/n  loss  s/step  ETA`
    on the live line, and one line per preview grid the node sends (saved to `preview_dir`)."""

    def __init__(self, console: Console, log: DemoLog, workflow: dict, preview_dir: Path, output_dir: Path):
        self.console, self.log, self.output_dir = console, log, output_dir
        self.titles = {node: data.get("_meta", {}).get("title", data["class_type"]) for node, data in workflow.items()}
        self.preview_dir = preview_dir
        shutil.rmtree(preview_dir, ignore_errors=True)  # an earlier run's grids
        self.previews: list[Path] = []
        self.outputs: dict[str, dict] = {}
        self.step = self.total = 0
        self.node_text = ""
        self._first: tuple[float, int] | None = None  # (time, step) of the first step report
        self._running: str | None = None
        self._running_since = 0.0
        self._shown_step = -1  # the step of the last progress line printed

    def __call__(self, event: PromptEvent) -> None:
        if event.kind == "executing" and event.node != self._running:  # ComfyUI may announce a node twice
            self._running, self._running_since = event.node, time.monotonic()
            self.console.line(f"{INDENT}running {self.titles.get(event.node, event.node)}"[: self.console.width])
        elif event.kind == "progress" and event.node == DISTILL_NODE:
            self.step, self.total = event.value, event.total
            if self._first is None:
                self._first = (time.monotonic(), event.value)
            if self.console.live(self.status(), force=self.step == self.total):
                self._shown_step = self.step
        elif event.kind == "progress":
            self.console.live(f"{INDENT}{self.titles.get(event.node, event.node)}: {event.value}/{event.total}")
        elif event.kind == "text" and event.node == DISTILL_NODE:
            self.node_text = event.text.strip()
            self.log.write("FlashDistillTrain", self.node_text)
        elif event.kind == "preview":
            path = self.preview_dir / f"distill_step{self.step:05d}.{event.image_format}"
            write_atomic(path, lambda tmp: Path(tmp).write_bytes(event.image))
            self.previews.append(path)
            self.console.labelled(f"preview grid, step {self.step}", path, INDENT)
        elif event.kind == "executed":
            self.outputs[event.node] = event.output or {}
            for image in (event.output or {}).get("images", []):
                if image.get("type") == "output":  # SaveImage's file (PreviewImage's are temporary)
                    path = self.output_dir / image.get("subfolder", "") / image["filename"]
                    self.console.labelled(f"saved {self.titles.get(event.node, event.node)}", path, INDENT)

    def tick(self) -> None:
        """About once a second between events: the ETA ticks on a terminal; without one, a step not shown yet."""
        if self._first is not None and self.step < self.total:
            if (self.console.tty or self.step != self._shown_step) and self.console.live(self.status()):
                self._shown_step = self.step
        elif self._first is None and self._running is not None:  # a node without a progress bar (VAE encoding)
            title = self.titles.get(self._running, self._running)
            self.console.live(f"{INDENT}{title}: {duration(time.monotonic() - self._running_since)}")

    def status(self) -> str:
        parts = [f"{INDENT}step {self.step}/{self.total}"]
        loss = LOSS_PATTERN.search(self.node_text)
        if loss:
            parts.append(f"loss {loss.group(1)}")
        elif self.node_text:
            parts.append(self.node_text[:60])
        started, first_step = self._first or (time.monotonic(), self.step)
        if self.step > first_step:
            seconds_per_step = (time.monotonic() - started) / (self.step - first_step)
            parts.append(f"{seconds_per_step:.2f} s/step")
            if self.step < self.total:
                parts.append(f"ETA {duration(seconds_per_step * (self.total - self.step))}")
        return "  ".join(parts)


def run_distillation(server: ComfyServer, workflow: dict, console: Console, log: DemoLog, timeout: float) -> DistillProgress:
    """Queue the distillation and show its progress until it finished (its LoRA written)."""
    log.write("queue flash_demo_distill", f"workflow: {save_workflow(workflow, 'flash_demo_distill')}")
    progress = DistillProgress(console, log, workflow, demo_dir() / "previews", server.output_dir())
    follower = PromptFollower("127.0.0.1", server.port, server.post)
    try:
        prompt_id = follower.run(workflow, progress, timeout=timeout, is_alive=server.alive, tick=progress.tick)
    except PromptFailed as error:
        console.end_live()
        log.write("flash_demo_distill failed", json.dumps(error.details, indent=1))
        raise
    console.end_live()
    log.write(f"flash_demo_distill finished: prompt {prompt_id}", json.dumps(progress.outputs, indent=1))
    return progress
