"""The training loop in-process: interrupts of a training node, non-finite losses, gradient
checkpointing, gradient accumulation, and the Train MotionLoRA node's outputs."""

import os

import pytest
import torch
from safetensors.torch import load_file

from training_helpers import base_models, config, shape_clip

pytestmark = pytest.mark.comfyui


def train(run, clips, resume=False, on_step=None, mode="motion_lora"):
    from animatediff_suite.training.data import MemoryClips
    from animatediff_suite.training.session import run_in_graph

    with torch.inference_mode():  # as ComfyUI's executor runs a node
        return run_in_graph(run, base_models(mode), MemoryClips(clips, run.data), resume, on_step)


def lora_file(written) -> dict:
    return load_file(written["motion_lora"])


def test_interrupted_node_resumes_to_the_uninterrupted_weights(env, folders):
    import comfy.model_management as mm

    clips = [shape_clip(s) for s in range(3)]
    _, plain = train(config("motion_lora", "plain", steps=6, batch_size=2), clips)
    expected = lora_file(plain)

    def interrupt_after_three(step, total, loss):
        if step == 3:
            mm.interrupt_current_processing(True)  # what ComfyUI's /interrupt does

    run = config("motion_lora", "cut", steps=6, batch_size=2)
    with pytest.raises(mm.InterruptProcessingException):
        train(run, clips, on_step=interrupt_after_three)
    folder = folders / "output" / "animatediff_training" / "cut"
    assert sorted(os.listdir(folder)) == ["log.csv", "state-00000003.pt", "tensorboard"]
    assert not (folders / "animatediff_motion_lora" / "cut.safetensors").exists()
    result, written = train(run, clips, resume=True)
    assert result.steps == 6
    got = lora_file(written)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_models_loaded_in_inference_mode_then_moved_train_like_plain_ones(env, folders):
    """ComfyUI's loaders run under inference mode, and the trainer's load onto a GPU (outside it) moves
    every weight with ``Module.to``, which sets ``param.data``: the weight then reports ``is_inference()``
    False but has no version counter, so autograd cannot save it ("Inference tensors do not track version
    counter", first seen on an H200 by tests/gpu/check_training_gpu.py). The CPU has no such move, so the
    test makes it as ``.to(device)`` does (``Module._apply`` with a copy); the run must then train
    exactly the weights that models built outside inference mode train (with gradient checkpointing, as on
    the H200; without it the first backward failed the same way)."""
    from animatediff_suite.training.data import MemoryClips
    from animatediff_suite.training.session import run_in_graph

    clips = [shape_clip(s) for s in range(2)]

    def trained(name, models):
        run = config("motion_lora", name, steps=2, batch_size=2, gradient_checkpointing=True)
        with torch.inference_mode():  # as ComfyUI's executor runs a node
            return lora_file(run_in_graph(run, models, MemoryClips(clips, run.data), False)[1])

    expected = trained("plain", base_models("motion_lora"))
    with torch.inference_mode():  # as a loader node runs
        models = base_models("motion_lora")
    moved = [models.model.model, models.motion.patcher.model]
    for module in moved:
        module._apply(lambda t: t.clone())  # what .to(device) does to each weight, outside inference mode
    weight = models.model.model.diffusion_model.out[0].weight
    assert not weight.is_inference()  # the case is_inference() alone misses
    with pytest.raises(RuntimeError, match="version counter"):
        weight._version
    got = trained("moved", models)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_non_finite_losses_stop_the_run_and_nothing_non_finite_is_saved(env, folders):
    from animatediff_suite.training.trainer import TrainingError

    run = config("motion_lora", "blowup", steps=30, batch_size=1, learning_rate=1e8, max_nonfinite_steps=3,
                 max_grad_norm=0.0)
    with pytest.raises(TrainingError, match=r"3 steps in a row had a non-finite loss.*learning_rate"):
        train(run, [shape_clip(0)])
    folder = folders / "output" / "animatediff_training" / "blowup"
    for name in os.listdir(folder):
        if name.startswith("state-"):
            state = torch.load(folder / name, weights_only=True)
            assert all(bool(torch.isfinite(t).all()) for t in state["parameters"].values())
    assert not (folders / "animatediff_motion_lora" / "blowup.safetensors").exists()


