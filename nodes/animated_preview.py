"""Animated sampling preview: while an animated MODEL samples, the sampler node's preview plays the
frames of the current window as a loop instead of showing one still of the batch.

Each step's callback decodes the shown frames with ComfyUI's own previewer (``latent_preview``: the
method the server was started with, ``--preview-method``; none when previews are off), and a
``FramePlayer`` thread sends them one after another through ComfyUI's preview messages, looping
at the client's frame rate until the next step's frames replace them; sampling's end stops it.
ComfyUI's own per-step still is sent as before; the player's frames follow it.

Which frames: the whole clip (the first clip with ``frames_per_clip``) when it fits one window; with
context windows, the windows of the step in turn (step ``s`` shows window ``s mod n`` of the
step's schedule); at most ``MAX_FRAMES``, evenly spaced.

The web extension's setting (``animated_preview.js``) turns it off or sets the frame rate per
browser client through ``POST /animatediff_suite/preview_settings``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import latent_preview

from ..motion_modules import ContextOptions, context_windows
from .comfy_compat import preview_sender, prompt_server

log = logging.getLogger(__name__)
ROUTE = "/animatediff_suite/preview_settings"
MAX_FRAMES = 64
FPS_RANGE = (1, 30)


@dataclass(frozen=True)
class PreviewSetting:
    enabled: bool = True
    fps: int = 8


class PreviewSettings:
    """Per-client settings (the browser's client id), the newest ``limit`` clients kept."""

    def __init__(self, limit: int = 256):
        self._by_client: OrderedDict[str, PreviewSetting] = OrderedDict()
        self._lock = threading.Lock()
        self.limit = limit

    def get(self, client_id: str | None) -> PreviewSetting:
        with self._lock:
            return self._by_client.get(client_id, PreviewSetting())

    def set(self, client_id: str, setting: PreviewSetting) -> None:
        with self._lock:
            self._by_client.pop(client_id, None)
            self._by_client[client_id] = setting
            while len(self._by_client) > self.limit:
                self._by_client.popitem(last=False)


SETTINGS = PreviewSettings()


def shown_frames(num_frames: int, clips: int, context: ContextOptions | None, step: int) -> list[int]:
    """Indices of the frames the preview plays at ``step`` (see the module docstring).

    >>> shown_frames(16, 1, None, 3)[-1], shown_frames(32, 2, None, 0)[-1]
    (15, 15)
    """
    clip = num_frames // max(1, clips)
    frames = list(range(clip))
    if context is not None and clip > context.context_length:
        windows = context_windows(clip, context, step)
        frames = list(windows[step % len(windows)])
    if len(frames) > MAX_FRAMES:
        frames = [frames[round(i * (len(frames) - 1) / (MAX_FRAMES - 1))] for i in range(MAX_FRAMES)]
    return frames


class FramePlayer:
    """Sends ``frames`` one after another at ``fps`` from a thread, looping, until ``close``.

    ``show`` replaces the frames (the loop goes on from the same position); a failing ``send`` (the
    server shutting down) is logged once and ends the player."""

    def __init__(self, send, fps: int):
        self._send, self._period = send, 1.0 / max(1, fps)
        self._frames: list = []
        self._position = 0
        self._lock = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="animatediff_suite preview", daemon=True)
        self._thread.start()

    def show(self, frames: list) -> None:
        with self._lock:
            self._frames = list(frames)
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def _next(self):
        with self._lock:
            if not self._frames:
                return None
            frame = self._frames[self._position % len(self._frames)]
            self._position += 1
            return frame

    def _run(self) -> None:
        while not self._stop.is_set():
            frame = self._next()
            if frame is None:
                self._wake.wait()
                self._wake.clear()
                continue
            started = time.monotonic()
            try:
                self._send(frame)
            except Exception:  # noqa: BLE001 - a preview must never break sampling; say why once
                log.warning("animated preview stopped: sending a frame failed", exc_info=True)
                return
            self._stop.wait(max(0.0, self._period - (time.monotonic() - started)))


def animate(callback, patcher, context: ContextOptions | None, clips: int):
    """(callback, player): ``callback`` wrapped to also play the step's frames, and the player to close
    when sampling ends; ``(callback, None)`` when nothing would be shown (no callback, no client, the
    client turned it off, previews off on the server)."""
    if callback is None:
        return callback, None
    sender = preview_sender(latent_preview.MAX_PREVIEW_RESOLUTION)
    setting = SETTINGS.get(sender.client_id) if sender is not None else None
    if setting is None or not setting.enabled:
        return callback, None
    previewer = latent_preview.get_previewer(patcher.load_device, patcher.model.latent_format)
    if previewer is None:
        return callback, None
    player = FramePlayer(sender.send, setting.fps)

    def animated(step, x0, x, total_steps):
        callback(step, x0, x, total_steps)
        frames = shown_frames(x0.shape[0], clips, context, step)
        player.show([previewer.decode_latent_to_preview(x0[i:i + 1]) for i in frames])

    return animated, player


def register_routes() -> bool:
    """Add the settings route to the running ComfyUI server; False where there is none."""
    instance = prompt_server()
    if instance is None:
        return False
    instance.routes.post(ROUTE)(post_settings)
    return True


def parse_setting(body) -> tuple[str, PreviewSetting]:
    """``{"client_id": str, "enabled": bool, "fps": int}`` -> (client id, setting); ValueError names the bad field."""
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object {client_id, enabled, fps}")
    client_id, enabled, fps = body.get("client_id"), body.get("enabled", True), body.get("fps", PreviewSetting.fps)
    if not isinstance(client_id, str) or not client_id:
        raise ValueError(f"client_id must be the websocket client id (a non-empty string), got {client_id!r}")
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be true or false, got {enabled!r}")
    if isinstance(fps, bool) or not isinstance(fps, int) or not FPS_RANGE[0] <= fps <= FPS_RANGE[1]:
        raise ValueError(f"fps must be an integer from {FPS_RANGE[0]} to {FPS_RANGE[1]}, got {fps!r}")
    return client_id, PreviewSetting(enabled, fps)


async def post_settings(request):
    from aiohttp import web

    try:
        client_id, setting = parse_setting(await request.json())
    except ValueError as exc:  # json.JSONDecodeError is a ValueError too
        return web.json_response({"error": str(exc)}, status=400)
    SETTINGS.set(client_id, setting)
    return web.json_response({"enabled": setting.enabled, "fps": setting.fps})
