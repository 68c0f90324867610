"""Run a real ComfyUI server with this pack loaded, and talk to it (the demo, the benchmarks, the tests).

Workflows go in through comfy-cli (`comfy run --workflow FILE --wait`) or the HTTP API (/prompt); outputs
are read back from /history. The server is a child process on a free loopback port.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

from training.comfy_env import REPO_ROOT, comfyui_path

PACK_DIR_NAME = "ComfyUI-Flash"
FRONTEND_DIR_NAME = ".frontend"  # `make setup`: the frontend package named by that ComfyUI's requirements.txt


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_extra_model_paths(path: Path, models_root: Path, name: str = "flash") -> Path:
    """An extra_model_paths.yaml making `models_root/<folder>` the first (default) model folders."""
    folders = ("checkpoints", "loras", "vae", "controlnet", "upscale_models", "diffusers", "embeddings")
    lines = [f"{name}:", f"    base_path: {models_root}", "    is_default: true"]
    lines += [f"    {folder}: {folder}" for folder in folders]
    for folder in folders:
        (models_root / folder).mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


class ComfyServer:
    """A ComfyUI process. `base_dir` isolates models/input/output/user/custom_nodes (tests);
    without it the server uses COMFYUI_PATH's own folders (the demo, so the user finds the files)."""

    def __init__(self, models_root: Path, base_dir: Path | None = None, port: int | None = None, log_path: Path | None = None,
                 cpu: bool = True, extra_args: Sequence[str] = ()):
        self.comfy = comfyui_path()
        self.cpu = cpu  # --cpu (every test); False: ComfyUI's own device and memory defaults (GPU benchmarks)
        self.extra_args = list(extra_args)  # more ComfyUI flags, e.g. --disable-dynamic-vram
        self.models_root = Path(models_root)
        self.base_dir = Path(base_dir) if base_dir else None
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="comfyui-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def command(self) -> list[str]:
        state = Path(self.base_dir or self.models_root.parent)
        state.mkdir(parents=True, exist_ok=True)
        extra = write_extra_model_paths(state / "flash_extra_model_paths.yaml", self.models_root)
        cmd = [sys.executable, str(self.comfy / "main.py"), *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1",
               "--port", str(self.port), "--disable-auto-launch", "--extra-model-paths-config", str(extra),
               "--preview-method", "latent2rgb", *self.extra_args]
        frontend = self.comfy / FRONTEND_DIR_NAME
        if (frontend / "index.html").is_file():  # the frontend this ComfyUI version names (make setup unpacks it)
            cmd += ["--front-end-root", str(frontend)]
        if self.base_dir:
            custom_nodes = self.base_dir / "custom_nodes"
            custom_nodes.mkdir(parents=True, exist_ok=True)
            link = custom_nodes / PACK_DIR_NAME
            if link.is_symlink() and link.resolve() != REPO_ROOT.resolve():
                link.unlink()  # left by another checkout (a worktree since removed)
            if not link.exists():
                link.symlink_to(REPO_ROOT, target_is_directory=True)
            cmd += ["--base-directory", str(self.base_dir), "--database-url", "sqlite:///:memory:"]
        return cmd

    def start(self, timeout: float = 240.0) -> "ComfyServer":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command(), cwd=self.comfy, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} while starting; log: {self.log_path}\n{self.log_tail()}")
            try:
                self.get("/object_info/FlashSampler")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer on {self.url} within {timeout:.0f}s; log: {self.log_path}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- HTTP API ----------------------------------------------------------------------------------
    def get(self, route: str, timeout: float = 10.0):
        with urllib.request.urlopen(self.url + route, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def post(self, route: str, payload: dict, timeout: float = 30.0):
        request = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as error:  # /prompt answers 400 with a JSON body on validation errors
            body = error.read()
            return json.loads(body) if body else {"error": str(error)}
        return json.loads(body) if body else None

    def queue(self, api_workflow: dict) -> dict:
        """POST /prompt. Returns the server's answer: {"prompt_id": ...} or {"error": ..., "node_errors": ...}."""
        return self.post("/prompt", {"prompt": api_workflow, "client_id": uuid.uuid4().hex})

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Wait until the prompt is in /history; returns its entry (status, outputs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if history and prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f}s")

    def run(self, api_workflow: dict, timeout: float = 600.0) -> dict:
        answer = self.queue(api_workflow)
        if "prompt_id" not in answer:
            return {"status": {"status_str": "rejected"}, "rejected": answer}
        return self.wait(answer["prompt_id"], timeout)

    def output_dir(self) -> Path:
        return (self.base_dir or self.comfy) / "output"

    def output_images(self, entry: dict) -> list[Path]:
        files = []
        for node_output in entry.get("outputs", {}).values():
            for image in node_output.get("images", []):
                if image.get("type") == "output":
                    files.append(self.output_dir() / image.get("subfolder", "") / image["filename"])
        return files

    # -- comfy-cli ---------------------------------------------------------------------------------
    def comfy_cli_run(self, workflow: Path, timeout: float = 600.0, stream: bool = False) -> subprocess.CompletedProcess:
        """Submit a workflow file (API or UI format) the way a user would: `comfy run --workflow F --wait`.
        With stream, comfy-cli writes to this process's terminal (its per-node progress bars) instead of
        being captured."""
        comfy = shutil.which("comfy", path=str(Path(sys.executable).parent)) or "comfy"
        cmd = [comfy, "--skip-prompt", "--workspace", str(self.comfy), "run", "--workflow", str(workflow), "--wait",
               "--host", "127.0.0.1", "--port", str(self.port), "--timeout", str(int(timeout))]
        return subprocess.run(cmd, capture_output=not stream, text=True, timeout=timeout + 60)