@pytest.mark.parametrize("mode", ["motion_lora", "motion_director", "semantic_motion_predictor"])
def test_gradient_checkpointing_computes_the_same_gradients(env, folders, mode):
    """Checkpointing recomputes what the plain backward keeps: the same loss and gradient norm (a checksum
    of the whole gradient) at the first step, where nothing differs but the backward, and the same loss
    and gradient norm after one update.

    The weights are not compared element by element: float rounding differs between the two backwards
    (and between two plain runs of one process, with MKL's alignment-dependent sums), and AdamW moves an
    element whose gradient is at that noise level by a whole step (+-lr) in whichever direction the noise
    says. MotionDirector's second-step gradient has many such elements: 6,500-10,000 of 75,776 LoRA
    weights were a step apart in repeated runs (after an fp16 run), with losses equal to 1e-7 and gradient
    norms to 3e-4. A wrong recompute changes the gradient itself, and with it the norm far beyond 1e-5.
    The predictor's tokens are computed once per micro-batch outside the checkpointed layers and read inside
    them: their gradient must flow through the recompute too."""
    clips = [shape_clip(s) for s in range(2)]
    _, plain = train(config(mode, "plain", steps=2, gradient_checkpointing=False), clips, mode=mode)
    _, checkpointed = train(config(mode, "ckpt", steps=2, gradient_checkpointing=True), clips, mode=mode)
    (first, second), (first_ckpt, second_ckpt) = logged(folders, "plain"), logged(folders, "ckpt")
    assert first_ckpt[1:3] == pytest.approx(first[1:3], rel=1e-5)  # loss, gradient norm of step 1
    assert second_ckpt[1] == pytest.approx(second[1], rel=1e-5) and second_ckpt[2] == pytest.approx(second[2], rel=1e-3)
    assert first[2] > 1e-3 and second[2] > 1e-3
    for kind in plain:
        a, b = load_file(plain[kind]), load_file(checkpointed[kind])
        assert a.keys() == b.keys()
        zero_at_start = [v for k, v in b.items() if ".up." in k or "lora_up" in k or k.startswith("proj_out.")]
        assert max(float(v.abs().max()) for v in zero_at_start) > 1e-4  # it trained


