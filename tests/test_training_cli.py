"""``python <pack> train``: the command line a user runs, in its own process, killed and resumed.

A SIGKILL at any point (mid-step, mid-save) loses at most the steps since the last saved state; a
resume then ends with exactly the weights of an uninterrupted run (CPU, same thread count)."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from ads_package import ROOT

pytestmark = pytest.mark.comfyui

STEPS = 8
CONFIG = """
mode = "motion_lora"
name = "balls"
seed = 5
[base]
demo_seed = 0
[data]
folder = {folder!r}
frames = 8
stride = 1
width = 64
height = 64
[train]
steps = {steps}
learning_rate = {lr}
rank = 4
batch_size = 2
[output]
save_every = 1
keep_last = 2
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from animatediff_suite.training.synthetic import write_moving_shapes

    folder = tmp_path_factory.mktemp("clips")
    write_moving_shapes(str(folder), 3, frames=12, size=64, seed=1)
    return folder


def write_config(path, folder, steps=STEPS, lr=1e-3) -> str:
    path.write_text(CONFIG.format(folder=str(folder), steps=steps, lr=lr), encoding="utf-8")
    return str(path)


def command(comfyui, config_path, base, *extra):
    return [sys.executable, ROOT, "train", "--config", config_path, "--comfyui", comfyui, "--cpu",
            "--base-directory", str(base), *extra]


