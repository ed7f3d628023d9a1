"""Training data and config without ComfyUI: real video files in, frames and skips out; camera clips
measured by phase correlation; the config's errors; the loss and schedule maths by hand."""

import math

import numpy as np
import pytest
import torch

from animatediff_suite.training import data as tdata
from animatediff_suite.training.config import ConfigError, DataConfig, config_from_dict, load_config
from animatediff_suite.training.losses import debiased_mse, lr_factor
from animatediff_suite.training.synthetic import camera_clip, write_moving_shapes, write_video


def centroid(frame: torch.Tensor) -> tuple[float, float]:
    """(x, y) of the pixels brighter than the background (the disc)."""
    mask = frame.mean(-1) > 0.3
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return float(xs.float().mean()), float(ys.float().mean())


def test_frame_indices_follow_the_original_linspace_rule():
    # 100 frames, 16 at stride 4: span (16-1)*4+1 = 61, start in 0..39; indices start + 4k
    gen = torch.Generator().manual_seed(0)
    indices = tdata.frame_indices(100, 16, 4, gen)
    start = indices[0]
    assert 0 <= start <= 39 and indices == [start + 4 * k for k in range(16)]
    # a video shorter than the span: its whole length, spread (np.linspace(0, 19, 8) truncated)
    assert tdata.frame_indices(20, 8, 4, gen) == [0, 2, 5, 8, 10, 13, 16, 19]


def test_decoded_clip_moves_at_the_velocity_it_was_written_with(tmp_path):
    (path, caption, velocity), = write_moving_shapes(str(tmp_path), 1, frames=20, size=64, speed=2.0, seed=3)
    config = DataConfig(folder=str(tmp_path), frames=6, stride=3, width=32, height=32, flip=False)
    report = tdata.scan(config)
    assert [(s.path, s.caption, s.frame_count) for s in report.samples] == [(path, caption, 20)]
    clip = tdata.load_clip(report.samples[0], config, tdata.draw_clip(20, config, torch.Generator().manual_seed(1)))
    assert clip.shape == (6, 32, 32, 3) and 0 <= float(clip.min()) and float(clip.max()) <= 1
    # 64 -> 32 pixels halves the speed; 3 source frames apart: 2 * 3 / 2 = 3 pixels per sampled frame
    steps = [np.subtract(centroid(clip[i + 1]), centroid(clip[i])) for i in range(5)]
    expected = np.array(velocity) * 3 / 2
    for step in steps:
        np.testing.assert_allclose(step, expected, atol=0.35)


def test_flip_mirrors_the_motion(tmp_path):
    write_moving_shapes(str(tmp_path), 1, frames=12, size=64, speed=2.0, seed=3)
    config = DataConfig(folder=str(tmp_path), frames=4, stride=1, width=64, height=64, flip=False)
    sample = tdata.scan(config).samples[0]
    plain = tdata.load_clip(sample, config, tdata.draw_clip(sample.frame_count, config, torch.Generator().manual_seed(1)))
    assert torch.equal(tdata.fit_frames(plain, 64, 64, flip=True), plain.flip(2))


def test_resize_covers_and_centre_crops():
    frames = torch.zeros(1, 40, 80, 3)
    frames[:, :, 20:60] = 1.0  # the middle half of the width
    out = tdata.fit_frames(frames, 32, 32)
    # scale 0.8 -> 32x64, crop columns 16..48 of 64: exactly the bright middle
    assert out.shape == (1, 32, 32, 3) and float(out[:, :, 1:-1].min()) > 0.99  # antialiasing blends the edges
    assert float(out[:, :, [0, -1]].min()) > 0.5