@pytest.mark.parametrize("mode", ["motion_lora", "motion_director"])
def test_nothing_is_read_from_the_device_between_a_forward_and_the_end_of_its_backward(env, folders, monkeypatch,
                                                                                      mode):
    """On a GPU each read of a tensor's value into Python (``aten._local_scalar_dense``: ``float()``,
    ``bool()``, ``item()``) waits for all the work queued before it, so a read between a forward and its
    backward stops the host from queueing the backward while the GPU finishes the forward. Before, the
    loop checked each loss's finiteness there, and every motion module read the sigma in the forward and
    again in the checkpointed recompute. Recorded on the CPU, in order: UNet forwards (with gradients),
    backward calls and reads; MotionDirector's batch of 2 with dropout 0.5 runs 3, 3 and 1 paths in its 3
    steps (see the accumulation test below)."""
    import comfy.patcher_extension
    from comfy_helpers import ValueReads

    from animatediff_suite.training.data import MemoryClips
    from animatediff_suite.training.session import run_in_graph

    events = []
    backward = torch.Tensor.backward

    def recorded_backward(self, *args, **kwargs):
        events.append("backward")
        backward(self, *args, **kwargs)
        events.append("backward done")

    def forward(executor, *args, **kwargs):
        if torch.is_grad_enabled():
            events.append("forward")
        return executor(*args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", recorded_backward)
    models = base_models(mode)
    models.model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.reads", forward)
    extra = {"spatial_lora_dropout": 0.5} if mode == "motion_director" else {}
    run = config(mode, "reads", steps=3, batch_size=2, gradient_checkpointing=True, **extra)
    clips = [shape_clip(s) for s in range(4)]
    with torch.inference_mode(), ValueReads(on_read=lambda: events.append("read")).mode:
        run_in_graph(run, models, MemoryClips(clips, run.data), False, None)
    assert events.count("forward") == events.count("backward") == (7 if mode == "motion_director" else 3)
    assert events.count("read") > 0  # the recording works: the random draws and the optimizer read values
    inside, position = [], None
    for event in events:
        if event == "forward":
            position = []
        elif event == "backward done":
            inside.append(position)
            position = None
        elif position is not None:
            position.append(event)
    assert inside and all(between == ["backward"] for between in inside), inside


def logged(folders, name) -> list[list[float]]:
    lines = (folders / "output" / "animatediff_training" / name / "log.csv").read_text().splitlines()
    assert lines[0] == "step,loss,grad_norm,learning_rate,seconds"
    return [[float(v) for v in line.split(",")] for line in lines[1:]]


def test_gradient_accumulation_equals_the_larger_batch(env, folders):
    """Two micro-batches of one clip, accumulated, make the same step as one batch of two clips: the
    batch's loss is the mean over both clips, the accumulated one the mean of the two means, and each
    clip's random draws are the same either way. So the logged loss and gradient norm agree (summing
    instead of averaging doubles them) and so do the weights after the step (stepping per micro-batch
    would move them twice)."""
    clips = [shape_clip(s) for s in range(4)]
    _, batched = train(config("motion_lora", "batched", steps=1, batch_size=2), clips)
    _, accumulated = train(config("motion_lora", "accumulated", steps=1, batch_size=1, gradient_accumulation=2),
                           clips)
    (_, loss_a, norm_a, *_), = logged(folders, "batched")
    (_, loss_b, norm_b, *_), = logged(folders, "accumulated")
    # float order (other batch shapes take other kernel blockings) moves the small norm by ~0.1%
    assert loss_b == pytest.approx(loss_a, rel=1e-5) and norm_b == pytest.approx(norm_a, rel=1e-2)
    a, b = lora_file(batched), lora_file(accumulated)
    # AdamW's first step is lr * g / (|g| + eps): where g is near eps, float order flips single entries,
    # so compare means; stepping once per micro-batch would move every entry by about lr more
    for key in a:
        assert float((b[key] - a[key]).abs().mean()) < 0.05 * 1e-3, key
    _, single = train(config("motion_lora", "single", steps=1, batch_size=1), clips)
    (_, loss_c, norm_c, *_), = logged(folders, "single")
    assert abs(loss_c - loss_a) > 1e-4 and abs(norm_c - norm_a) > 1e-3 * norm_a  # one clip is another step


def test_motion_director_losses_are_those_of_its_train_py(env, folders):
    """MotionDirector's train.py: the temporal loss is the MSE plus the appearance-debiased MSE (which is
    the MSE itself at beta 0), the spatial loss the MSE of one frame per clip, and a clip drawn for
    ``spatial_lora_dropout`` trains no spatial LoRA. At step 1 every LoRA's up matrix is still zero, so
    the model is the plain animated one that ``motion_lora`` trains from, on the same draws (one clip,
    the same generator): its step-1 loss is the MSE."""
    clips = [shape_clip(0)]
    train(config("motion_lora", "plain", steps=1, batch_size=1), clips)
    mse = logged(folders, "plain")[0][1]
    _, alone = train(config("motion_director", "alone", steps=1, batch_size=1, debias_beta=0.0,
                            spatial_lora_dropout=1.0), clips, mode="motion_director")
    assert logged(folders, "alone")[0][1] == pytest.approx(2 * mse, rel=1e-6)
    spatial = load_file(alone["sd_lora"])
    assert all(float(v.abs().max()) == 0.0 for k, v in spatial.items() if ".lora_up." in k)  # never trained
    assert max(float(v.abs().max()) for k, v in lora_file(alone).items() if ".up." in k) > 1e-4
    _, paired = train(config("motion_director", "paired", steps=1, batch_size=1, debias_beta=0.0,
                             spatial_lora_dropout=0.0), clips, mode="motion_director")
    frame_mse = logged(folders, "paired")[0][1] - 2 * mse
    assert 0.5 * mse < frame_mse < 2 * mse  # the spatial path's: one frame's MSE, near the clip's (1.26 vs 1.14)
    spatial = load_file(paired["sd_lora"])
    assert max(float(v.abs().max()) for k, v in spatial.items() if ".lora_up." in k) > 1e-4


def test_motion_director_batch_equals_accumulation_when_only_some_clips_train_the_spatial_lora(env, folders):
    """With ``spatial_lora_dropout`` a batch holds clips of both kinds; each group's loss counts by its share
    of the clips, so a batch of 2 still makes the step two accumulated micro-batches of 1 make. At seed 3
    with 0.5, steps 1 and 2 draw one clip of each kind and step 3 two that leave the spatial LoRA out
    (checked by printing the drawn batches). Weighting each group's mean alone would double a mixed
    step's loss in the batch."""
    clips = [shape_clip(s) for s in range(4)]
    kinds = {}
    for name, batch, accumulation in (("batched", 2, 1), ("accumulated", 1, 2)):
        _, kinds[name] = train(config("motion_director", name, steps=3, batch_size=batch,
                                      gradient_accumulation=accumulation, spatial_lora_dropout=0.5),
                               clips, mode="motion_director")
    batched, accumulated = logged(folders, "batched"), logged(folders, "accumulated")
    for a, b in zip(batched, accumulated):
        assert b[1] == pytest.approx(a[1], rel=1e-5) and b[2] == pytest.approx(a[2], rel=1e-2)
    for kind in ("motion_lora", "sd_lora"):
        a, b = load_file(kinds["batched"][kind]), load_file(kinds["accumulated"][kind])
        for key in a:  # see test_gradient_accumulation_equals_the_larger_batch on single entries
            assert float((b[key] - a[key]).abs().mean()) < 0.05 * 1e-3, key


def test_train_motionlora_node_returns_a_chain_that_animates(env, folders):
    from animatediff_suite.nodes.train_nodes import CameraMotionClips, TrainMotionLora

    models = base_models("motion_lora")
    stills = torch.stack([shape_clip(s, frames=1)[0][0] for s in range(2)])
    images, per_clip = CameraMotionClips.execute(stills, "pan_left", 8, 0.05, "linear", 64, 64, 0.0, 0).result
    assert images.shape == (16, 64, 64, 3) and per_clip == 8
    values = dict(name="pan", steps=3, learning_rate=1e-2, rank=4, frames=8, stride=1, width=64, height=64, seed=0,
                  gradient_checkpointing=True, resume=True)
    with torch.inference_mode():
        out = TrainMotionLora.execute(models.model, models.motion, models.clip, models.vae, images,
                                      "the camera pans left", per_clip, 0.7, **values)
    chain, loss_image, info = out.result
    assert [(e.name, e.strength) for e in chain] == [("pan.safetensors", 0.7)]
    assert loss_image.shape == (1, 256, 512, 3) and "3 steps" in info and "pan.safetensors" in info
    file = load_file(str(folders / "animatediff_motion_lora" / "pan.safetensors"))
    pair = next(k for k in file if k.endswith("to_q_lora.up.weight"))
    target = pair.replace(".processor.to_q_lora.up.weight", ".to_q.weight")
    up, down = chain[0].lora.pairs[target]
    torch.testing.assert_close(up, file[pair])
    with pytest.raises(Exception, match="not a multiple of frames_per_clip"):
        TrainMotionLora.execute(models.model, models.motion, models.clip, models.vae, images[:12],
                                "x", 8, 1.0, **values)


def test_train_motion_node_trains_from_a_folder_in_the_input_directory(env, folders):
    import folder_paths

    from animatediff_suite.nodes.train_nodes import TrainMotion
    from animatediff_suite.training.synthetic import write_moving_shapes

    saved_input = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(folders / "input"))
    try:
        write_moving_shapes(str(folders / "input" / "balls"), 2, frames=12, size=64, seed=4)
        assert TrainMotion.validate_inputs(folder="missing") == \
            "folder 'missing' is not a folder in ComfyUI's input directory"
        assert TrainMotion.validate_inputs(folder="balls", steps=2) is True
        models = base_models("domain_adapter")
        values = dict(name="adapter", steps=2, learning_rate=1e-3, rank=4, frames=8, stride=1, width=64, height=64,
                      seed=0, gradient_checkpointing=False, resume=False)
        with torch.inference_mode():
            loss, info = TrainMotion.execute("domain_adapter", models.model, models.clip, models.vae, "balls", 1,
                                             **values).result
        assert loss.shape == (1, 256, 512, 3) and "2 steps" in info and "adapter.safetensors" in info
        state = load_file(str(folders / "loras" / "adapter.safetensors"))
        assert state and all(k.startswith("lora_unet_") for k in state)
        with pytest.raises(Exception, match="connect motion_model"):
            TrainMotion.execute("motion_lora", models.model, models.clip, models.vae, "balls", 1, **values)
    finally:
        folder_paths.set_input_directory(saved_input)