def run(comfyui, config_path, base, *extra, timeout=300):
    return subprocess.run(command(comfyui, config_path, base, *extra), capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    return env


def trained(base) -> dict:
    return load_file(str(base / "models" / "animatediff_motion_lora" / "balls.safetensors"))


def logged_steps(base) -> int:
    log = base / "output" / "animatediff_training" / "balls" / "log.csv"
    try:
        return len(log.read_text(encoding="utf-8").splitlines()) - 1
    except (FileNotFoundError, UnicodeDecodeError):
        return 0


@pytest.fixture(scope="module")
def uninterrupted(comfyui, data, tmp_path_factory):
    base = tmp_path_factory.mktemp("plain")
    done = run(comfyui, write_config(base / "run.toml", data), base)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "motion_lora:" in done.stdout
    return trained(base)


def assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert (got[key] == expected[key]).all(), key


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_weights(comfyui, data, uninterrupted, tmp_path):
    config_path = write_config(tmp_path / "run.toml", data)
    chance = random.Random(7)
    kills = 0
    process = subprocess.Popen(command(comfyui, config_path, tmp_path), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=_env())
    target = chance.randint(1, 3)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if logged_steps(tmp_path) >= target:
            time.sleep(chance.uniform(0.0, 0.4))  # somewhere inside a step or a save
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            if kills == 3:
                break
            target = logged_steps(tmp_path) + chance.randint(1, 2)
            process = subprocess.Popen(command(comfyui, config_path, tmp_path, "--resume"),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
        time.sleep(0.05)
    assert kills >= 2, "the runs ended before the kills"
    assert not os.path.exists(tmp_path / "models" / "animatediff_motion_lora" / "balls.safetensors")
    finished = run(comfyui, config_path, tmp_path, "--resume")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_same_weights(trained(tmp_path), uninterrupted)
    log = (tmp_path / "output" / "animatediff_training" / "balls" / "log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log] == ["step", *map(str, range(1, STEPS + 1))]  # no step twice
    states = sorted(os.listdir(tmp_path / "output" / "animatediff_training" / "balls"))
    assert [s for s in states if s.startswith("state-")] == ["state-00000007.pt", "state-00000008.pt"]  # keep_last 2


def test_sigterm_saves_and_exits_then_resume_refuses_changes_and_finishes(comfyui, data, uninterrupted, tmp_path):
    config_path = write_config(tmp_path / "run.toml", data)
    process = subprocess.Popen(command(comfyui, config_path, tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 240
    while logged_steps(tmp_path) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped at step" in out and "--resume" in out
    again = run(comfyui, config_path, tmp_path)
    assert again.returncode == 2 and "already has saved states" in again.stderr and "--resume" in again.stderr
    changed = run(comfyui, write_config(tmp_path / "other.toml", data, steps=12, lr=2e-3), tmp_path, "--resume")
    assert changed.returncode == 2
    assert "train.learning_rate: 0.001 -> 0.002" in changed.stderr
    assert "train.steps" not in changed.stderr  # more steps is what resuming is for
    finished = run(comfyui, config_path, tmp_path, "--resume")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_same_weights(trained(tmp_path), uninterrupted)
    log = (tmp_path / "output" / "animatediff_training" / "balls" / "log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log] == ["step", *map(str, range(1, STEPS + 1))]


def test_dry_run_prints_the_plan_and_writes_nothing(comfyui, data, tmp_path):
    (data / "broken.mp4").write_bytes(b"not a video at all")
    try:
        done = run(comfyui, write_config(tmp_path / "run.toml", data), tmp_path, "--dry-run")
    finally:
        (data / "broken.mp4").unlink()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mode motion_lora:" in done.stdout and "3 clips" in done.stdout and "memory estimate" in done.stdout
    assert "skipped" in done.stdout and "broken.mp4" in done.stdout
    assert not (tmp_path / "output" / "animatediff_training" / "balls").exists()
    assert not (tmp_path / "models" / "animatediff_motion_lora").exists()


def test_bad_config_and_unwritable_output_fail_before_training(comfyui, data, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('mode = "motion_lora"\n[train]\nsteps = "many"\n', encoding="utf-8")
    done = run(comfyui, str(bad), tmp_path)
    assert done.returncode == 2 and "[train] steps: expected int, got str 'many'" in done.stderr
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    done = run(comfyui, write_config(tmp_path / "run.toml", data), tmp_path,
               "--output-directory", str(blocker / "out"))
    assert done.returncode == 2 and "is not writable" in done.stderr and "a_file" in done.stderr


def test_two_processes_under_torchrun_train_as_one_process_with_the_global_batch(comfyui, data, tmp_path):
    """torchrun --nproc_per_node=2 (gloo, CPU), batch_size 1 per process = one process, batch_size 2: the
    same clips, noise and timesteps per step, gradients averaged by all-reduce. The first step's gradient
    norm and every logged loss agree to float order, and so do the weights after the first step, up to
    AdamW's lr * g / (|g| + eps): entries whose gradient is near eps move by a float-order-dependent
    part of lr (measured: mean error 2.5e-6 at lr 1e-3, a few entries up to 6.5e-4). Later steps build
    on those entries, so later weights are compared through their losses only."""
    import torch

    single_base, multi_base = tmp_path / "one", tmp_path / "two"
    config_one = CONFIG.format(folder=str(data), steps=3, lr=1e-3).replace("keep_last = 2", "keep_last = 3")
    config_two = config_one.replace("batch_size = 2", "batch_size = 1")
    for base, text in ((single_base, config_one), (multi_base, config_two)):
        base.mkdir()
        (base / "run.toml").write_text(text, encoding="utf-8")
    one = run(comfyui, str(single_base / "run.toml"), single_base)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              *command(comfyui, str(multi_base / "run.toml"), multi_base)[1:]]
    two = subprocess.run(launch, capture_output=True, text=True, timeout=600, env=_env())
    assert two.returncode == 0, two.stderr[-3000:]
    assert sum(line.startswith("motion_lora: ") for line in two.stdout.splitlines()) == 1  # process 0 writes

    def run_folder(base):
        return base / "output" / "animatediff_training" / "balls"

    def rows(base):
        lines = (run_folder(base) / "log.csv").read_text().splitlines()[1:]
        return [[float(v) for v in line.split(",")[1:3]] for line in lines]

    single_rows, multi_rows = rows(single_base), rows(multi_base)
    assert len(single_rows) == len(multi_rows) == 3
    assert multi_rows[0][1] == pytest.approx(single_rows[0][1], rel=1e-2)
    for (loss_1, _), (loss_2, _) in zip(single_rows, multi_rows):
        assert loss_2 == pytest.approx(loss_1, rel=1e-3)
    first = [torch.load(run_folder(b) / "state-00000001.pt", weights_only=True) for b in (single_base, multi_base)]
    assert first[1]["processes"] == 2 and first[0]["processes"] == 1
    for key, value in first[0]["parameters"].items():  # AdamW's step 1 is lr * g / (|g| + eps): entries
        error = (first[1]["parameters"][key] - value).abs()  # whose g is near eps differ, by < lr
        assert float(error.mean()) < 1e-2 * 1e-3 and float(error.max()) <= 1e-3, key
