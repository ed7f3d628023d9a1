"""The training loop's optional parts: validation animations, TensorBoard, 8-bit AdamW, the on-disk
latent/text cache and aspect buckets. Expected values come from outside the trainer: the stock nodes
sampling with the written file, log.csv against TensorBoard's own reader, torch's AdamW, hand-worked
bucket sizes, and runs without the option."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from training_helpers import base_models, config, heldout_loss, shape_clip, tensors

pytestmark = pytest.mark.comfyui


def train(run, clips, models=None, resume=False, on_step=None):
    from animatediff_suite.training.data import MemoryClips
    from animatediff_suite.training.session import run_in_graph

    with torch.inference_mode():  # as ComfyUI's executor runs a node
        return run_in_graph(run, models or base_models(run.mode), MemoryClips(clips, run.data), resume, on_step)


def run_folder(folders, name):
    return folders / "output" / "animatediff_training" / name


def webp_frames(path) -> np.ndarray:
    with Image.open(path) as image:
        frames = []
        for index in range(image.n_frames):
            image.seek(index)
            frames.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)
    return np.stack(frames)


VALIDATION = {"every": 2, "prompt": "a red ball moving left", "negative": "blurry", "steps": 3, "cfg": 3.0,
              "sampler": "euler", "scheduler": "normal", "seed": 11}


def test_validation_animation_is_what_the_stock_nodes_sample_with_the_trained_file(env, folders):
    """The step-4 animation equals KSampler + VAEDecode with the written MotionLoRA applied by the stock
    loaders (same seed, prompt, sampler); validating leaves the trained weights bit-identical."""
    import nodes

    from animatediff_suite.nodes.motion_nodes import ApplyMotionModel, LoadMotionLora

    clips = [shape_clip(s) for s in range(2)]
    _, plain = train(config("motion_lora", "plain", steps=4, learning_rate=1e-2), clips)
    models = base_models("motion_lora")
    _, written = train(config("motion_lora", "val", steps=4, learning_rate=1e-2, sections={"validation": VALIDATION}),
                       clips, models)
    a, b = load_file(plain["motion_lora"]), load_file(written["motion_lora"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    folder = run_folder(folders, "val") / "validation"
    assert sorted(os.listdir(folder)) == ["step-00000002.webp", "step-00000004.webp"]

    chain = LoadMotionLora.execute(os.path.basename(written["motion_lora"]), 1.0).result[0]
    model = ApplyMotionModel.execute(models.model, models.motion, motion_lora=chain).result[0]
    positive = nodes.CLIPTextEncode().encode(models.clip, VALIDATION["prompt"])[0]
    negative = nodes.CLIPTextEncode().encode(models.clip, VALIDATION["negative"])[0]
    latent = {"samples": torch.zeros(8, 4, 8, 8)}
    with torch.inference_mode():
        samples = nodes.common_ksampler(model, 11, 3, 3.0, "euler", "normal", positive, negative, latent)[0]
        expected = nodes.VAEDecode().decode(models.vae, samples)[0].numpy()
        untrained_model = ApplyMotionModel.execute(models.model, models.motion).result[0]
        untrained = nodes.VAEDecode().decode(models.vae, nodes.common_ksampler(
            untrained_model, 11, 3, 3.0, "euler", "normal", positive, negative, latent)[0])[0].numpy()
    got = webp_frames(folder / "step-00000004.webp")
    assert got.shape == expected.shape == (8, 64, 64, 3)
    assert float(np.abs(got - expected).max()) <= 0.5 / 255 + 1e-6  # lossless WebP: 8-bit rounding only
    assert float(np.abs(untrained - expected).mean()) > 2 / 255  # 4x the tolerance: it tells trained from untrained


def test_validation_sampler_names_are_checked_against_comfyui(env):
    from animatediff_suite.training.config import ConfigError

    for key, value in (("sampler", "eulerr"), ("scheduler", "linear")):
        with pytest.raises(ConfigError, match=rf"\[validation\] {key}: '{value}' is not a ComfyUI {key}"):
            config("motion_lora", sections={"validation": {key: value}})
    assert config("motion_lora", sections={"validation": {"sampler": "dpmpp_2m", "scheduler": "karras"}})


def tensorboard_scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)], events


def test_tensorboard_has_the_logged_scalars_once_per_step_after_a_resume(env, folders):
    """A kill after step 4 was logged but before its state was written: the resumed run redoes steps 3-4
    and TensorBoard (its own reader) shows steps 1-4 once, with the values log.csv has."""
    clips = [shape_clip(s) for s in range(2)]
    run = config("motion_lora", "tb", steps=4, sections={"output": {"save_every": 2},
                                                         "validation": {**VALIDATION, "every": 4}})
    train(run, clips)
    folder = run_folder(folders, "tb")
    os.remove(folder / "state-00000004.pt")  # what a SIGKILL between the log row and the save leaves
    train(run, clips, resume=True)
    rows = [line.split(",") for line in (folder / "log.csv").read_text().splitlines()[1:]]
    scalars, events = tensorboard_scalars(folder / "tensorboard", "train/loss")
    assert [s for s, _ in scalars] == [1, 2, 3, 4]
    for (step, value), row in zip(scalars, rows):
        assert step == int(row[0]) and value == pytest.approx(float(row[1]), rel=1e-6)
    lr, _ = tensorboard_scalars(folder / "tensorboard", "train/learning_rate")
    assert [v for _, v in lr] == pytest.approx([1e-3] * 4)
    images = events.Images("validation")
    assert [i.step for i in images] == [4] and (images[0].width, images[0].height) == (8 * 64, 64)  # frames in a row


def test_adamw8bit_steps_like_adamw_and_keeps_8_bit_moments(env, folders):
    """Adam's first step is lr * g / (|g| + eps) whatever the moment precision: 8-bit AdamW's matches
    torch's AdamW; its saved moments are uint8 (bitsandbytes keeps tensors under 4096 entries in 32 bits:
    rank 64 makes the 64-channel layers' LoRAs large enough); a resume with another optimizer is refused."""
    from animatediff_suite.training.checkpoints import ResumeError

    clips = [shape_clip(s) for s in range(2)]
    _, reference = train(config("motion_lora", "fp32", steps=1, learning_rate=1e-2, rank=64, optimizer="adamw"),
                         clips)
    run = config("motion_lora", "int8", steps=1, learning_rate=1e-2, rank=64, optimizer="adamw8bit")
    _, written = train(run, clips)
    a, b = load_file(reference["motion_lora"]), load_file(written["motion_lora"])
    ups = [k for k in a if ".up." in k]
    assert ups and max(float(a[k].abs().max()) for k in ups) > 5e-3  # the step moved the weights by ~lr
    for key in a:
        assert float((b[key] - a[key]).abs().mean()) < 0.05 * 1e-2, key
    state = torch.load(run_folder(folders, "int8") / "state-00000001.pt", weights_only=True)
    assert state["optimizer_name"] == "adamw8bit"
    assert any(t.dtype == torch.uint8 for t in tensors(state["optimizer"]["state"]))
    auto = torch.load(run_folder(folders, "fp32") / "state-00000001.pt", weights_only=True)
    assert auto["optimizer_name"] == "adamw"
    longer = config("motion_lora", "int8", steps=2, learning_rate=1e-2, rank=64, optimizer="auto")  # auto on CPU: adamw
    with pytest.raises(ResumeError, match="optimizer 'adamw8bit'.*resolves .* to 'adamw'"):
        train(longer, clips, resume=True)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_computes_in_half_and_keeps_fp32_weights_and_moments(env, folders, precision):
    """The GPU recipe run on the CPU (CI has none; CPU autocast takes both dtypes): the UNet's layers compute
    in the half dtype, the losses of the same draws stay within half precision of an fp32 run's and so does
    the first step's gradient norm (the LoRA's whole gradient: every ``up`` starts at zero), the trained
    weights, their file and AdamW's moments stay fp32, and only fp16 runs a grad scaler.

    At 128x128, not the tests' usual 64x64: there the tiny UNet's deepest level is 1x1 latent pixel and
    each GroupNorm group normalises 2 values, whose backward amplifies rounding without bound (bf16's
    step-1 gradient norm 0.218 against fp32's 0.0112, measured); at 128x128 (8 values) they agree to 0.1%."""
    clips = [shape_clip(s, size=128) for s in range(2)]
    data = {"data": {"width": 128, "height": 128}}
    reference, _ = train(config("motion_lora", "fp32", steps=2, learning_rate=1e-2, precision="fp32", sections=data),
                         clips)
    models = base_models("motion_lora")
    seen = set()
    hook = models.model.model.diffusion_model.out[2].register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    try:
        result, written = train(config("motion_lora", precision, steps=2, learning_rate=1e-2, precision=precision,
                                       sections=data), clips, models)
    finally:
        hook.remove()
    assert seen == {{"bf16": torch.bfloat16, "fp16": torch.float16}[precision]}
    # bf16 keeps 8 significant bits (relative step 2^-8 = 0.4%), fp16 11; a whole UNet accumulates a few steps
    assert result.losses == pytest.approx(reference.losses, rel={"bf16": 3e-2, "fp16": 5e-3}[precision])
    norms = [float(run_folder(folders, name).joinpath("log.csv").read_text().splitlines()[1].split(",")[2])
             for name in ("fp32", precision)]
    assert norms[1] == pytest.approx(norms[0], rel=2e-2) and norms[0] > 1e-3
    state = torch.load(run_folder(folders, precision) / "state-00000002.pt", weights_only=True)
    moments = [t for t in tensors(state["optimizer"]["state"]) if t.ndim]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    lora = load_file(written["motion_lora"])
    assert all(v.dtype == torch.float32 for v in lora.values())
    assert max(float(v.abs().max()) for k, v in lora.items() if ".up." in k) > 5e-3  # it trained
    if precision == "fp16":  # 2^16 to start; no overflow in two steps, so two good steps towards growth
        assert (state["scaler"]["scale"], state["scaler"]["_growth_tracker"]) == (2.0 ** 16, 2)
    else:
        assert state["scaler"] == {}


