"""The temporal transformer: identity at init, PE facts, frame-limit error, shape properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ads_helpers import frames_input, make_spec, pe_formula, random_model
from animatediff_suite.motion_modules import (MotionModel, MotionModelError, VanillaTemporalModule,
                                              sinusoidal_pe)


def test_zero_proj_out_is_exact_identity():
    torch.manual_seed(0)
    module = VanillaTemporalModule(64, heads=8, max_len=32, norm_mode="per_frame")
    for name, p in module.named_parameters():
        if "proj_out" not in name:
            torch.nn.init.normal_(p)
    x = frames_input(64, frames=16, batch=2)
    assert torch.equal(module(x, 16), x)


def test_new_motion_model_is_identity_for_every_module():
    model = MotionModel(make_spec("v2"))
    for prefix, module in model.named_temporal_modules():
        x = frames_input(module.temporal_transformer.proj_in.in_features, frames=8)
        assert torch.equal(module(x, 8), x), prefix


def test_pe_matches_formula():
    pe = sinusoidal_pe(32, 64)[0].double()
    p = torch.arange(32, dtype=torch.float64)[:, None]
    i = torch.arange(32, dtype=torch.float64)[None, :]
    angle = p * torch.exp(-2 * i * math.log(10000.0) / 64)
    assert pe.shape == (32, 64)
    torch.testing.assert_close(pe[:, 0::2], torch.sin(angle), atol=2e-5, rtol=0)
    torch.testing.assert_close(pe[:, 1::2], torch.cos(angle), atol=2e-5, rtol=0)


@pytest.mark.parametrize("dim", [320, 640, 1280])
def test_pe24_is_bit_exact_prefix_of_pe32(dim):
    assert torch.equal(sinusoidal_pe(24, dim), sinusoidal_pe(32, dim)[:, :24])


def test_pe_is_recomputed_not_loaded_and_not_saved():
    model = random_model(make_spec("v3"))
    assert not any(k.endswith(".pe") for k in model.state_dict())
    _, module = next(model.named_temporal_modules())
    pe = module.temporal_transformer.transformer_blocks[0].attention_blocks[0].pos_encoder.pe
    assert torch.equal(pe, sinusoidal_pe(32, pe.shape[-1]))


def test_frames_beyond_pe_length_raise_clear_error():
    model = random_model(make_spec("v1"))
    _, module = next(model.named_temporal_modules())
    with pytest.raises(MotionModelError, match="25 frames.*at most 24.*stretch_pe"):
        module(frames_input(32, frames=25, batch=1), 25)


def test_stretched_pe_squeezes_the_trained_positions():
    from animatediff_suite.motion_modules.temporal import _sinusoidal_pe, stretched_pe

    # computed here, not taken from the tables' caches (a process forked after other tests, as the
    # mutation tool's are, would otherwise never run the code under test)
    _sinusoidal_pe.cache_clear()
    stretched_pe.cache_clear()
    table = sinusoidal_pe(24, 64)
    stretched = stretched_pe(40, 24, 64)
    assert stretched.shape == (1, 40, 64)
    torch.testing.assert_close(stretched[:, 0], table[:, 0], atol=0, rtol=0)
    torch.testing.assert_close(stretched[:, -1], table[:, -1], atol=1e-6, rtol=0)
    p = torch.arange(40, dtype=torch.float64)[:, None] * 23 / 39
    i = torch.arange(32, dtype=torch.float64)[None, :]
    angle = p * torch.exp(-2 * i * math.log(10000.0) / 64)
    torch.testing.assert_close(stretched[0, :, 0::2].double(), torch.sin(angle), atol=2e-5, rtol=0)
    torch.testing.assert_close(stretched[0, :, 1::2].double(), torch.cos(angle), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="stretching is for more frames"):
        stretched_pe(24, 24, 64)


def test_stretch_pe_runs_long_passes_and_leaves_short_ones_bit_identical():
    model = random_model(make_spec("v1"))
    _, module = next(model.named_temporal_modules())
    short = frames_input(32, frames=16, batch=2)
    assert torch.equal(module(short, 16, stretch_pe=True), module(short, 16))
    long = frames_input(32, frames=40, batch=1)
    out = module(long, 40, stretch_pe=True)
    assert out.shape == long.shape and bool(torch.isfinite(out).all())
    # equals the module whose PE tables are replaced by the stretched table
    import copy

    from animatediff_suite.motion_modules.temporal import PositionalEncoding, stretched_pe

    swapped = copy.deepcopy(module)
    swapped.temporal_transformer.max_len = 40
    for encoder in swapped.modules():
        if isinstance(encoder, PositionalEncoding):
            encoder.pe = stretched_pe(40, 24, encoder.pe.shape[-1]).clone()
    assert torch.equal(out, swapped(long, 40))


def test_per_frame_norm_makes_frames_independent_of_other_frames_stats():
    """Per-frame GroupNorm: scaling one frame changes no statistic of another frame's norm."""
    model = random_model(make_spec("v3"))
    _, module = next(model.named_temporal_modules())
    tt = module.temporal_transformer
    x = frames_input(32, frames=4, batch=1)
    y = x.clone()
    y[0] *= 10
    assert torch.allclose(tt._group_norm(x, 4)[1:], tt._group_norm(y, 4)[1:], atol=1e-6)
    tt.norm_mode = "across_frames"
    assert not torch.allclose(tt._group_norm(x, 4)[1:], tt._group_norm(y, 4)[1:], atol=1e-3)


