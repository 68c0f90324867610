"""Follow one prompt on a running ComfyUI the way its browser frontend does: queue it under a client id and read
that client's websocket (ws://HOST:PORT/ws?clientId=ID) until the prompt finishes.

ComfyUI sends the prompt's events only to the client that queued it: `executing` (which node runs), `progress`
(value / max of a node's ProgressBar), `executed` (a node's UI outputs), `execution_success` / `_error` /
`_interrupted`, and binary frames: preview images (type 1: 4-byte image format, 1 = JPEG, 2 = PNG, then the
image) and progress text (type 3: 4-byte node-id length, node id, UTF-8 text; PromptServer.send_progress_text).
`PromptFollower.run` turns them into `PromptEvent`s for a callback (the demo's terminal output).
"""

from __future__ import annotations

import json
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import websocket  # websocket-client (a comfy-cli dependency)

PREVIEW_IMAGE = 1  # protocol.BinaryEventTypes
PROGRESS_TEXT = 3
IMAGE_FORMATS = {1: "jpg", 2: "png"}


@dataclass
class PromptEvent:
    """One websocket message of the followed prompt.

    kind: "executing" (node), "progress" (node, value, total), "text" (node, text), "preview" (image bytes,
    image_format "jpg"/"png"), "executed" (node, output), or "status" for anything else (data)."""

    kind: str
    node: str | None = None
    value: int | None = None
    total: int | None = None
    text: str | None = None
    image: bytes | None = None
    image_format: str | None = None
    output: dict | None = None
    data: dict = field(default_factory=dict)


class PromptFailed(RuntimeError):
    """The prompt was rejected, raised an error in a node, or was interrupted. `details` is ComfyUI's full answer."""

    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details


def decode_binary(frame: bytes) -> PromptEvent | None:
    """A binary websocket frame as a PromptEvent (None for kinds the demo does not show)."""
    if len(frame) < 8:
        return None
    (kind,) = struct.unpack(">I", frame[:4])
    if kind == PREVIEW_IMAGE:
        (image_format,) = struct.unpack(">I", frame[4:8])
        return PromptEvent("preview", image=bytes(frame[8:]), image_format=IMAGE_FORMATS.get(image_format, "jpg"))
    if kind == PROGRESS_TEXT:
        (length,) = struct.unpack(">I", frame[4:8])
        node = frame[8:8 + length].decode("utf-8", errors="replace")
        return PromptEvent("text", node=node, text=frame[8 + length:].decode("utf-8", errors="replace"))
    return None


class PromptFollower:
    """Queue API workflows on the ComfyUI at host:port and report their events while they run."""

    def __init__(self, host: str, port: int, post: Callable[[str, dict], dict]):
        self.host, self.port, self.post = host, port, post
        self.client_id = uuid.uuid4().hex

    def run(self, workflow: dict, on_event: Callable[[PromptEvent], None], timeout: float,
            is_alive: Callable[[], bool] = lambda: True, tick: Callable[[], None] = lambda: None) -> str:
        """Queue `workflow`, call on_event for each of its events, return its prompt id once it succeeded.
        tick() is called about once a second while nothing arrives (to refresh an ETA). Raises PromptFailed
        (rejected, node error, interrupted), TimeoutError, or RuntimeError when the server stops answering."""
        try:
            ws = websocket.create_connection(f"ws://{self.host}:{self.port}/ws?clientId={self.client_id}", timeout=30)
        except (OSError, websocket.WebSocketException) as error:
            raise RuntimeError(f"could not open ComfyUI's websocket on {self.host}:{self.port}: {error}") from error
        try:
            answer = self.post("/prompt", {"prompt": workflow, "client_id": self.client_id})
            if "prompt_id" not in (answer or {}):
                raise PromptFailed(f"ComfyUI rejected the workflow: {rejection_summary(answer)}", answer or {})
            prompt_id = answer["prompt_id"]
            self._follow(ws, prompt_id, on_event, timeout, is_alive, tick)
            return prompt_id
        finally:
            ws.close()

    def _follow(self, ws, prompt_id: str, on_event, timeout: float, is_alive, tick) -> None:
        deadline = time.monotonic() + timeout
        ws.settimeout(1.0)
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")
            try:
                frame = ws.recv()
            except websocket.WebSocketTimeoutException:
                if not is_alive():
                    raise RuntimeError(f"ComfyUI stopped while running prompt {prompt_id}") from None
                tick()
                continue
            except (OSError, websocket.WebSocketException) as error:
                raise RuntimeError(f"ComfyUI's websocket closed while running prompt {prompt_id}: {error}") from error
            if isinstance(frame, bytes):
                event = decode_binary(frame)
                if event is not None:
                    on_event(event)
                continue
            message = json.loads(frame)
            kind, data = message.get("type"), message.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "execution_success":
                return
            if kind == "execution_error":
                raise PromptFailed(f"{data.get('node_type')} (node {data.get('node_id')}) failed: "
                                   f"{data.get('exception_type', 'error')}: {data.get('exception_message', '').strip()}",
                                   data)
            if kind == "execution_interrupted":
                raise PromptFailed(f"prompt interrupted in node {data.get('node_id')} ({data.get('node_type')})", data)
            if kind == "executing":
                if data.get("node") is None and data.get("prompt_id") == prompt_id:
                    return  # older servers end a prompt with executing(node None) only
                on_event(PromptEvent("executing", node=str(data["node"])))
            elif kind == "progress":
                on_event(PromptEvent("progress", node=str(data.get("node")), value=int(data["value"]),
                                     total=int(data["max"])))
            elif kind == "executed":
                on_event(PromptEvent("executed", node=str(data.get("node")), output=data.get("output") or {}))
            else:
                on_event(PromptEvent("status", data=message))


def rejection_summary(answer: dict | None) -> str:
    """One line from /prompt's 400 answer: the error message and the first failing node's first error."""
    if not answer:
        return "no answer"
    error = answer.get("error")
    text = error.get("message", str(error)) if isinstance(error, dict) else str(error)
    for node, info in (answer.get("node_errors") or {}).items():
        first = (info.get("errors") or [{}])[0]
        return f"{text}; node {node} ({info.get('class_type')}): {first.get('message')} {first.get('details', '')}".strip()
    return text
