"""Semantic Motion Predictor core: eq. 4's interpolation, an untrained predictor starting from it, eq. 6's
attention against the formula written out, the strength bias, the paper-size parameter count, files."""

import math

import pytest
import torch

from ads_helpers import raised_message
from animatediff_suite.motion_modules import MotionModelError
from animatediff_suite.motion_modules.motion_predictor import (SD15_CROSS_ATTENTION, MotionPredictor, PredictorSpec,
                                                               attention_with_tokens, interpolate, load_predictor,
                                                               save_predictor)

TINY_LAYERS = ((("input", 1, 0), 32), (("middle", 0, 0), 64), (("output", 11, 0), 32))


def tiny_spec(**changes) -> PredictorSpec:
    return PredictorSpec(**{"image_dim": 12, "layers": TINY_LAYERS, "hidden": 16, "depth": 2, "heads": 4,
                            "tokens": 3, "token_dim": 8, **changes})


def randomised(spec: PredictorSpec, seed: int = 0) -> MotionPredictor:
    model = MotionPredictor(spec).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.2)
    return model.eval()


def test_interpolation_is_eq_4_by_hand():
    start, end = torch.tensor([[0.0, 2.0]]), torch.tensor([[4.0, 6.0]])
    assert interpolate(start, end, 3).tolist() == [[[0.0, 2.0], [2.0, 4.0], [4.0, 6.0]]]
    assert interpolate(start, end, 5)[0, 1].tolist() == [1.0, 3.0]
    assert interpolate(start, end, 1).tolist() == [[[0.0, 2.0]]]


