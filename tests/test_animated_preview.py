"""The animated sampling preview (nodes/animated_preview.py): which frames play at each step, the
player's loop, the settings route's parsing, and, in-process through the real KSampler, that the
frames played at the last step are ComfyUI's Latent2RGB preview of the sampled frames.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from comfy_helpers import apply, ksample, motion

pytestmark = pytest.mark.comfyui

# ComfyUI's SD1.5 Latent2RGB table (comfy/latent_formats.py, SD15.latent_rgb_factors), written out
SD15_RGB = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177]]
SD15_SCALE = 0.18215


def expected_preview(latent_frame: torch.Tensor) -> torch.Tensor:
    """uint8 (h, w, 3) of one frame of a sampled latent: x0 = latent * scale, rgb = x0 . factors."""
    x0 = latent_frame.double() * SD15_SCALE
    rgb = torch.einsum("chw,cr->hwr", x0, torch.tensor(SD15_RGB, dtype=torch.float64))
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8)


@pytest.fixture
def recorded(comfyui, monkeypatch):
    """Sampling sends previews to a recorder; every show() of the player is kept, latent2rgb previews."""
    from comfy.cli_args import LatentPreviewMethod, args

    from animatediff_suite.nodes import animated_preview
    from animatediff_suite.nodes.comfy_compat import PreviewSender

    sent, shown = [], []
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)
    monkeypatch.setattr(animated_preview, "preview_sender",
                        lambda max_size: PreviewSender("client-a", sent.append))
    show = animated_preview.FramePlayer.show
    monkeypatch.setattr(animated_preview.FramePlayer, "show",
                        lambda self, frames: shown.append(list(frames)) or show(self, frames))
    monkeypatch.setattr(animated_preview, "SETTINGS", animated_preview.PreviewSettings())
    return sent, shown


def preview_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "animatediff_suite preview" and t.is_alive()]


def test_shown_frames_without_windows_play_the_clip(comfyui):
    from animatediff_suite.nodes.animated_preview import shown_frames

    assert shown_frames(16, 1, None, 5) == list(range(16))
    assert shown_frames(32, 2, None, 0) == list(range(16))  # two 16-frame clips: the first one
    wide = shown_frames(100, 1, None, 0)  # at most 64, evenly spaced, ends included
    assert len(wide) == 64 and wide[:3] == [0, 2, 3] and wide[-1] == 99


def test_shown_frames_with_windows_visit_the_steps_windows_in_turn(comfyui):
    from animatediff_suite.motion_modules import ContextOptions
    from animatediff_suite.nodes.animated_preview import shown_frames

    static = ContextOptions(16, 4, 1, False, "standard_static", "pyramid")
    # 40 frames, length 16, overlap 4: windows start at 0, 12 and 24 (the last one ends at frame 39)
    assert [shown_frames(40, 1, static, step) for step in range(4)] == [
        list(range(0, 16)), list(range(12, 28)), list(range(24, 40)), list(range(0, 16))]
    looped = ContextOptions(8, 2, 1, True, "looped_uniform", "pyramid")
    # looped uniform, step 0: windows every 6 frames from 0, wrapping past the end of the 20 frames
    assert shown_frames(20, 1, looped, 0) == list(range(8))
    assert shown_frames(16, 1, static, 3) == list(range(16))  # one window: the whole clip


def test_frame_player_loops_the_frames_it_was_shown_and_stops_when_closed(comfyui):
    from animatediff_suite.nodes.animated_preview import FramePlayer

    sent = []
    player = FramePlayer(sent.append, fps=30)
    player.show(["a", "b", "c"])
    time.sleep(0.5)
    player.show(["x", "y"])
    time.sleep(0.3)
    player.close()
    count = len(sent)
    time.sleep(0.2)
    assert len(sent) == count  # nothing after close
    switched = next((i for i, frame in enumerate(sent) if frame in ("x", "y")), len(sent))
    first = sent[:switched]
    assert 6 <= len(first) <= 20  # about 15 at 30 fps in 0.5 s
    assert first == (["a", "b", "c"] * 10)[:len(first)]
    rest = sent[len(first):]
    assert rest and set(rest) <= {"x", "y"} and all(a != b for a, b in zip(rest, rest[1:]))
    assert not preview_threads()


def test_frame_player_stops_when_sending_fails(comfyui, caplog):
    from animatediff_suite.nodes.animated_preview import FramePlayer

    def broken(frame):
        raise ConnectionResetError("gone")

    player = FramePlayer(broken, fps=30)
    player.show(["a"])
    time.sleep(0.2)
    assert not player._thread.is_alive() and "sending a frame failed" in caplog.text
    player.close()


@pytest.mark.parametrize("body, error", [
    ([], "expected a JSON object"),
    ({"enabled": True}, "client_id must be"),
    ({"client_id": "c", "enabled": "no"}, "enabled must be true or false, got 'no'"),
    ({"client_id": "c", "fps": 0}, "fps must be an integer from 1 to 30, got 0"),
    ({"client_id": "c", "fps": 8.5}, "fps must be an integer from 1 to 30, got 8.5"),
    ({"client_id": "c", "fps": True}, "fps must be an integer from 1 to 30, got True"),
])
def test_settings_are_refused_with_the_field_named(comfyui, body, error):
    from animatediff_suite.nodes.animated_preview import parse_setting

    with pytest.raises(ValueError, match=error):
        parse_setting(body)


def test_settings_keep_the_newest_clients(comfyui):
    from animatediff_suite.nodes.animated_preview import PreviewSetting, PreviewSettings, parse_setting

    settings = PreviewSettings(limit=2)
    for name in ("a", "b", "c"):
        settings.set(*parse_setting({"client_id": name, "enabled": False, "fps": 12}))
    assert settings.get("a") == PreviewSetting(True, 8)  # forgotten: the default again
    assert settings.get("c") == PreviewSetting(False, 12)


def test_the_last_step_plays_the_latent2rgb_preview_of_every_sampled_frame(env, recorded):
    import numpy

    sent, shown = recorded
    model = apply(env, env["demo"].tiny_model(0), motion(env, "v2"))
    steps = []
    latent = ksample(env, model, steps=2, frames=16, callback=lambda step, *_: steps.append(step))
    assert steps == [0, 1] and len(shown) == 2  # the stock callback still runs, then the player is shown
    last = [torch.tensor(numpy.asarray(image)) for image in shown[-1]]
    assert len(last) == 16
    for frame, image in enumerate(last):
        assert (image.int() - expected_preview(latent[frame]).int()).abs().max() <= 1, frame
    assert sent and not preview_threads()  # frames went out, and the player is gone with the sampling


def test_with_windows_the_last_step_plays_its_window(env, recorded):
    import numpy

    from animatediff_suite.motion_modules import ContextOptions

    _, shown = recorded
    model = apply(env, env["demo"].tiny_model(0), motion(env, "v2"), context=ContextOptions(16, 4))
    latent = ksample(env, model, steps=3, frames=40, callback=lambda *_: None)
    assert [len(frames) for frames in shown] == [16, 16, 16]
    # step 2 shows the third window of standard_static: frames 24-39
    for frame, image in zip(range(24, 40), shown[-1]):
        assert (torch.tensor(numpy.asarray(image)).int() - expected_preview(latent[frame]).int()).abs().max() <= 1


def test_nothing_plays_when_the_client_turned_it_off_or_previews_are_off(env, recorded, monkeypatch):
    from comfy.cli_args import LatentPreviewMethod, args

    from animatediff_suite.nodes import animated_preview

    sent, shown = recorded
    model = apply(env, env["demo"].tiny_model(0), motion(env, "v2"))
    animated_preview.SETTINGS.set("client-a", animated_preview.PreviewSetting(enabled=False))
    ksample(env, model, steps=2, callback=lambda *_: None)
    animated_preview.SETTINGS.set("client-a", animated_preview.PreviewSetting(enabled=True))
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.NoPreviews)
    ksample(env, model, steps=2, callback=lambda *_: None)
    assert sent == [] and shown == []


def test_the_player_is_closed_when_sampling_fails(env, recorded):
    _, shown = recorded
    model = apply(env, env["demo"].tiny_model(0), motion(env, "v2"))

    def fail_at_second_step(step, *_):
        if step == 1:
            raise KeyboardInterrupt  # what an interrupt looks like to the sampler's callback chain

    with pytest.raises(KeyboardInterrupt):
        ksample(env, model, steps=3, callback=fail_at_second_step)
    assert len(shown) == 1 and not preview_threads()