def test_bad_files_are_skipped_with_their_reason_or_fail_in_strict_mode(tmp_path):
    write_moving_shapes(str(tmp_path), 2, frames=12, size=32, seed=0)
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x01garbage" * 100)
    (tmp_path / "corrupt.txt").write_text("a caption")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "empty.txt").write_text("a caption")
    write_video(str(tmp_path / "short.mp4"), np.zeros((3, 32, 32, 3), dtype=np.uint8))
    (tmp_path / "short.txt").write_text("too short")
    write_video(str(tmp_path / "nocaption.mp4"), np.zeros((12, 32, 32, 3), dtype=np.uint8))
    write_video(str(tmp_path / "blank.mp4"), np.zeros((12, 32, 32, 3), dtype=np.uint8))
    (tmp_path / "blank.txt").write_text("   \n")
    write_video(str(tmp_path / "latin1.mp4"), np.zeros((12, 32, 32, 3), dtype=np.uint8))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    config = DataConfig(folder=str(tmp_path), frames=8, width=64, height=64)
    report = tdata.scan(config)
    assert len(report.samples) == 2
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in report.skipped}
    assert set(reasons) == {"corrupt.mp4", "empty.mp4", "short.mp4", "nocaption.mp4", "blank.mp4", "latin1.mp4"}
    assert reasons["short.mp4"] == "too short: 3 frames, need at least 8"
    assert reasons["nocaption.mp4"].startswith("missing caption")
    assert reasons["blank.mp4"].startswith("empty caption")
    assert reasons["latin1.mp4"].startswith("caption not UTF-8")
    assert reasons["corrupt.mp4"].startswith("unreadable") and reasons["empty.mp4"].startswith("unreadable")
    assert report.summary().startswith("2 clips usable, 6 skipped")
    with pytest.raises(tdata.DataError, match=r"blank\.mp4: empty caption: blank\.txt \(strict = true\)"):
        tdata.scan(DataConfig(folder=str(tmp_path), frames=8, strict=True))


def test_frame_folders_and_csv(tmp_path):
    from PIL import Image

    clip_dir = tmp_path / "walk"
    clip_dir.mkdir()
    for i in range(10):
        Image.fromarray(np.full((16, 16, 3), i * 20, dtype=np.uint8)).save(clip_dir / f"{i:03d}.png")
    (tmp_path / "walk.txt").write_text("a gradient in time")
    config = DataConfig(folder=str(tmp_path), frames=5, stride=2, width=16, height=16, flip=False)
    sample, = tdata.scan(config).samples
    clip = tdata.load_clip(sample, config, tdata.draw_clip(sample.frame_count, config, torch.Generator().manual_seed(0)))
    values = [round(float(f.mean()) * 255) for f in clip]
    assert values == [0, 40, 80, 120, 160]  # frames 0, 2, 4, 6, 8 (span 9 of 10: start 0 or 1)
    or_shifted = [20, 60, 100, 140, 180]
    assert values in ([0, 40, 80, 120, 160], or_shifted)
    (tmp_path / "list.csv").write_text('path,caption\nwalk,"a gradient, in time"\nmissing.mp4,gone\n')
    report = tdata.scan(DataConfig(csv=str(tmp_path / "list.csv"), frames=5))
    assert [s.caption for s in report.samples] == ["a gradient, in time"]
    assert report.skipped[0][0].endswith("missing.mp4") and report.skipped[0][1].startswith("unreadable")