def test_training_attention_is_pytorch_attention_only_where_comfyui_chose_a_chunked_one(env, folders):
    """The override computes the same attention (values) as the function ComfyUI chose, and keeps
    xformers/pytorch/flash as they are; the user's MODEL never carries it."""
    import comfy.ldm.modules.attention as attention

    from animatediff_suite.training.trainer import training_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 64, 32, generator=gen) for _ in range(3))
    chosen = []

    def spy(name):
        def func(*args, **kwargs):
            chosen.append(name)
            return attention.attention_basic(*args, **kwargs)
        func.__name__ = name
        return func

    with torch.enable_grad():
        out = training_attention(spy("attention_sub_quad"), q, k, v, 4, _inside_attn_wrapper=True)
    torch.testing.assert_close(out, attention.attention_sub_quad(q, k, v, 4), rtol=1e-4, atol=1e-5)
    assert chosen == []  # routed to PyTorch attention, not the chunked one
    training_attention(spy("attention_xformers"), q, k, v, 4)
    with torch.no_grad():
        training_attention(spy("attention_split"), q, k, v, 4)
    assert chosen == ["attention_xformers", "attention_split"]  # kept: another backend, or no backward

    from animatediff_suite.training.data import MemoryClips
    from animatediff_suite.training.session import run_in_graph

    models = base_models("motion_lora")
    run = config("motion_lora", "override", steps=1)
    with torch.inference_mode():
        run_in_graph(run, models, MemoryClips([shape_clip(0)], run.data), False)
    assert "optimized_attention_override" not in models.model.model_options["transformer_options"]