def test_an_untrained_predictor_gives_the_interpolation_exactly():
    model = MotionPredictor(tiny_spec()).double()
    gen = torch.Generator().manual_seed(1)
    start, end = (torch.randn(2, 12, generator=gen, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        assert torch.equal(model.predict(start, end, 7), interpolate(start, end, 7))


def test_a_trained_predictor_sees_the_frame_order():
    """With weights, frame i's prediction depends on i (the frame PE): two frames with the same interpolated
    input (start == end) still differ, and the start/end pair is not symmetric."""
    model = randomised(tiny_spec())
    gen = torch.Generator().manual_seed(2)
    a, b = (torch.randn(1, 12, generator=gen, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        same = model.predict(a, a, 4)
        assert (same[0, 0] - same[0, 3]).abs().max() > 1e-3
        assert (model.predict(a, b, 4) - model.predict(b, a, 4).flip(1)).abs().max() > 1e-3


def explicit_attention(q, k, v, k2, v2, heads, strength):
    """Eq. 6 written out per row and head: weights exp(s_j) on text keys, strength * exp(s_j) on the extra
    keys, normalised; the output is the weighted sum of the values."""
    b, n, inner = q.shape
    d = inner // heads
    out = torch.zeros_like(q)
    for row in range(b):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            keys = torch.cat([k[row, :, cols], k2[row, :, cols]])
            values = torch.cat([v[row, :, cols], v2[row, :, cols]])
            scores = q[row, :, cols] @ keys.T / math.sqrt(d)
            weights = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
            weights[:, k.shape[1]:] *= strength
            out[row, :, cols] = (weights / weights.sum(dim=1, keepdim=True)) @ values
    return out


@pytest.mark.parametrize("strength", [1.0, 0.5, 2.0])
def test_attention_with_tokens_is_eq_6(strength):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 5, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    k2, v2 = (torch.randn(3, 2, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    got = attention_with_tokens(q, k, v, k2, v2, heads=4, strength=strength)
    torch.testing.assert_close(got, explicit_attention(q, k, v, k2, v2, 4, strength), atol=1e-12, rtol=0)


def test_strength_zero_is_plain_cross_attention():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 5, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    k2, v2 = (torch.randn(2, 2, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    plain = explicit_attention(q, k, v, k2[:, :0], v2[:, :0], 4, 1.0)
    torch.testing.assert_close(attention_with_tokens(q, k, v, k2, v2, 4, 0.0), plain, atol=1e-12, rtol=0)


def test_paper_size_parameter_count():
    """8 layers of width 1024 (to_qkv, to_out, a 4x MLP, two LayerNorms), proj_in/out, the token projection and
    SD1.5's 16 cross-attention layers' W_k', W_v' (widths 320 x 5, 640 x 5, 1280 x 6: 12,480 in all)."""
    h = 1024
    block = (h * 3 * h + 3 * h) + (h * h + h) + (h * 4 * h + 4 * h) + (4 * h * h + h) + 2 * (2 * h)
    predictor = (h * h + h) + 8 * block + 2 * h + (h * h + h)
    tokens = (h * 4 * h + 4 * h) + 2 * h
    kv = 2 * h * (320 * 5 + 640 * 5 + 1280 * 6)
    with torch.device("meta"):
        model = MotionPredictor(PredictorSpec.paper())
    assert sum(w for _, w in SD15_CROSS_ATTENTION) == 12480 and len(SD15_CROSS_ATTENTION) == 16
    assert sum(p.numel() for p in model.parameters()) == predictor + tokens + kv == 132_630_528


def test_spec_checks_and_round_trip():
    with pytest.raises(ValueError, match="hidden 1024 is not divisible by heads 12"):
        PredictorSpec.paper().__class__(1024, SD15_CROSS_ATTENTION, heads=12)
    spec = tiny_spec()
    assert PredictorSpec.from_json(spec.to_json()) == spec


def test_file_round_trip_and_bad_files(tmp_path):
    model = randomised(tiny_spec()).float()
    path = tmp_path / "smp.safetensors"
    save_predictor(model, str(path))
    loaded = load_predictor(str(path))
    assert loaded.spec == model.spec
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"down_blocks.0.motion_modules.0.x": torch.zeros(1)}, str(other))
    with pytest.raises(MotionModelError, match=r"not a Semantic Motion Predictor file.*\(a SparseCtrl or motion model\?\)"):
        load_predictor(str(other))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    del sd["kv.middle_0_0.to_v.weight"]
    save_file(sd, str(other), metadata={"animatediff_suite.motion_predictor": model.spec.to_json()})
    with pytest.raises(MotionModelError, match="missing 'kv.middle_0_0.to_v.weight'"):
        load_predictor(str(other))
    with pytest.raises(MotionModelError, match="saved as .safetensors only"):
        save_predictor(model, str(tmp_path / "smp.ckpt"))


def _layer_norm(x: torch.Tensor, norm) -> torch.Tensor:
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias


def test_frame_tokens_and_extra_keys_values_written_out():
    """Tokens: LayerNorm over token_dim (eps 1e-5, its own weight and bias) of (W e + b) cut into `tokens`
    rows; each layer's extra keys and values: P W_k'^T and P W_v'^T (no bias), in that layer's width."""
    model = randomised(tiny_spec(), seed=2)
    gen = torch.Generator().manual_seed(4)
    embeddings = torch.randn(2, 5, 12, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        tokens = model.frame_tokens(embeddings)
        raw = (embeddings @ model.to_tokens.weight.T + model.to_tokens.bias).reshape(2, 5, 3, 8)
        expected = _layer_norm(raw, model.token_norm)
        torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-12)
        rows = tokens.reshape(10, 3, 8)
        for key, width in TINY_LAYERS:
            k, v = model.extra_kv(key, rows)
            assert k.shape == v.shape == (10, 3, width)
            name = "_".join(str(part) for part in key)
            torch.testing.assert_close(k, rows @ model.kv[name].to_k.weight.T, rtol=0, atol=1e-12)
            torch.testing.assert_close(v, rows @ model.kv[name].to_v.weight.T, rtol=0, atol=1e-12)


def test_predict_is_eqs_4_and_5_written_out():
    """P = I + W_out LN(B(W_in I + b_in + PE)) with I eq. 4's interpolation, PE[p, 2i] = sin(p / 10000^(2i/h)),
    PE[p, 2i+1] = cos(same), and each block of B pre-norm residual: x + Attn(LN1 x) (heads over frames,
    q k v split as (3, heads, d)), then x + W2 gelu(W1 LN2 x + b1) + b2. Randomised weights, fp64."""
    spec = tiny_spec()
    model = randomised(spec, seed=5)
    gen = torch.Generator().manual_seed(6)
    start, end = (torch.randn(2, 12, generator=gen, dtype=torch.float64) for _ in range(2))
    frames, hidden, heads = 6, spec.hidden, spec.heads
    d = hidden // heads
    w = torch.arange(frames, dtype=torch.float64) / (frames - 1)
    interp = start[:, None] + w[None, :, None] * (end - start)[:, None]
    p = torch.arange(frames, dtype=torch.float64)[:, None]
    angle = p / 10000 ** (torch.arange(0, hidden, 2, dtype=torch.float64)[None] / hidden)
    pe = torch.stack([torch.sin(angle), torch.cos(angle)], -1).reshape(frames, hidden)
    x = interp @ model.proj_in.weight.T + model.proj_in.bias + pe
    for block in model.blocks:
        qkv = _layer_norm(x, block.norm1) @ block.to_qkv.weight.T + block.to_qkv.bias
        q, k, v = qkv.reshape(2, frames, 3, heads, d).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
        x = x + attention.permute(0, 2, 1, 3).reshape(2, frames, hidden) @ block.to_out.weight.T + block.to_out.bias
        inner = _layer_norm(x, block.norm2) @ block.fc1.weight.T + block.fc1.bias
        gelu = 0.5 * inner * (1 + torch.erf(inner / math.sqrt(2)))
        x = x + gelu @ block.fc2.weight.T + block.fc2.bias
    expected = interp + _layer_norm(x, model.norm_out) @ model.proj_out.weight.T + model.proj_out.bias
    with torch.no_grad():
        # atol: the model's PE table is float32 (the motion modules' own), cast to the model's dtype
        torch.testing.assert_close(model.predict(start, end, frames), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("field", ["image_dim", "hidden", "depth", "heads", "tokens", "token_dim"])
def test_every_size_must_be_at_least_one(field):
    with pytest.raises(ValueError) as error:
        tiny_spec(**{field: 0})  # heads 0 included: no division by zero before this check
    assert str(error.value) == "every size of a predictor must be at least 1"
    one = tiny_spec(**{field: 1, **({"hidden": 1} if field == "heads" else {}), **({"heads": 1} if field == "hidden" else {})})
    assert getattr(one, field) == 1
    with pytest.raises(ValueError) as error:
        tiny_spec(layers=())
    assert str(error.value) == "a predictor needs at least one cross-attention layer to feed"


def test_file_metadata_and_whole_load_errors(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    model = randomised(tiny_spec()).float()
    path = tmp_path / "smp.safetensors"
    save_predictor(model, str(path), metadata={"trained_steps": "4"})
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt" and metadata["trained_steps"] == "4"
    text = metadata["animatediff_suite.motion_predictor"]
    assert list(json.loads(text)) == sorted(json.loads(text))  # keys sorted: one spec, one text
    other = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(1)}, str(other))
    with pytest.raises(MotionModelError) as error:
        load_predictor(str(other))
    assert str(error.value) == ("'plain.safetensors': not a Semantic Motion Predictor file: its metadata has no "
                                "'animatediff_suite.motion_predictor' entry; predictors come from AnimateDiff Suite's "
                                "semantic_motion_predictor training")
    save_file({"a": torch.zeros(1)}, str(other), metadata={"animatediff_suite.motion_predictor": "{not json"})
    with pytest.raises(MotionModelError, match=r"^'plain.safetensors': unreadable predictor spec in the metadata \("):
        load_predictor(str(other))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(other), metadata={"animatediff_suite.motion_predictor": model.spec.to_json()})
    with pytest.raises(MotionModelError) as error:
        load_predictor(str(other))
    assert str(error.value) == ("'plain.safetensors': weights do not match the predictor spec: missing none; "
                                "unexpected 'extra.weight'")


def _load_error(path) -> str:
    """The whole message of loading the predictor file ``path``."""
    return raised_message(lambda: load_predictor(str(path)))


def test_load_errors_name_the_file_and_every_wrong_shape(tmp_path):
    from safetensors.torch import save_file

    model = randomised(tiny_spec()).float()
    metadata = {"animatediff_suite.motion_predictor": model.spec.to_json()}
    path = tmp_path / "smp.safetensors"
    save_file({"down_blocks.0.motion_modules.0.x": torch.zeros(1)}, str(path))
    assert _load_error(path) == ("'smp.safetensors': not a Semantic Motion Predictor file: its metadata has no "
                                "'animatediff_suite.motion_predictor' entry (a SparseCtrl or motion model?); "
                                "predictors come from AnimateDiff Suite's semantic_motion_predictor training")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file({k: v for k, v in sd.items() if k != "proj_in.bias"}, str(path), metadata=metadata)
    assert _load_error(path) == ("'smp.safetensors': weights do not match the predictor spec: missing "
                                "'proj_in.bias'; unexpected none")
    # six tensors of the wrong shape: the message lists the first five, in the model's order
    wrong = list(sd)[:6]
    save_file({k: (torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k in wrong else v) for k, v in sd.items()},
              str(path), metadata=metadata)
    shapes = [f"{k} {(sd[k].shape[0] + 1, *sd[k].shape[1:])} (expected {tuple(sd[k].shape)})" for k in wrong[:5]]
    assert _load_error(path) == "'smp.safetensors': wrong shapes: " + "; ".join(shapes)
    bad = dict(sd, **{"proj_in.weight": sd["proj_in.weight"].clone()})
    bad["proj_in.weight"][0, 0] = float("nan")
    save_file(bad, str(path), metadata=metadata)
    assert _load_error(path) == ("'smp.safetensors': weights contain NaN or Inf values ('proj_in.weight'); the file is "
                                "damaged or was saved from a diverged training run")


def test_load_dtype_device_and_frozen(tmp_path):
    """The file's dtype unless one is asked for; the device asked for; eval mode, no gradients."""
    model = randomised(tiny_spec()).half()
    path = tmp_path / "smp.safetensors"
    save_predictor(model, str(path))
    kept = load_predictor(str(path))
    assert {p.dtype for p in kept.parameters()} == {torch.float16}
    assert not kept.training and not any(p.requires_grad for p in kept.parameters())
    wider = load_predictor(str(path), dtype=torch.float64)
    assert {p.dtype for p in wider.parameters()} == {torch.float64}
    assert torch.equal(wider.proj_in.weight, model.proj_in.weight.double())
    on_meta = load_predictor(str(path), device="meta")
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}


def test_predict_stays_in_the_inputs_dtype_and_on_their_device():
    """A half-precision predictor predicts in half precision (eq. 4's weights and the PE are cast, nothing
    promotes to float32), and one on another device computes there (``meta`` stands in for a GPU)."""
    model = randomised(tiny_spec()).to(torch.bfloat16)
    start, end = torch.randn(2, 12, dtype=torch.bfloat16), torch.randn(2, 12, dtype=torch.bfloat16)
    with torch.no_grad():
        assert model.predict(start, end, 5).dtype == torch.bfloat16
    assert interpolate(start, end, 5).dtype == torch.bfloat16
    with torch.device("meta"):
        on_meta = MotionPredictor(tiny_spec())
    start, end = torch.zeros(2, 12, device="meta"), torch.zeros(2, 12, device="meta")
    with torch.no_grad():
        assert on_meta.predict(start, end, 5).device.type == "meta"
    q = torch.zeros(1, 5, 16, device="meta")
    assert attention_with_tokens(q, q, q, q[:, :2], q[:, :2], heads=4, strength=0.5).device.type == "meta"


def test_attention_strength_defaults_to_one():
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 5, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    k2, v2 = (torch.randn(2, 2, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(attention_with_tokens(q, k, v, k2, v2, 4),
                               explicit_attention(q, k, v, k2, v2, 4, 1.0), atol=1e-12, rtol=0)