def test_norm_mode_switch_changes_whole_model_and_spec():
    model = random_model(make_spec("v2"))
    model.set_norm_mode("across_frames")
    assert model.spec.norm_mode == "across_frames"
    assert all(m.temporal_transformer.norm_mode == "across_frames" for _, m in model.named_temporal_modules())
    with pytest.raises(ValueError, match="unknown norm mode 'sideways'"):
        model.set_norm_mode("sideways")


@settings(max_examples=25, deadline=None)
@given(frames=st.integers(1, 24), batch=st.integers(1, 3), h=st.integers(2, 5), w=st.integers(1, 5),
       norm=st.sampled_from(["per_frame", "across_frames"]))
def test_shape_in_equals_shape_out_and_clips_are_independent(frames, batch, h, w, norm):
    torch.manual_seed(0)
    module = VanillaTemporalModule(32, heads=8, max_len=24, norm_mode=norm, zero_init=False)
    x = torch.randn(batch * frames, 32, h, w)
    y = module(x, frames)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # each clip of the batch is processed on its own
    torch.testing.assert_close(y[:frames], module(x[:frames], frames), atol=1e-5, rtol=1e-5)


def test_batch_not_divisible_by_frames_is_an_error():
    module = VanillaTemporalModule(32, heads=8, max_len=24, norm_mode="per_frame")
    with pytest.raises(ValueError, match="batch of 10 is not a whole number of 4-frame clips"):
        module(torch.zeros(10, 32, 2, 2), 4)


def test_attention_backends_agree():
    model = random_model(make_spec("v2"), dtype=torch.float64)
    _, module = next(model.named_temporal_modules())
    x = frames_input(32, frames=16, dtype=torch.float64)
    model.set_attention_backend("sdpa")
    sdpa = module(x, 16)
    model.set_attention_backend("naive")
    torch.testing.assert_close(module(x, 16), sdpa, atol=1e-12, rtol=0)
    model.set_attention_backend("auto")
    torch.testing.assert_close(module(x, 16), sdpa, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="unknown attention backend 'flash9'"):
        model.set_attention_backend("flash9")