def _phase_shift(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Integer (dx, dy) such that b is a shifted by it, from the peak of the normalised cross-power
    (Hann-windowed, so the patch borders do not pull the peak to zero)."""
    window = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    a, b = (a - a.mean()) * window, (b - b.mean()) * window
    cross = np.fft.fft2(b) * np.conj(np.fft.fft2(a))
    surface = np.fft.ifft2(cross / (np.abs(cross) + 1e-12)).real
    y, x = np.unravel_index(np.argmax(surface), surface.shape)
    h, w = surface.shape
    return (x if x <= w // 2 else x - w, y if y <= h // 2 else y - h)


def _texture(seed=0, size=(480, 640)) -> torch.Tensor:
    low = torch.rand(1, 3, size[0] // 10, size[1] // 10, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(low, size=size, mode="bicubic").squeeze(0).permute(1, 2, 0).clamp(0, 1)


@pytest.mark.parametrize("motion, expected", [("pan_right", (-4, 0)), ("pan_left", (4, 0)),
                                              ("pan_up", (0, 4)), ("pan_down", (0, -4))])
def test_camera_pans_recovered_by_phase_correlation(motion, expected):
    # speed 1/32 of a 128-pixel frame = 4 pixels per frame; the picture moves against the camera
    clip = camera_clip(_texture(), motion, 6, 1 / 32, width=128, height=128).mean(-1).numpy()
    assert [_phase_shift(clip[i], clip[i + 1]) for i in range(5)] == [expected] * 5


@pytest.mark.parametrize("motion", ["zoom_in", "zoom_out", "roll_clockwise", "roll_anticlockwise"])
def test_camera_zoom_and_roll_move_patches_as_expected(motion):
    """Phase correlation of 32-pixel patches 60 pixels left/right/above/below the centre: zoom moves
    them outwards (in) or inwards (out) by 60 * speed; a clockwise roll moves the top patch right,
    the right patch down, etc. by 60 * radians(speed) (the patch turns too: 1.5 pixels of slack)."""
    speed = 0.1 if motion.startswith("zoom") else 6.0
    clip = camera_clip(_texture(1), motion, 3, speed, width=160, height=160).mean(-1).numpy()
    offsets = {"left": (-60, 0), "right": (60, 0), "top": (0, -60), "bottom": (0, 60)}
    sign = 1 if motion in ("zoom_in", "roll_clockwise") else -1
    for name, (ox, oy) in offsets.items():
        cx, cy = 80 + ox, 80 + oy
        a = clip[0, cy - 16:cy + 16, cx - 16:cx + 16]
        b = clip[1, cy - 16:cy + 16, cx - 16:cx + 16]
        dx, dy = _phase_shift(a, b)
        if motion.startswith("zoom"):
            want = (sign * ox * speed, sign * oy * speed)  # 6 pixels outwards for zoom_in
        else:
            turn = math.radians(speed)
            want = (sign * -oy * turn, sign * ox * turn)  # clockwise on screen (y down): top -> right
        assert abs(dx - want[0]) <= 1.5 and abs(dy - want[1]) <= 1.5, (name, (dx, dy), want)


def test_camera_clip_is_deterministic_and_eased():
    from animatediff_suite.training.synthetic import camera_positions

    image = _texture(2, (120, 160))
    assert torch.equal(camera_clip(image, "zoom_in", 5, 0.05), camera_clip(image, "zoom_in", 5, 0.05))
    assert camera_positions(5, "linear") == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert camera_positions(5, "ease_in") == [0.0, 0.25, 1.0, 2.25, 4.0]
    assert camera_positions(3, "ease_in_out") == [0.0, 1.0, 2.0]


def test_config_errors_name_the_key(tmp_path):
    good = {"mode": "motion_lora", "base": {"checkpoint": "a.safetensors", "motion_model": "m.ckpt"},
            "data": {"folder": "clips"}}
    assert config_from_dict(good).train.steps == 300
    cases = [
        ({"mode": "dance"}, "mode: unknown mode 'dance'"),
        ({"epochs": 3}, "unknown key 'epochs'"),
        ({"train": {"lr": 1}}, "[train]: unknown key 'lr'"),
        ({"train": {"steps": 1.5}}, "[train] steps: expected int, got float"),
        ({"train": {"gradient_checkpointing": 1}}, "[train] gradient_checkpointing: expected bool"),
        ({"data": {"folder": "clips", "width": 100}}, "[data] width: 100 must be a multiple of 8"),
        ({"data": {"folder": "clips", "csv": "x.csv"}}, "[data] folder: set exactly one of folder and csv"),
        ({"base": {"motion_model": ""}}, "[base] motion_model"),
        ({"base": {"checkpoint": "a", "demo_seed": 1, "motion_model": "m"}}, "[base] checkpoint: set exactly one"),
        ({"name": "../escape"}, "name: '../escape' must be a plain file-name stem"),
        ({"train": {"lr_schedule": "step"}}, "[train] lr_schedule: 'step'"),
        ({"train": {"optimizer": "sgd"}}, "[train] optimizer: 'sgd'; expected one of ['auto', 'adamw', 'adamw8bit']"),
        ({"validation": {"every": -1}}, "[validation] every: -1 must be >= 0"),
        ({"validation": {"cfg": 0}}, "[validation] cfg: 0.0 must be in (0, 100]"),
        ({"data": {"folder": "clips", "buckets": "yes"}}, "[data] buckets: expected bool, got str"),
        ({"mode": "semantic_motion_predictor", "base": {"checkpoint": "a", "motion_model": "m"}},
         "[base] clip_vision: mode 'semantic_motion_predictor' needs the image encoder E"),
        ({"mode": "semantic_motion_predictor", "base": {"checkpoint": "a", "motion_model": "", "clip_vision": "v"}},
         "[base] motion_model: mode 'semantic_motion_predictor' trains on an animated model"),
        ({"base": {"clip_vision": "v"}}, "[base] clip_vision: only mode 'semantic_motion_predictor' uses it"),
        ({"predictor": {"heads": 12}}, "[predictor] heads: 12 does not divide hidden 1024"),
        ({"predictor": {"embedding_loss": -1}}, "[predictor] embedding_loss: -1.0 must be >= 0"),
        ({"predictor": {"layers": 8}}, "[predictor]: unknown key 'layers'"),
    ]
    for change, message in cases:
        raw = {**good, **{k: ({**good.get(k, {}), **v} if isinstance(v, dict) else v) for k, v in change.items()}}
        with pytest.raises(ConfigError) as error:
            config_from_dict(raw)
        assert message in str(error.value), (change, str(error.value))
    path = tmp_path / "run.toml"
    path.write_text("mode = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(path))


def test_resume_check_fills_keys_a_saved_config_predates_and_names_real_differences():
    import dataclasses
    import json

    from animatediff_suite.training.checkpoints import ResumeError, check_resumable

    current = config_from_dict({"mode": "motion_lora", "base": {"demo_seed": 0}, "data": {"folder": "clips"}})
    old = json.loads(current.to_json())
    del old["validation"], old["train"]["optimizer"], old["data"]["buckets"]  # written before these existed
    state = {"config": json.dumps(old), "base_id": "b", "data_id": "d", "processes": 1}
    check_resumable(state, current.to_json(), "b", "d")
    changed = dataclasses.replace(current, data=dataclasses.replace(current.data, buckets=True),
                                  validation=dataclasses.replace(current.validation, every=5))
    with pytest.raises(ResumeError) as error:
        check_resumable(state, changed.to_json(), "b", "d")
    assert "data.buckets: false -> true" in str(error.value) and "validation" not in str(error.value)


def test_readme_config_example_is_valid():
    import re

    from ads_package import ROOT

    with open(f"{ROOT}/README.md", encoding="utf-8") as handle:
        readme = handle.read()
    example = re.search(r"```toml\n(.*?)```", readme, re.S)
    assert example, "README has no ```toml config example"
    import tomllib

    config = config_from_dict(tomllib.loads(example.group(1)))
    assert config.mode in ("motion_lora", "motion_module", "domain_adapter", "motion_director")


def test_lr_schedules_by_hand():
    assert [lr_factor("constant", s, 2, 10) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert [round(lr_factor("linear", s, 0, 4), 6) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [round(lr_factor("cosine", s, 0, 4), 6) for s in (0, 2, 4)] == [1.0, 0.5, 0.0]


def test_debiased_loss_by_hand():
    # two clips of three frames, one value each; beta 1 -> sqrt(2) e_i - e_anchor
    err = torch.tensor([1.0, 2.0, 3.0, -1.0, 0.0, 5.0]).view(6, 1, 1, 1)
    anchors = torch.tensor([2, 0])
    r = math.sqrt(2)
    terms = [r * 1 - 3, r * 2 - 3, r * 3 - 3, r * -1 + 1, r * 0 + 1, r * 5 + 1]
    expected = sum(t * t for t in terms) / 6
    assert math.isclose(float(debiased_mse(err, 3, anchors, 1.0)), expected, rel_tol=1e-6)
    assert math.isclose(float(debiased_mse(err, 3, anchors, 0.0)), float(err.pow(2).mean()), rel_tol=1e-6)