def test_dry_run_plan_counts_the_optimizer_moments_it_will_keep(env, folders):
    """Per trained value: fp32 weight + gradient (8 bytes) + AdamW's two fp32 moments (8) or 8-bit ones (2)."""
    from animatediff_suite.training.data import MemoryClips
    from animatediff_suite.training.session import plan
    from animatediff_suite.training.trainer import build_trainables

    models = base_models("motion_lora")
    for optimizer, per_value in (("adamw", 16), ("adamw8bit", 10), ("auto", 16)):  # auto on CPU: adamw
        run = config("motion_lora", rank=64, optimizer=optimizer)
        trainables = build_trainables(run, models)
        trained = sum(p.numel() for p in trainables.named_parameters().values())
        text = plan(run, models, MemoryClips([shape_clip(0)], run.data), trainables)
        assert f"moments {trained * per_value / 2**20:.1f} MiB" in text, (optimizer, text)


def test_disk_cache_trains_the_same_weights_and_a_warm_cache_skips_the_encoders(env, folders):
    clips = [shape_clip(s) for s in range(3)]
    _, plain = train(config("motion_lora", "plain", steps=3, batch_size=2), clips)
    cached_run = config("motion_lora", "cold", steps=3, batch_size=2, sections={"data": {"cache": True}})
    _, cold = train(cached_run, clips)
    cache = folders / "output" / "animatediff_training" / "cache"
    latents = sorted(p.name for p in (cache / "latents").rglob("*.safetensors"))
    texts = sorted(p.name for p in (cache / "text").rglob("*.safetensors"))
    # 3 steps x 2 clip draws; 3 captions (no dropout) and the empty prompt the guider is set up with
    assert len(latents) == 6 and len(texts) == 4

    models = base_models("motion_lora")
    calls = {"encode": 0, "text": 0}
    encode, text = models.vae.encode, models.clip.encode_from_tokens

    def counting(name, function):
        def call(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return call

    models.vae.encode, models.clip.encode_from_tokens = counting("encode", encode), counting("text", text)
    _, warm = train(config("motion_lora", "warm", steps=3, batch_size=2, sections={"data": {"cache": True}}), clips,
                    models)
    assert calls == {"encode": 0, "text": 0}
    for written in (cold, warm):
        a, b = load_file(plain["motion_lora"]), load_file(written["motion_lora"])
        assert all(torch.equal(a[k], b[k]) for k in a)

    changed = [(clips[0][0].flip(1), clips[0][1])] + clips[1:]  # other pixels, same caption: new latent keys
    train(config("motion_lora", "changed", steps=3, batch_size=2, sections={"data": {"cache": True}}), changed)
    assert len(list((cache / "latents").rglob("*.safetensors"))) > len(latents)


def test_bucket_sizes_by_hand():
    from animatediff_suite.training.config import DataConfig
    from animatediff_suite.training.data import bucket_size, bucket_sizes

    # about 256 x 256 pixels, sides multiples of 64, aspect 1:2 .. 2:1 (worked out on paper)
    assert bucket_sizes(256, 256) == ((192, 320), (192, 384), (256, 256), (320, 192), (384, 192))
    data = DataConfig(width=256, height=256, buckets=True)
    assert bucket_size(640, 360, data) == (320, 192)  # 16:9 = 1.78: 5:3 = 1.67 is nearer than 2:1
    assert bucket_size(360, 640, data) == (192, 320)
    assert bucket_size(1000, 400, data) == (384, 192)  # 2.5:1: the widest bucket
    assert bucket_size(500, 500, data) == (256, 256)
    assert bucket_size(640, 360, DataConfig(width=256, height=256)) == (256, 256)  # buckets off


def test_buckets_batch_clips_of_one_shape(env, folders):
    """Each global micro-batch comes from one bucket; the run trains at the clips' own aspect ratios."""
    from animatediff_suite.training.data import MemoryClips
    from animatediff_suite.training.trainer import Trainer, TrainingError

    square = [shape_clip(s) for s in range(3)]
    wide = [(torch.cat([p, p], dim=2), c) for p, c in (shape_clip(s) for s in range(10, 13))]  # 128 x 64
    run = config("motion_lora", "buckets", steps=4, batch_size=2, sections={"data": {"buckets": True}})
    clips = MemoryClips(square + wide, run.data)
    assert [clips.size(i) for i in range(6)] == [(64, 64)] * 3 + [(128, 64)] * 3
    trainer = Trainer(run, base_models("motion_lora"), clips, str(run_folder(folders, "buckets")))
    seen = set()
    for _ in range(5):
        order = trainer._epoch_order(2)
        assert len(order) == 4 and len(set(order)) == 4  # one run of 2 per bucket; the odd clip waits
        for first, second in zip(order[::2], order[1::2]):
            assert clips.size(first) == clips.size(second)
        seen.update(order)
    assert seen == set(range(6))

    shapes = []
    models = base_models("motion_lora")
    encode = models.vae.encode
    models.vae.encode = lambda pixels: shapes.append(tuple(pixels.shape[1:3])) or encode(pixels)
    result, _ = train(run, square + wide, models)
    assert result.steps == 4 and all(np.isfinite(result.losses))
    assert set(shapes) == {(64, 64), (64, 128)}
    assert all(shapes[i] == shapes[i + 1] for i in range(0, len(shapes), 2))

    lonely = MemoryClips(square[:1] + wide[:1], run.data)
    with pytest.raises(TrainingError, match="no bucket has 2 clips .*64x64: 1, 128x64: 1"):
        Trainer(run, base_models("motion_lora"), lonely, str(run_folder(folders, "lonely"))).run()


def test_a_unet_loaded_with_requires_grad_gets_no_gradients_and_its_flags_back(env, folders):
    """ComfyUI's checkpoint loader builds the UNet with model_config.get_model and leaves PyTorch's default
    requires_grad=True on its weights. Training must not compute or keep gradients for them (time and a
    UNet-sized .grad per weight), must train what the frozen model trains, and must restore the flags."""
    import comfy.supported_models

    from animatediff_suite.nodes import demo

    assert all(p.requires_grad for p in comfy.supported_models.SD15(dict(demo.TINY_UNET)).get_model({}).parameters())
    clips = [shape_clip(s) for s in range(2)]
    _, frozen = train(config("motion_lora", "frozen", steps=2), clips)
    models = base_models("motion_lora")
    unet = models.model.model.diffusion_model
    unet.requires_grad_(True)
    seen = []

    def check(step, total, loss):
        seen.append((sum(p.requires_grad for p in models.model.model.parameters()),
                     sum(p.grad is not None for p in models.model.model.parameters())))

    _, written = train(config("motion_lora", "loaded", steps=2), clips, models, on_step=check)
    assert seen == [(0, 0), (0, 0)]
    assert all(p.requires_grad for p in models.model.model.diffusion_model.parameters())
    a, b = load_file(frozen["motion_lora"]), load_file(written["motion_lora"])
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["motion_module", "motion_lora"])
def test_sdxl_training_learns_and_writes_files_the_loaders_apply(env, folders, mode):
    """SDXL: the pooled text embedding and size conditioning go with every clip; a new module is
    sdxl_beta-shaped (auto); the held-out loss (the test's own eps formula) falls."""
    from animatediff_suite.nodes import demo
    from animatediff_suite.nodes.motion_nodes import ApplyMotionModel, LoadMotionLora, LoadMotionModel
    from animatediff_suite.training.trainer import BaseModels

    motion = demo.tiny_motion_patcher(0, "sdxl_beta") if mode == "motion_lora" else None
    models = BaseModels(demo.tiny_model(0, "SDXL"), demo.tiny_clip(0), demo.tiny_vae(0), motion, "demo sdxl")
    held_out = [shape_clip(s) for s in range(100, 102)]
    if motion is None:
        before = heldout_loss(models.model, models.clip, models.vae, held_out)
    else:
        before = heldout_loss(ApplyMotionModel.execute(models.model, motion).result[0], models.clip, models.vae,
                              held_out)
    run = config(mode, f"sdxl_{mode}", steps=15, learning_rate=3e-3 if mode == "motion_module" else 1e-2,
                 rank=16, batch_size=2, gradient_checkpointing=False)
    result, written = train(run, [shape_clip(s) for s in range(4)], models)
    assert result.steps == 15 and all(np.isfinite(result.losses))
    if mode == "motion_module":
        loaded = LoadMotionModel.execute(os.path.basename(written["motion_module"])).result[0]
        assert loaded.spec.version == "sdxl_beta"
        model = ApplyMotionModel.execute(models.model, loaded).result[0]
    else:
        chain = LoadMotionLora.execute(os.path.basename(written["motion_lora"]), 1.0).result[0]
        model = ApplyMotionModel.execute(models.model, motion, motion_lora=chain).result[0]
    after = heldout_loss(model, models.clip, models.vae, held_out)
    print(f"SDXL {mode}: held-out loss {before:.4f} -> {after:.4f} ({after / before:.3f})")
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("family", ["SD1.5", "SDXL"])
def test_a_new_motion_model_is_initialised_like_pytorch_and_starts_as_an_identity(env, family):
    """ComfyUI's manual-cast layers skip initialisation (their weights would be whatever memory held):
    a new module must have PyTorch's default values, bounded by 1/sqrt(fan_in), seeded, proj_out zero."""
    import dataclasses
    import math

    from animatediff_suite.nodes import demo
    from animatediff_suite.training.trainer import new_motion_model

    model = demo.tiny_model(0, family)
    run = config("motion_module")
    first, again = new_motion_model(run, model), new_motion_model(run, model)
    other = new_motion_model(dataclasses.replace(run, seed=4), model)
    state, state_again, state_other = first.state_dict(), again.state_dict(), other.state_dict()
    assert first.spec.version == {"SD1.5": "v2", "SDXL": "sdxl_beta"}[family]
    linears = [k for k, v in state.items() if k.endswith(".weight") and v.ndim == 2 and "pos_encoder" not in k]
    assert linears
    for key in linears:
        weight = state[key]
        assert torch.equal(weight, state_again[key]), key
        if ".proj_out." in key:
            assert not weight.any(), key  # zero: the new module adds nothing yet
        else:
            bound = 1 / math.sqrt(weight.shape[1])
            assert 0.5 * bound < float(weight.abs().max()) <= bound, key  # kaiming-uniform(a=sqrt(5))
            assert not torch.equal(weight, state_other[key]), key
    assert all(bool(torch.isfinite(v).all()) for v in state.values())