@pytest.mark.parametrize("scale", [1.7, 2.0, 1.0, 0.5])
def test_scale_multiplier_scales_the_softmax_scale(scale):
    """motion scale s: softmax(s * q k^T / sqrt(d)) v, checked against an explicit computation."""
    torch.manual_seed(0)
    module = VanillaTemporalModule(32, heads=8, max_len=24, norm_mode="per_frame", zero_init=False).double()
    attention = module.temporal_transformer.transformer_blocks[0].attention_blocks[0]
    x = torch.randn(6, 5, 32, dtype=torch.float64)
    got = attention(x, scale_multiplier=scale)
    h = attention.pos_encoder(x)
    q, k, v = (p(h).view(6, 5, 8, 4).transpose(1, 2) for p in (attention.to_q, attention.to_k, attention.to_v))
    weights = (scale * q @ k.transpose(-1, -2) / 2.0).softmax(-1)
    expected = attention.to_out[0]((weights @ v).transpose(1, 2).reshape(6, 5, 32))
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    assert torch.allclose(attention(x), got) == (scale == 1.0)


def test_custom_operations_are_used():
    class Ops:
        Linear = type("MyLinear", (torch.nn.Linear,), {})
        GroupNorm = type("MyGroupNorm", (torch.nn.GroupNorm,), {})
        LayerNorm = type("MyLayerNorm", (torch.nn.LayerNorm,), {})

    model = MotionModel(make_spec("v3"), operations=Ops)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"MyLinear", "MyGroupNorm", "MyLayerNorm"} <= kinds
    assert "Linear" not in kinds and "LayerNorm" not in kinds


def test_auto_attention_picks_the_kernel_by_device_and_length(monkeypatch):
    from animatediff_suite.motion_modules import temporal

    used = []
    monkeypatch.setattr(temporal, "naive_attention", lambda q, k, v: used.append("naive") or q)
    monkeypatch.setattr(temporal.F, "scaled_dot_product_attention", lambda q, k, v: used.append("sdpa") or q)
    q = torch.zeros(2, 8, temporal.AUTO_NAIVE_FRAMES, 4)
    temporal.auto_attention(q, q, q)
    longer = torch.zeros(2, 8, temporal.AUTO_NAIVE_FRAMES + 1, 4)
    temporal.auto_attention(longer, longer, longer)
    assert used == ["naive", "sdpa"]


def test_onednn_linear_equals_f_linear_and_steps_aside_when_it_does_not_apply(monkeypatch):
    """The CPU fast path (oneDNN 1x1 convolution) gives F.linear's result to fp32 rounding, for
    contiguous and strided inputs; fp64 inputs, layers with weight functions and weights being trained
    take layer(x)."""
    from animatediff_suite.motion_modules import temporal

    real_conv, calls = temporal.F.conv2d, []
    monkeypatch.setattr(temporal.F, "conv2d", lambda *a, **k: calls.append(1) or real_conv(*a, **k))
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(48, 80)
    x = torch.randn(3, 50, 48, generator=gen)
    strided = torch.randn(3, 48, 50, generator=gen).transpose(1, 2)
    for tensor in (x, strided):
        expected = torch.nn.functional.linear(tensor.double(), layer.weight.double(), layer.bias.double())
        with torch.no_grad():  # inference
            got = temporal.linear(layer, tensor)
        assert got.shape == (3, 50, 80) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    assert len(calls) == (2 if torch.backends.mkldnn.is_available() else 0)  # the fast path ran
    calls.clear()
    temporal.linear(layer, x).pow(2).sum().backward()  # training the layer: the GEMM, whose gradient is faster
    assert calls == []
    grad = x.double() @ layer.weight.double().T + layer.bias.double()
    expected = 2 * (grad.reshape(-1, 80).T @ x.double().reshape(-1, 48))  # d/dW sum((xW^T + b)^2)
    torch.testing.assert_close(layer.weight.grad.double(), expected, rtol=1e-5, atol=1e-4)
    layer.requires_grad_(False)
    temporal.linear(layer, x)  # a frozen layer in a graph that needs grads keeps the fast path
    assert len(calls) == (1 if torch.backends.mkldnn.is_available() else 0)
    calls.clear()
    temporal.linear(layer.double(), x.double())
    layer.float().weight_function = [lambda w: w]  # a host's on-the-fly weight (e.g. a LoRA function)
    temporal.linear(layer, x)
    assert calls == []


def test_pe_tables_are_computed_on_the_cpu_under_another_default_device():
    """Models are built under ``torch.device("meta")``; the PE table must still hold numbers."""
    from animatediff_suite.motion_modules.temporal import _sinusoidal_pe, stretched_pe

    _sinusoidal_pe.cache_clear()
    stretched_pe.cache_clear()
    with torch.device("meta"):
        table, stretched = _sinusoidal_pe(4, 8), stretched_pe(6, 4, 8)
    assert table.device.type == stretched.device.type == "cpu"
    assert table[0, 1, 0].item() == pytest.approx(math.sin(1.0)) and stretched[0, 5, 1].item() == pytest.approx(
        math.cos(3.0))
    _sinusoidal_pe.cache_clear()
    stretched_pe.cache_clear()


def _linear_case(change):
    """A Linear(4, 6) layer and an input (2, 3, 4), both fp32 on the CPU, then ``change`` applied."""
    layer, x = torch.nn.Linear(4, 6).requires_grad_(False), torch.zeros(2, 3, 4)
    return change(layer, x) or (layer, x)


def _set(layer, **attrs):
    for name, value in attrs.items():
        setattr(layer, name, value)


@pytest.mark.parametrize("change, applies", [
    (lambda l, x: None, True),
    (lambda l, x: _set(l, bias=None), True),
    (lambda l, x: _set(l, weight_function=[], bias_function=[]), True),  # a host's hooks, none installed
    (lambda l, x: (l.double(), x.double()), False),  # fp64: the GEMM
    (lambda l, x: (l, x.half()), False),
    (lambda l, x: (l.half(), x), False),  # a host's casting layer: its forward casts the weight
    (lambda l, x: _set(l, bias=torch.nn.Parameter(torch.zeros(6, dtype=torch.float16), requires_grad=False)), False),
    (lambda l, x: _set(l, bias=torch.nn.Parameter(torch.zeros(6, device="meta"), requires_grad=False)), False),
    (lambda l, x: (l.to("meta"), x), False),
    (lambda l, x: (l, x.to("meta")), False),
    (lambda l, x: (l, torch.zeros(2, 3, 5)), False),  # not this layer's width: layer(x) says so
    (lambda l, x: _set(l, weight=torch.nn.Parameter(torch.zeros(6, 4, 1), requires_grad=False)), False),
    (lambda l, x: _set(l, weight_function=[lambda w: w]), False),
    (lambda l, x: _set(l, bias_function=[lambda b: b]), False),
    (lambda l, x: l.requires_grad_(True) and None, False),  # being trained: the GEMM's gradient is faster
    (lambda l, x: (torch.nn.Identity(), x), False),
], ids=["fp32-cpu", "no-bias", "empty-hooks", "fp64", "fp16-input", "fp16-weight", "fp16-bias", "bias-elsewhere",
        "weight-elsewhere", "input-elsewhere", "other-width", "3d-weight", "weight-function", "bias-function",
        "trained", "no-weight"])
def test_the_onednn_path_applies_exactly_to_inference_of_plain_fp32_cpu_linears(change, applies):
    from animatediff_suite.motion_modules import temporal

    layer, x = _linear_case(change)
    assert temporal._onednn_applies(layer, x) == (applies and torch.backends.mkldnn.is_available())


def test_the_onednn_path_can_be_switched_off(monkeypatch):
    from animatediff_suite.motion_modules import temporal

    layer, x = _linear_case(lambda l, x: None)
    with monkeypatch.context() as patch:
        patch.setattr(torch.backends.mkldnn, "enabled", False)
        assert not torch.backends.mkldnn.enabled and not temporal._onednn_applies(layer, x)
    assert torch.backends.mkldnn.enabled
    monkeypatch.setattr(temporal, "ONEDNN_LINEAR", False)
    assert not temporal._onednn_applies(layer, x)
    with torch.no_grad():
        assert temporal._onednn_applies(layer.requires_grad_(True), x) is False  # the switch, not the gradient
    monkeypatch.setattr(temporal, "ONEDNN_LINEAR", True)
    with torch.no_grad():  # a trainable weight outside autograd is inference
        assert temporal._onednn_applies(layer, x) == torch.backends.mkldnn.is_available()


def test_stretching_starts_above_the_pe_length_and_spreads_the_positions():
    from animatediff_suite.motion_modules.temporal import PositionalEncoding

    encoder = PositionalEncoding(8, 4)
    exact = encoder(torch.zeros(2, 4, 8), stretch=True)  # as many frames as positions: nothing to stretch
    assert torch.equal(exact, encoder(torch.zeros(2, 4, 8)))
    torch.testing.assert_close(exact[0].double(), pe_formula([0, 1, 2, 3], 8), atol=1e-6, rtol=0)
    longer = encoder(torch.zeros(2, 6, 8), stretch=True)  # frame i at position i * 3 / 5
    torch.testing.assert_close(longer[1].double(), pe_formula([0, 0.6, 1.2, 1.8, 2.4, 3.0], 8), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_stretched_pe_takes_the_input_dtype_and_device(dtype):
    from animatediff_suite.motion_modules.temporal import PositionalEncoding

    encoder = PositionalEncoding(8, 4).to(dtype)
    out = encoder(torch.zeros(2, 6, 8, dtype=dtype), stretch=True)
    assert out.dtype == dtype
    assert encoder.to("meta")(torch.zeros(2, 6, 8, device="meta"), stretch=True).device.type == "meta"


def test_one_window_over_all_frames_with_a_stretched_pe_is_the_plain_pass():
    """Windows (FreeNoise inside the module) keep stretch_pe: one window of every frame, weight 1, gives the
    unwindowed result, also when the window is longer than the PE and is stretched; built under a meta
    default device, the window's indices still follow the input. The devices of every ``index_select`` are
    recorded too: a CPU index into CUDA activations is refused there, and one on the meta device reads
    undefined memory on the CPU, so the value check alone could pass by chance."""
    from torch.overrides import TorchFunctionMode

    class IndexDevices(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.index_select, torch.Tensor.index_select):
                self.seen.append((args[0].device.type, args[2].device.type))
            return func(*args, **(kwargs or {}))

    module = VanillaTemporalModule(32, 8, 4, "per_frame", zero_init=False)
    torch.nn.init.normal_(module.temporal_transformer.proj_out.weight, std=0.2)
    x = frames_input(32, frames=6)
    with torch.no_grad():
        plain = module(x, 6, stretch_pe=True)
        with torch.device("meta"), IndexDevices() as spy:
            windowed = module(x, 6, windows=[(list(range(6)), [1.0] * 6)], stretch_pe=True)
    assert spy.seen == [("cpu", "cpu")]  # one window, one selection, the index beside the activations
    assert windowed.device.type == "cpu"
    torch.testing.assert_close(windowed, plain, atol=1e-5, rtol=0)
    assert (plain - x).abs().max().item() > 1e-2  # the module did something


@pytest.mark.parametrize("own, override", [("per_frame", "across_frames"), ("across_frames", "per_frame")])
def test_a_calls_norm_mode_overrides_the_modules_own(own, override):
    """``module(x, f, norm_mode=...)`` normalises as a module of that mode does, for this call only."""
    import copy

    module = VanillaTemporalModule(32, 8, 24, own, zero_init=False)
    torch.nn.init.normal_(module.temporal_transformer.proj_out.weight, std=0.2)
    other = copy.deepcopy(module)
    other.temporal_transformer.norm_mode = override
    x = frames_input(32, frames=6) * torch.linspace(0.5, 2.0, 12)[:, None, None, None]  # frames differ in scale
    with torch.no_grad():
        got, expected, plain = module(x, 6, norm_mode=override), other(x, 6), module(x, 6)
    assert torch.equal(got, expected)
    assert (got - plain).abs().max().item() > 1e-3
    assert torch.equal(module(x, 6), plain)  # nothing kept


def test_an_unknown_norm_mode_is_refused_in_a_whole_sentence():
    from animatediff_suite.motion_modules.temporal import TemporalTransformer3D

    expected = r"^unknown norm mode 'bogus'; expected one of \['across_frames', 'per_frame'\]$"
    with pytest.raises(ValueError, match=expected):
        TemporalTransformer3D(32, 8, 24, "bogus")
